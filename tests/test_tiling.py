"""Tiled whole-image inference: the cores partition the crop, and a nodule on a seam is found once, as untiled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from custom_components.anchors import RegressionAnchors
from custom_components.boxes import CubeCoder
from custom_components.candidates import Candidates, head_candidates
from custom_components.detector import NoduleDetector
from custom_components.tiling import plan_tiles


class LocalBlobNetwork(nn.Module):
    """A hand-built two-head network with a known, small receptive field (12 voxels at stride 4).

    Each head average-pools the input to its stride, takes the 3x3x3-cell mean of that, and turns it into one
    noduleness logit per anchor (bright neighbourhoods score high) and offsets that pull the centre towards the brighter side, so scores and boxes both depend on
    voxels up to a cell away. Padded at the far end to a multiple of 16 and cropped back, as ``ResNetFPN``.
    """

    anchor_sizes = ((8.0,), (16.0,))
    strides = (2, 4)
    size_divisible = 16

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = x.shape[2:]
        x = F.pad(x, [0, (-size[2]) % 16, 0, (-size[1]) % 16, 0, (-size[0]) % 16])
        outputs = []
        for stride, sizes in zip(self.strides, self.anchor_sizes):
            pooled = F.avg_pool3d(x, stride)
            local = F.avg_pool3d(pooled, 3, stride=1, padding=1, count_include_pad=True)
            grads = torch.gradient(local, dim=(2, 3, 4))
            maps = []
            for a, d in enumerate(sizes):
                logit = 40.0 * local - 12.0 - 0.01 * d
                maps += [logit, *(2.0 * g for g in grads), 0.5 * grads[0]]
            out = torch.cat(maps, dim=1)
            grid = [(int(n) + stride - 1) // stride for n in size]
            outputs.append(out[:, :, : grid[0], : grid[1], : grid[2]])
        return outputs


def _ball(shape, centre, radius):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    inside = ((grid - np.asarray(centre, float)[:, None, None, None]) ** 2).sum(0) <= radius**2
    image = np.full(shape, 0.05, np.float32)
    image[inside] = 0.9
    return torch.from_numpy(image)[None, None]


@pytest.mark.parametrize("shape,tile_size,margin", [((64, 48, 96), 48, 16), ((100, 37, 61), 48, 16), ((120, 70, 70), 80, 32)])
def test_tile_cores_partition_the_crop_and_inputs_fit(shape, tile_size, margin):
    tiles = plan_tiles(shape, tile_size, margin)
    assert len(tiles) > 1
    owner = np.zeros(shape, int)
    for t in tiles:
        owner[tuple(slice(a, b) for a, b in zip(t.core_lo, t.core_hi))] += 1
        assert np.prod([b - a for a, b in zip(t.input_lo, t.input_hi)]) <= tile_size**3
        assert all(lo % 16 == 0 for lo in t.input_lo + t.core_lo)
        for a, b, c, d, n in zip(t.input_lo, t.core_lo, t.core_hi, t.input_hi, shape):
            assert a == (0 if b == 0 else b - margin) and d == (n if c == n else min(c + margin, n))
    assert (owner == 1).all()


def test_plan_tiles_keeps_a_crop_that_fits_whole_and_rejects_margins_it_cannot_hold():
    assert len(plan_tiles((291, 210, 312), 320)) == 1
    assert len(plan_tiles((291, 210, 312), None)) == 1
    with pytest.raises(ValueError, match="multiple of 16"):
        plan_tiles((64, 64, 64), 64, margin=8)
    with pytest.raises(ValueError, match="no core"):
        plan_tiles((64, 64, 64), 40, margin=16)


def test_tile_candidates_are_exactly_the_untiled_candidates():
    """Every cell decoded by exactly one tile, with the untiled anchor index, score and cube: no seam duplicates."""
    net, anchors, coder = LocalBlobNetwork(), RegressionAnchors(LocalBlobNetwork.anchor_sizes, (2, 4)), CubeCoder()
    image = torch.rand(1, 1, 64, 48, 96, generator=torch.Generator().manual_seed(3))
    shape = image.shape[2:]
    whole = head_candidates([o[0] for o in net(image)], anchors, coder, shape, 0.0, 10**9)
    parts = []
    for t in plan_tiles(shape, 48, 16):
        outputs = net(image[(slice(None), slice(None), *t.input_slices)])
        parts.append(head_candidates([o[0] for o in outputs], anchors, coder, shape, 0.0, 10**9, t.input_lo, (t.core_lo, t.core_hi)))
    tiled = Candidates.cat(parts)
    assert len(plan_tiles(shape, 48, 16)) > 1
    assert torch.equal(tiled.index, whole.index)
    assert torch.equal(tiled.index, torch.arange(whole.index.numel()))
    torch.testing.assert_close(tiled.scores, whole.scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(tiled.cubes, whole.cubes, rtol=0, atol=1e-5)


def _detector(tile_size, margin=16):
    net = LocalBlobNetwork()
    return NoduleDetector(
        net, RegressionAnchors(net.anchor_sizes, net.strides), score_thresh=0.5, nms_thresh=0.1,
        tile_size=tile_size, tile_margin=margin,
    )


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nodule_on_a_seam_is_found_once_as_untiled(axis):
    shape = [64, 64, 64]
    shape[axis] = 96
    seams = {t.core_lo[axis] for t in plan_tiles(shape, 48, 16)} - {0}
    assert seams, "the crop must be cut along the axis under test"
    centre = [30.0, 33.0, 31.0]
    centre[axis] = float(min(seams))  # the first voxel of the second core: the ball straddles the seam
    image = _ball(shape, centre, 4.0)
    untiled = _detector(None)(image)[0]
    tiled = _detector(48)(image)[0]
    assert len(untiled["label_scores"]) == 1  # one ball, one mark after NMS
    assert len(tiled["label_scores"]) == 1
    assert np.abs(untiled["cube"][0, :3].numpy() - centre).max() < 2.0
    torch.testing.assert_close(tiled["label_scores"], untiled["label_scores"], rtol=0, atol=1e-6)
    torch.testing.assert_close(tiled["box"], untiled["box"], rtol=0, atol=1e-5)


def test_without_a_margin_the_seam_changes_the_mark():
    """The seam test above can fail: without context, the cells next to the seam see zeros instead of the ball."""
    shape = (64, 64, 96)
    seam = min({t.core_lo[2] for t in plan_tiles(shape, 48, 0)} - {0})
    image = _ball(shape, (30.0, 33.0, float(seam)), 4.0)
    untiled = _detector(None, 0)(image)[0]
    tiled = _detector(48, 0)(image)[0]
    same = len(tiled["label_scores"]) == len(untiled["label_scores"]) and torch.allclose(
        tiled["label_scores"], untiled["label_scores"], atol=1e-6
    ) and torch.allclose(tiled["box"], untiled["box"], atol=1e-5)
    assert not same


def test_tiled_marks_match_untiled_with_many_nodules():
    rng = np.random.default_rng(11)
    shape = (80, 64, 112)
    image = torch.zeros(1, 1, *shape)
    for _ in range(8):
        image = torch.maximum(image, _ball(shape, rng.uniform(4, np.array(shape) - 4), rng.uniform(2.5, 5.0)))
    for tile_size, margin in ((48, 16), (64, 16), (80, 32)):
        untiled = _detector(None, margin)(image)[0]
        tiled = _detector(tile_size, margin)(image)[0]
        assert len(untiled["label_scores"]) >= 4
        torch.testing.assert_close(tiled["label_scores"], untiled["label_scores"], rtol=0, atol=1e-6)
        torch.testing.assert_close(tiled["box"], untiled["box"], rtol=0, atol=1e-5)
