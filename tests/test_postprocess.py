"""Candidate selection, NMS on cubes (MONAI's rule) and Gaussian soft-NMS."""

from __future__ import annotations

import math

import pytest
import torch

from custom_components.anchors import RegressionAnchors
from custom_components.boxes import CubeCoder
from custom_components.postprocess import gaussian_soft_nms, select_detections

ANCHORS = RegressionAnchors()


def _outputs(marks: list[tuple[int, tuple[int, int, int], float]], shape=(32, 32, 32)) -> list[torch.Tensor]:
    """Head outputs with every logit at -20 except the given ``(head-0 anchor index, cell, logit)``; zero offsets, so
    each mark decodes to its own anchor."""
    outputs = [torch.zeros(1, a * 5, *g) for a, g in zip(ANCHORS.num_anchors_per_head, ANCHORS.grid_shapes(shape))]
    for out in outputs:
        out[:, 0::5] = -20.0
    for a, (u, v, w), logit in marks:
        outputs[0][0, a * 5, u, v, w] = logit
    return outputs


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_nms_keeps_the_best_of_three_overlapping_and_the_one_apart():
    # 10 mm anchors (index 3) at i-cells 5, 6, 7 -> centres 10.5, 12.5, 14.5 (IoU 0.67 and 0.43 with the first);
    # a fourth far away at cell (12, 12, 12) -> centre 24.5.
    marks = [(3, (5, 5, 5), _logit(0.9)), (3, (6, 5, 5), _logit(0.8)), (3, (7, 5, 5), _logit(0.7)),
             (3, (12, 12, 12), _logit(0.6))]
    (cubes, scores), = select_detections(_outputs(marks), ANCHORS, CubeCoder(), nms_thresh=0.1)
    torch.testing.assert_close(cubes, torch.tensor([[10.5, 10.5, 10.5, 10.0], [24.5, 24.5, 24.5, 10.0]]))
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.6]))
    # with a looser threshold the 0.43-overlap cube survives too.
    (cubes, _), = select_detections(_outputs(marks), ANCHORS, CubeCoder(), nms_thresh=0.5)
    assert cubes[:, 0].tolist() == [10.5, 14.5, 24.5]


def test_threshold_and_candidate_cap():
    marks = [(0, (2, 2, 2), _logit(0.9)), (0, (8, 8, 8), _logit(0.8)), (0, (14, 14, 14), _logit(0.7)),
             (0, (2, 14, 8), _logit(0.04))]
    (cubes, scores), = select_detections(_outputs(marks), ANCHORS, CubeCoder(), score_thresh=0.05)
    assert len(scores) == 3
    (cubes, scores), = select_detections(_outputs(marks), ANCHORS, CubeCoder(), score_thresh=0.02, topk_candidates=2)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.8]))
    (_, scores), = select_detections(_outputs(marks), ANCHORS, CubeCoder(), score_thresh=0.02, max_detections=3)
    assert len(scores) == 3


def test_soft_nms_decays_the_overlapping_score_by_the_gaussian():
    # IoU of the first two = 48 / 80 = 0.6 (see test_anchors_boxes); the third does not overlap.
    cubes = torch.tensor([[10.0, 10.0, 10.0, 4.0], [11.0, 10.0, 10.0, 4.0], [30.0, 10.0, 10.0, 4.0]])
    scores = torch.tensor([0.9, 0.8, 0.5])
    kept, new_scores = gaussian_soft_nms(cubes, scores, sigma=0.5)
    expected = 0.8 * math.exp(-(0.6**2) / 0.5)  # 0.389
    torch.testing.assert_close(new_scores, torch.tensor([0.9, 0.5, expected]))
    torch.testing.assert_close(kept, cubes[[0, 2, 1]])
    # hard NMS at 0.1 would have removed the second cube; a high floor removes it here too.
    kept, _ = gaussian_soft_nms(cubes, scores, sigma=0.5, score_thresh=0.4)
    assert len(kept) == 2


def test_select_detections_with_soft_nms():
    marks = [(3, (5, 5, 5), _logit(0.9)), (3, (6, 5, 5), _logit(0.8))]
    (cubes, scores), = select_detections(_outputs(marks), ANCHORS, CubeCoder(), soft_nms=True, soft_nms_sigma=0.5)
    iou = (8 * 10 * 10) / (2 * 1000 - 8 * 10 * 10)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.8 * math.exp(-(iou**2) / 0.5)]))
    assert cubes[:, 0].tolist() == [10.5, 12.5]


def test_detections_centred_outside_the_image_are_dropped():
    """A flat score map: every anchor is a candidate, including those of cells in the network's padding; with the
    image shape given, no mark's centre lies outside the image."""
    anchors = RegressionAnchors()
    shape = (20, 18, 17)
    grids = anchors.grid_shapes(shape)
    outputs = [torch.zeros(1, a * 5, *g) for a, g in zip(anchors.num_anchors_per_head, grids)]
    for o in outputs:
        o[:, 1::5] = 2.0  # push every centre +2 anchor sizes along i: many land beyond the far edge
    (cubes, _), = select_detections(outputs, anchors, CubeCoder(), score_thresh=0.0, nms_thresh=1.0, max_detections=10**6)
    (kept, _), = select_detections(
        outputs, anchors, CubeCoder(), score_thresh=0.0, nms_thresh=1.0, max_detections=10**6, image_shape=shape
    )
    assert (cubes[:, 0] > shape[0] - 0.5).any()
    assert len(kept) > 0 and (kept[:, 0] <= shape[0] - 0.5).all() and (kept[:, :3] >= -0.5).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cube_nms_picks_what_monai_non_max_suppression_picks(seed):
    from monai.data.box_utils import non_max_suppression

    from custom_components.boxes import cubes_to_standard
    from custom_components.postprocess import cube_nms

    g = torch.Generator().manual_seed(seed)
    cubes = torch.cat([torch.rand(1000, 3, generator=g) * 60, 3 + torch.rand(1000, 1, generator=g) * 20], 1)
    scores = torch.rand(1000, generator=g).round(decimals=2)  # ties, resolved by the stable sort in both
    for thresh, cap in ((0.1, 100), (0.3, 1000), (0.0, 5)):
        expected = non_max_suppression(cubes_to_standard(cubes), scores, thresh, max_proposals=cap)
        assert torch.equal(cube_nms(cubes, scores, thresh, cap), expected)
    assert cube_nms(cubes[:0], scores[:0], 0.1, 100).numel() == 0
