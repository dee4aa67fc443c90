"""Regression anchors, cube IoU and the offset coder on hand-built tensors."""

from __future__ import annotations

import math

import torch

from custom_components.anchors import RegressionAnchors, flatten_outputs
from custom_components.boxes import CubeCoder, cube_iou, cubes_to_standard


def test_cube_iou_worked_example():
    # [8, 12]^3 vs [9, 13] x [8, 12]^2: intersection 3 * 4 * 4 = 48, union 64 + 64 - 48 = 80.
    a = torch.tensor([[10.0, 10.0, 10.0, 4.0]])
    b = torch.tensor([[11.0, 10.0, 10.0, 4.0], [10.0, 10.0, 10.0, 4.0], [20.0, 10.0, 10.0, 4.0]])
    iou = cube_iou(a, b)
    assert iou.shape == (1, 3)
    torch.testing.assert_close(iou, torch.tensor([[0.6, 1.0, 0.0]]))


def test_cube_iou_nested_cubes():
    # a 2-cube inside a 4-cube: 8 / 64.
    iou = cube_iou(torch.tensor([[5.0, 5.0, 5.0, 2.0]]), torch.tensor([[5.5, 5.0, 4.5, 4.0]]))
    torch.testing.assert_close(iou, torch.tensor([[0.125]]))


def test_cubes_to_standard():
    boxes = cubes_to_standard(torch.tensor([[10.0, 20.0, 30.0, 4.0]]))
    torch.testing.assert_close(boxes, torch.tensor([[8.0, 18.0, 28.0, 12.0, 22.0, 32.0]]))


def test_encode_worked_example_and_round_trip():
    coder = CubeCoder()
    gt = torch.tensor([[12.0, 10.0, 9.0, 8.0]])
    anchor = torch.tensor([[10.0, 10.0, 10.0, 4.0]])
    torch.testing.assert_close(coder.encode(gt, anchor), torch.tensor([[0.5, 0.0, -0.25, math.log(2.0)]]))
    g = torch.Generator().manual_seed(0)
    gts = torch.cat([torch.rand(50, 3, generator=g) * 60, torch.rand(50, 1, generator=g) * 35 + 3], 1)
    anchors = torch.cat([torch.rand(50, 3, generator=g) * 60, torch.rand(50, 1, generator=g) * 37 + 3], 1)
    for coder in (CubeCoder(), CubeCoder(weights=(10.0, 10.0, 10.0, 5.0))):
        torch.testing.assert_close(coder.decode(coder.encode(gts, anchors), anchors), gts)


def test_decode_clamps_the_size_offset():
    coder = CubeCoder(dd_clip=math.log(4.0))
    cube = coder.decode(torch.tensor([[0.0, 0.0, 0.0, 50.0]]), torch.tensor([[1.0, 2.0, 3.0, 5.0]]))
    torch.testing.assert_close(cube, torch.tensor([[1.0, 2.0, 3.0, 20.0]]))


def test_anchor_grid_centres_sizes_and_count():
    anchors = RegressionAnchors()
    assert anchors.grid_shapes((37, 41, 19)) == [(19, 21, 10), (10, 11, 5)]
    cubes = anchors((8, 8, 8))
    assert cubes.shape == (4 * 4 * 4 * 4 + 2 * 2 * 2 * 5, 4)
    # first cell of head 0 (stride 2): centre 0.5, the four small sizes, then cell (0, 0, 1).
    torch.testing.assert_close(cubes[:5], torch.tensor(
        [[0.5, 0.5, 0.5, 3.0], [0.5, 0.5, 0.5, 5.0], [0.5, 0.5, 0.5, 7.0], [0.5, 0.5, 0.5, 10.0], [0.5, 0.5, 2.5, 3.0]]
    ))
    # last anchor: head 1 (stride 4) cell (1, 1, 1) -> centre 5.5, size 40.
    torch.testing.assert_close(cubes[-1], torch.tensor([5.5, 5.5, 5.5, 40.0]))
    assert anchors((8, 8, 8)) is cubes  # cached


def test_anchor_order_matches_flattened_outputs():
    """Outputs whose offset channels hold each cell x anchor's own (ci, cj, ck, d) flatten to exactly the anchors."""
    anchors = RegressionAnchors()
    shape = (10, 7, 12)
    outputs = []
    for grid, stride, sizes in zip(anchors.grid_shapes(shape), anchors.strides, anchors.sizes_per_head):
        out = torch.zeros(2, len(sizes) * 5, *grid)
        for a, d in enumerate(sizes):
            for axis in range(3):
                idx = torch.arange(grid[axis], dtype=torch.float32) * stride + (stride - 1) / 2
                view = [1, 1, 1]
                view[axis] = -1
                out[:, a * 5 + 1 + axis] = idx.view(view).expand(grid)
            out[:, a * 5 + 4] = d
        outputs.append(out)
    flat = flatten_outputs(outputs)
    assert flat.shape == (2, anchors((10, 7, 12)).shape[0], 5)
    torch.testing.assert_close(flat[1, :, 1:], anchors.for_outputs(outputs))
    assert anchors.counts_per_head(anchors.grid_shapes(shape)) == [5 * 4 * 6 * 4, 3 * 2 * 3 * 5]
