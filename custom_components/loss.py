"""Detection loss (§2.3): binary cross-entropy on all positives and the k hardest negatives of each patch (online hard
example mining), smooth L1 on the positives' offsets, as Faster R-CNN's loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from custom_components.anchors import RegressionAnchors, flatten_outputs
from custom_components.boxes import CubeCoder
from custom_components.targets import NEGATIVE, POSITIVE, assign_targets

__all__ = ["DetectionLoss", "hard_negative_indices"]


def hard_negative_indices(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """Indices ``(min(k, #negatives),)`` of the negatives (``labels == 0``) with the highest noduleness logits."""
    masked = logits.detach().masked_fill(labels != NEGATIVE, float("-inf"))
    k = min(k, int((labels == NEGATIVE).sum()))
    return masked.topk(k).indices


class DetectionLoss(nn.Module):
    """Loss of the two-head network on a batch of training patches.

    Args:
        anchors: the regression anchors of the network's heads.
        coder: encodes the matched nodules as regression targets.
        pos_iou, neg_iou: eta+ and eta- of :func:`custom_components.targets.assign_targets`.
        num_hard_negatives: k, the negatives per patch that enter the loss (the highest-scoring ones).
        reg_weight: weight of the regression term.
        smooth_l1_beta: the smooth L1 transition point (Faster R-CNN's RPN uses 1/9).

    ``forward(outputs, targets, ignore=None)``:
        - ``outputs``: the network's ``[(B, A_0*5, I/2, J/2, K/2), (B, A_1*5, I/4, J/4, K/4)]``.
        - ``targets``: ``B`` tensors ``(M_b, 4)`` of nodule cubes ``(ci, cj, ck, d)`` in patch voxel coordinates.
        - ``ignore``: optional ``B`` tensors ``(K_b, 4)`` of excluded findings in the same coordinates.

    Returns ``{"loss", "loss_cls", "loss_reg", "num_pos", "num_neg"}``: ``loss = loss_cls + reg_weight * loss_reg``;
    ``loss_cls`` is the mean BCE over all positives plus the mean BCE over the hard negatives of every patch: the two
    classes weigh the same however many positives the IoU rule yields (tens per nodule against k negatives per patch;
    pooled into one mean, the positives would drown the hard negatives and push every score up); ``loss_reg`` is the smooth L1 summed over
    the 4 offsets and averaged over the positives (0 without positives). ``num_pos``/``num_neg`` count the selected
    samples of the batch (int64 tensors).
    """

    def __init__(
        self,
        anchors: RegressionAnchors,
        coder: CubeCoder,
        pos_iou: float = 0.3,
        neg_iou: float = 0.001,
        num_hard_negatives: int = 5,
        reg_weight: float = 1.0,
        smooth_l1_beta: float = 1.0 / 9,
    ) -> None:
        super().__init__()
        self.anchors = anchors
        self.coder = coder
        self.pos_iou = pos_iou
        self.neg_iou = neg_iou
        self.num_hard_negatives = num_hard_negatives
        self.reg_weight = reg_weight
        self.smooth_l1_beta = smooth_l1_beta

    def forward(
        self, outputs: Sequence[Tensor], targets: Sequence[Tensor], ignore: Sequence[Tensor] | None = None
    ) -> dict[str, Tensor]:
        flat = flatten_outputs(outputs)
        anchors = self.anchors.for_outputs(outputs)
        if len(targets) != flat.shape[0]:
            raise ValueError(f"{len(targets)} target tensors for a batch of {flat.shape[0]} patches")
        cls_logits, cls_targets, reg_pred, reg_target = [], [], [], []
        for b in range(flat.shape[0]):
            with torch.no_grad():
                labels, matched = assign_targets(
                    anchors, targets[b], self.pos_iou, self.neg_iou, None if ignore is None else ignore[b]
                )
            pos = torch.nonzero(labels == POSITIVE).squeeze(1)
            neg = hard_negative_indices(flat[b, :, 0], labels, self.num_hard_negatives)
            cls_logits += [flat[b, pos, 0], flat[b, neg, 0]]
            cls_targets += [torch.ones_like(pos, dtype=flat.dtype), torch.zeros_like(neg, dtype=flat.dtype)]
            reg_pred.append(flat[b, pos, 1:])
            reg_target.append(self.coder.encode(matched[pos], anchors[pos]))
        logits, cls_t = torch.cat(cls_logits), torch.cat(cls_targets)
        num_pos = (cls_t == 1).sum()
        num_neg = (cls_t == 0).sum()
        bce = F.binary_cross_entropy_with_logits(logits, cls_t, reduction="none")
        loss_cls = (bce * (cls_t == 1)).sum() / num_pos.clamp(min=1) + (bce * (cls_t == 0)).sum() / num_neg.clamp(min=1)
        loss_reg = F.smooth_l1_loss(
            torch.cat(reg_pred), torch.cat(reg_target), reduction="sum", beta=self.smooth_l1_beta
        ) / num_pos.clamp(min=1)
        return {
            "loss": loss_cls + self.reg_weight * loss_reg,
            "loss_cls": loss_cls,
            "loss_reg": loss_reg,
            "num_pos": num_pos,
            "num_neg": num_neg,
        }
