"""Anchor labelling for training (§2.3): positives above eta+, negatives below eta-, the rest ignored."""

from __future__ import annotations

import torch
from torch import Tensor

from custom_components.boxes import cube_iou

__all__ = ["IGNORED", "NEGATIVE", "POSITIVE", "assign_targets"]

POSITIVE, NEGATIVE, IGNORED = 1, 0, -1


def assign_targets(
    anchors: Tensor,
    gt: Tensor,
    pos_iou: float = 0.3,
    neg_iou: float = 0.001,
    ignore: Tensor | None = None,
    ignore_diameter: float = 10.0,
) -> tuple[Tensor, Tensor]:
    """Label every regression anchor of a patch against its ground-truth nodules.

    Args:
        anchors: ``(N, 4)`` anchor cubes ``(ci, cj, ck, d)`` in patch voxel coordinates.
        gt: ``(M, 4)`` nodule cubes in the same coordinates (``M`` may be 0).
        pos_iou: eta+; an anchor whose best IoU with a nodule is above it is positive.
        neg_iou: eta-; an anchor whose IoU with every nodule is below it is negative.
        ignore: ``(K, 4)`` cubes of excluded findings (LUNA16's irrelevant findings); ``d <= 0`` (unknown) is taken as
            ``ignore_diameter``. An anchor overlapping one at all is never a negative.
        ignore_diameter: side used for excluded findings of unknown size.

    Returns:
        ``labels (N,)`` int64 in {1 positive, 0 negative, -1 ignored} and ``matched_gt (N, 4)``: the nodule of highest
        IoU for each anchor (zeros when ``M = 0``; only meaningful where ``labels == 1``).

    As Faster R-CNN, each nodule's best anchor(s) (all anchors tied at its highest IoU, when that IoU is > 0) are also
    positive: on the stride-2 grid a 3 mm nodule half-way between cell centres overlaps its nearest 3 mm anchor with
    IoU ~0.17 < eta+ and would otherwise have no positive at all.
    """
    labels = torch.full((anchors.shape[0],), NEGATIVE, dtype=torch.long, device=anchors.device)
    matched = torch.zeros_like(anchors)
    gt = gt.to(anchors)
    if gt.numel() > 0:
        iou = cube_iou(anchors, gt)
        best_iou, best_gt = iou.max(dim=1)
        labels[best_iou >= neg_iou] = IGNORED
        gt_best = iou.max(dim=0).values
        low_quality = ((iou == gt_best[None]) & (gt_best[None] > 0)).any(dim=1)
        labels[(best_iou > pos_iou) | low_quality] = POSITIVE
        matched = gt[best_gt]
    if ignore is not None and ignore.numel() > 0:
        ignore = ignore.to(anchors).clone()
        ignore[:, 3] = torch.where(ignore[:, 3] > 0, ignore[:, 3], torch.full_like(ignore[:, 3], ignore_diameter))
        touches = cube_iou(anchors, ignore).amax(dim=1) > 0
        labels[(labels == NEGATIVE) & touches] = IGNORED
    return labels, matched
