"""Nodule cubes ``(ci, cj, ck, d)``: IoU, conversion to MONAI ``StandardMode`` boxes, and the offset coder.

A nodule (or regression anchor) of centre ``c`` and diameter ``d`` is the cube ``[c - d/2, c + d/2]`` per axis
(docs/conventions.md), in voxel index coordinates of the tensor the network sees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.data.box_utils import box_iou
from torch import Tensor

__all__ = ["CubeCoder", "cube_iou", "cubes_to_standard"]


def cubes_to_standard(cubes: Tensor) -> Tensor:
    """``(N, 4)`` cubes ``(ci, cj, ck, d)`` -> ``(N, 6)`` MONAI ``StandardMode`` boxes
    ``(ci - d/2, cj - d/2, ck - d/2, ci + d/2, cj + d/2, ck + d/2)``."""
    half = cubes[:, 3:4] / 2
    return torch.cat([cubes[:, :3] - half, cubes[:, :3] + half], dim=1)


def cube_iou(a: Tensor, b: Tensor) -> Tensor:
    """Volume IoU of cubes ``a (N, 4)`` and ``b (M, 4)`` -> ``(N, M)`` (MONAI's ``box_iou`` on the cubes' boxes)."""
    return box_iou(cubes_to_standard(a), cubes_to_standard(b))


class CubeCoder:
    """Encodes a cube relative to an anchor as the regression target ``(di, dj, dk, dd)`` and decodes it back.

    ``dc = w_c * (g_c - a_c) / a_d`` per axis (centre shift in anchor sides) and ``dd = w_d * log(g_d / a_d)``, as
    Faster R-CNN's box coder with one size for all three axes. ``dd`` is clamped to ``dd_clip`` on decode so an
    untrained network cannot overflow ``exp``.

    Args:
        weights: ``(w_i, w_j, w_k, w_d)`` scaling the offsets.
        dd_clip: largest decoded ``dd`` (after dividing by ``w_d``).
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), dd_clip: float = math.log(1000.0 / 16)):
        if len(weights) != 4:
            raise ValueError(f"weights needs 4 values (w_i, w_j, w_k, w_d), got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.dd_clip = float(dd_clip)

    def encode(self, gt: Tensor, anchors: Tensor) -> Tensor:
        """``gt (N, 4)``, ``anchors (N, 4)`` cubes -> offsets ``(N, 4)`` ``(di, dj, dk, dd)``."""
        w = gt.new_tensor(self.weights)
        dc = (gt[:, :3] - anchors[:, :3]) / anchors[:, 3:4]
        dd = torch.log(gt[:, 3:4] / anchors[:, 3:4])
        return torch.cat([dc, dd], dim=1) * w

    def decode(self, offsets: Tensor, anchors: Tensor) -> Tensor:
        """``offsets (..., 4)``, ``anchors (..., 4)`` -> cubes ``(..., 4)`` ``(ci, cj, ck, d)``."""
        offsets = offsets / offsets.new_tensor(self.weights)
        centre = anchors[..., :3] + offsets[..., :3] * anchors[..., 3:4]
        d = anchors[..., 3:4] * torch.exp(offsets[..., 3:4].clamp(max=self.dd_clip))
        return torch.cat([centre, d], dim=-1)
