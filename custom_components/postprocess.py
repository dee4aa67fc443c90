"""From head outputs to nodule marks (§2.2): noduleness threshold, a candidate cap, then NMS or Gaussian soft-NMS."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from custom_components.anchors import RegressionAnchors
from custom_components.boxes import CubeCoder, cube_iou, cubes_to_standard
from custom_components.candidates import Candidates, head_candidates

__all__ = ["cube_nms", "gaussian_soft_nms", "select_detections", "suppress"]


def gaussian_soft_nms(
    cubes: Tensor, scores: Tensor, sigma: float = 0.5, score_thresh: float = 0.001, max_detections: int = 100
) -> tuple[Tensor, Tensor]:
    """Gaussian soft-NMS (Bodla et al. 2017) on cubes ``(N, 4)`` with scores ``(N,)``.

    Repeatedly keeps the highest-scoring cube ``m`` and decays every remaining score by ``exp(-IoU(m, c)^2 / sigma)``
    instead of deleting overlapping cubes, so two touching nodules both survive. Cubes whose decayed score falls to
    ``score_thresh`` or below are dropped. Returns the kept cubes ``(K, 4)`` and their decayed scores ``(K,)``, in
    the order kept (non-increasing scores), ``K <= max_detections``.
    """
    remaining = scores.clone()
    alive = remaining > score_thresh
    kept: list[int] = []
    kept_scores: list[Tensor] = []
    while len(kept) < max_detections and bool(alive.any()):
        best = int(torch.where(alive, remaining, torch.full_like(remaining, -1.0)).argmax())
        kept.append(best)
        kept_scores.append(remaining[best])
        alive[best] = False
        iou = cube_iou(cubes, cubes[best : best + 1]).squeeze(1)
        remaining = remaining * torch.exp(-(iou**2) / sigma)
        alive &= remaining > score_thresh
    index = torch.tensor(kept, dtype=torch.long, device=cubes.device)
    return cubes[index], (torch.stack(kept_scores) if kept_scores else scores[:0])


def cube_nms(cubes: Tensor, scores: Tensor, nms_thresh: float, max_detections: int) -> Tensor:
    """Greedy NMS of cubes ``(N, 4)``: indices ``(K,)`` (int64, highest score first) of the kept cubes.

    The rule and order of MONAI's ``non_max_suppression`` (stable descending sort; keep the best remaining cube,
    drop those with IoU > ``nms_thresh``; at most ``max_detections``) and its IoU arithmetic (float32, ``inter /
    (union + eps)``), which ``tests/test_postprocess.py`` checks pick for pick. Written here because MONAI's spends
    ~0.1-0.5 s on 1000 candidates: for each pick it converts types and recomputes every remaining box's volume through
    ``box_iou``; here the volumes are computed once and each pick costs one vectorised IoU row.
    """
    order = torch.argsort(scores, dim=0, descending=True, stable=True)
    boxes = cubes_to_standard(cubes[order]).float()
    lo, hi = boxes[:, :3], boxes[:, 3:]
    volume = (hi - lo).prod(dim=1)
    alive = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    eps = torch.finfo(torch.float32).eps
    keep: list[int] = []
    while len(keep) < max_detections:
        remaining = torch.nonzero(alive).squeeze(1)
        if remaining.numel() == 0:
            break
        best = int(remaining[0])
        keep.append(best)
        inter = (torch.minimum(hi[remaining], hi[best]) - torch.maximum(lo[remaining], lo[best])).clamp(min=0).prod(dim=1)
        iou = inter / (volume[remaining] + volume[best] - inter + eps)
        alive[remaining[iou > nms_thresh]] = False
        alive[best] = False
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def select_detections(
    outputs: Sequence[Tensor],
    anchors: RegressionAnchors,
    coder: CubeCoder,
    score_thresh: float = 0.02,
    topk_candidates: int = 1000,
    nms_thresh: float = 0.1,
    max_detections: int = 100,
    soft_nms: bool = False,
    soft_nms_sigma: float = 0.5,
    image_shape: Sequence[int] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Nodule marks of each image of a batch of head outputs.

    Steps per image: noduleness ``sigmoid(logit)`` of all ``N`` anchors; keep those above ``score_thresh``; keep the
    ``topk_candidates`` highest (NMS is a loop over picks, the cap keeps it cheap); decode their offsets; NMS
    (:func:`cube_nms`, MONAI's rule: IoU > ``nms_thresh`` suppressed) or, with
    ``soft_nms``, Gaussian soft-NMS; at most ``max_detections`` marks. The default threshold is low on purpose: a
    FROC curve needs enough marks per scan to reach 8 FP/scan. Only the kept candidates are decoded
    (:func:`custom_components.candidates.head_candidates`), in float32 whatever the outputs' dtype.

    Args:
        outputs: the network's head outputs ``[(B, A_h*5, I_h, J_h, K_h), ...]``.
        anchors: regression anchors of those heads.
        coder: decodes offsets to cubes.
        image_shape: ``(I, J, K)`` of the input; candidates whose decoded centre falls outside its voxels (in the
            network's zero padding, or regressed off the edge) are dropped before NMS: every mark's centre lies in
            ``[-0.5, I - 0.5] x [-0.5, J - 0.5] x [-0.5, K - 0.5]``. ``None``: the heads' grids times their strides.

    Returns:
        ``B`` pairs ``(cubes (K, 4) (ci, cj, ck, d) in input voxel coordinates, scores (K,))``, scores descending.
    """
    crop = image_shape if image_shape is not None else [n * anchors.strides[0] for n in outputs[0].shape[2:]]
    results = []
    for b in range(outputs[0].shape[0]):
        found = head_candidates([o[b] for o in outputs], anchors, coder, crop, score_thresh, topk_candidates)
        results.append(
            suppress(found, topk_candidates, nms_thresh, max_detections, soft_nms, soft_nms_sigma, score_thresh, image_shape)
        )
    return results


def suppress(
    found: Candidates,
    topk_candidates: int = 1000,
    nms_thresh: float = 0.1,
    max_detections: int = 100,
    soft_nms: bool = False,
    soft_nms_sigma: float = 0.5,
    score_thresh: float = 0.02,
    image_shape: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``topk_candidates`` cap, the inside-the-image rule and (soft-)NMS of :func:`select_detections` on the
    candidates of one image (e.g. merged from tiles). Returns ``(cubes (K, 4), scores (K,))``, scores descending."""
    found = found.top(topk_candidates)
    cubes, scores = found.cubes, found.scores
    if image_shape is not None:
        upper = torch.as_tensor(image_shape, dtype=cubes.dtype, device=cubes.device) - 0.5
        inside = ((cubes[:, :3] >= -0.5) & (cubes[:, :3] <= upper)).all(dim=1)
        cubes, scores = cubes[inside], scores[inside]
    if soft_nms:
        return gaussian_soft_nms(cubes, scores, soft_nms_sigma, score_thresh, max_detections)
    keep = cube_nms(cubes, scores, nms_thresh, max_detections)
    return cubes[keep], scores[keep]
