"""Anchor labelling (eta+/eta-, best-anchor positives, ignore regions) and the OHEM loss."""

from __future__ import annotations

import math

import torch

from custom_components.anchors import RegressionAnchors, flatten_outputs
from custom_components.boxes import CubeCoder, cube_iou
from custom_components.loss import DetectionLoss, hard_negative_indices
from custom_components.targets import assign_targets

ANCHORS = RegressionAnchors()
PATCH = (64, 64, 64)


def _head_of(index: torch.Tensor) -> torch.Tensor:
    head0 = ANCHORS.counts_per_head(ANCHORS.grid_shapes(PATCH))[0]
    return (index >= head0).long()


def test_small_and_large_nodules_get_positives_on_the_right_head():
    anchors = ANCHORS(PATCH)
    gt = torch.tensor([[20.3, 21.0, 19.7, 4.0], [40.0, 42.0, 38.0, 28.0]])
    labels, matched = assign_targets(anchors, gt)
    pos = torch.nonzero(labels == 1).squeeze(1)
    small = pos[matched[pos, 3] == 4.0]
    large = pos[matched[pos, 3] == 28.0]
    assert len(small) > 0 and len(large) > 0 and len(small) + len(large) == len(pos)
    assert (_head_of(small) == 0).all() and set(anchors[small, 3].tolist()) <= {3.0, 5.0}
    assert (_head_of(large) == 1).all() and set(anchors[large, 3].tolist()) <= {22.0, 30.0, 40.0}
    # anchors overlapping a nodule a little are neither positive nor negative; far ones are negative.
    best = cube_iou(anchors, gt).amax(1)
    assert (labels[(best >= 0.001) & (best <= 0.3) & (labels != 1)] == -1).all()
    assert (labels[best < 0.001] == 0).all()
    torch.testing.assert_close(matched[large[0]], gt[1])


def test_tiny_off_grid_nodule_gets_its_best_anchors():
    """A 3 mm nodule mid-way between stride-2 cell centres overlaps no anchor above eta+ = 0.3."""
    anchors = ANCHORS(PATCH)
    gt = torch.tensor([[21.5, 21.5, 21.5, 3.0]])
    iou = cube_iou(anchors, gt).squeeze(1)
    assert iou.max() < 0.3
    labels, _ = assign_targets(anchors, gt)
    pos = torch.nonzero(labels == 1).squeeze(1)
    # the 8 surrounding 5 mm anchors tie at IoU 27/125 = 0.216.
    assert len(pos) == 8
    torch.testing.assert_close(iou[pos], torch.full((8,), 27 / 125))
    assert (anchors[pos, 3] == 5.0).all() and (_head_of(pos) == 0).all()


def test_ignore_regions_are_never_negatives():
    anchors = ANCHORS(PATCH)
    ignore = torch.tensor([[50.0, 12.0, 12.0, -1.0]])  # unknown size -> 10 mm
    labels, _ = assign_targets(anchors, torch.zeros(0, 4), ignore=ignore)
    touching = cube_iou(anchors, torch.tensor([[50.0, 12.0, 12.0, 10.0]])).squeeze(1) > 0
    assert touching.sum() > 0
    assert (labels[touching] == -1).all()
    assert (labels[~touching] == 0).all()


def test_no_ground_truth_means_all_negatives():
    labels, matched = assign_targets(ANCHORS(PATCH), torch.zeros(0, 4))
    assert (labels == 0).all() and labels.dtype == torch.int64 and (matched == 0).all()


def _outputs(patch: tuple[int, int, int], seed: int = 0, batch: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, a * 5, *grid, generator=g).requires_grad_()
        for a, grid in zip(ANCHORS.num_anchors_per_head, ANCHORS.grid_shapes(patch))
    ]


def _logit_grad(outputs: list[torch.Tensor]) -> torch.Tensor:
    return flatten_outputs([o.grad for o in outputs])[:, :, 0]


def test_ohem_uses_exactly_the_k_highest_negatives():
    patch = (16, 16, 16)
    outputs = _outputs(patch, batch=2)
    targets = [torch.tensor([[8.0, 8.0, 8.0, 6.0]]), torch.zeros(0, 4)]
    losses = DetectionLoss(ANCHORS, CubeCoder(), num_hard_negatives=5)(outputs, targets)
    losses["loss"].backward()
    grad = _logit_grad(outputs)
    logits = flatten_outputs(outputs).detach()[:, :, 0]
    anchors = ANCHORS(patch)
    for b in range(2):
        labels, _ = assign_targets(anchors, targets[b])
        negatives = torch.nonzero(labels == 0).squeeze(1)
        top5 = negatives[logits[b, negatives].argsort(descending=True)[:5]]
        expected = set(torch.nonzero(labels == 1).squeeze(1).tolist()) | set(top5.tolist())
        assert set(torch.nonzero(grad[b]).squeeze(1).tolist()) == expected
        assert set(hard_negative_indices(logits[b], labels, 5).tolist()) == set(top5.tolist())
    assert int(losses["num_neg"]) == 10
    assert int(losses["num_pos"]) == int((assign_targets(anchors, targets[0])[0] == 1).sum())


def test_loss_normalisation_on_zero_logits():
    """All logits 0 -> BCE log(2) per selected sample, so log(2) for the negatives' mean plus log(2) for the positives'
    mean when there are any; zero offsets -> smooth L1 of the targets over the positives."""
    patch = (16, 16, 16)
    grids = ANCHORS.grid_shapes(patch)
    outputs = [torch.zeros(1, a * 5, *grid) for a, grid in zip(ANCHORS.num_anchors_per_head, grids)]
    losses = DetectionLoss(ANCHORS, CubeCoder())(outputs, [torch.zeros(0, 4)])
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(math.log(2.0)))
    assert float(losses["loss_reg"]) == 0.0 and int(losses["num_pos"]) == 0 and int(losses["num_neg"]) == 5
    gt = torch.tensor([[8.5, 8.5, 8.5, 5.0]])
    losses = DetectionLoss(ANCHORS, CubeCoder(), smooth_l1_beta=1.0)(outputs, [gt])
    labels, matched = assign_targets(ANCHORS(patch), gt)
    pos = labels == 1
    targets = CubeCoder().encode(matched[pos], ANCHORS(patch)[pos])
    # zero predictions, |target| < beta = 1 -> smooth L1 = 0.5 t^2, summed over the 4 offsets, mean over positives.
    assert int(losses["num_pos"]) == int(pos.sum()) > 1
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(2 * math.log(2.0)))
    torch.testing.assert_close(losses["loss_reg"], (0.5 * targets**2).sum() / pos.sum())
