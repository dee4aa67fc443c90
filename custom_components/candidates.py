"""Detection candidates straight from the head output maps: threshold and cap first, decode only what is kept.

:func:`custom_components.anchors.flatten_outputs` and :meth:`RegressionAnchors.for_outputs` materialise every cell x
regression anchor (13 M rows of 5 + 4 floats for LIDC-IDRI-0002's lung crop with the lean network, ~0.5 GB); training
needs them all, post-processing does not. Here the noduleness of each head is read as a strided view of its output
map, the candidates above the threshold are capped per head, and only their offsets are gathered and their regression
anchors computed (a cell's centre is ``u*s + (s-1)/2`` per axis, see :mod:`custom_components.anchors`).

A candidate carries its *anchor index*: its row in the untiled anchor order of the whole crop (head 0 then head 1,
cells in C order, anchors within a cell), so candidates of tiles merge into exactly what one untiled pass gives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from custom_components.anchors import RegressionAnchors
from custom_components.boxes import CubeCoder
from custom_components.network import NUM_OUTPUTS

__all__ = ["Candidates", "head_candidates"]


@dataclass
class Candidates:
    """Candidates of one image: ``index (M,)`` int64 anchor indices, ``scores (M,)`` float32 noduleness, ``cubes
    (M, 4)`` float32 decoded ``(ci, cj, ck, d)`` in voxel index coordinates of the whole crop."""

    index: Tensor
    scores: Tensor
    cubes: Tensor

    @staticmethod
    def cat(parts: Sequence[Candidates]) -> Candidates:
        """All candidates of ``parts`` in ascending anchor index (the untiled order, whatever the tiling)."""
        index = torch.cat([p.index for p in parts])
        order = torch.argsort(index)
        return Candidates(index[order], torch.cat([p.scores for p in parts])[order], torch.cat([p.cubes for p in parts])[order])

    def top(self, k: int) -> Candidates:
        """The ``k`` highest scoring (all when fewer), highest first."""
        if self.scores.numel() <= k:
            return self
        keep = self.scores.topk(k).indices
        return Candidates(self.index[keep], self.scores[keep], self.cubes[keep])


def _core_cells(stride: int, origin: int, core_lo: float, core_hi: float, cells: int) -> tuple[int, int]:
    """Cells ``[u0, u1)`` of a stride-``stride`` map starting at voxel ``origin`` whose centre
    ``origin + u*stride + (stride-1)/2`` lies in ``[core_lo, core_hi)``."""
    offset = origin + (stride - 1) / 2
    u0 = max(0, math.ceil((core_lo - offset) / stride)) if math.isfinite(core_lo) else 0
    u1 = min(cells, math.ceil((core_hi - offset) / stride)) if math.isfinite(core_hi) else cells
    return u0, max(u0, u1)


def head_candidates(
    outputs: Sequence[Tensor],
    anchors: RegressionAnchors,
    coder: CubeCoder,
    crop_shape: Sequence[int],
    score_thresh: float = 0.02,
    topk_candidates: int = 1000,
    origin: Sequence[int] = (0, 0, 0),
    core: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Candidates:
    """Candidates of one image from its head outputs ``[(A_h*5, I_h, J_h, K_h), ...]`` (no batch axis).

    Args:
        outputs: the heads' maps for an input whose voxel ``(0, 0, 0)`` is voxel ``origin`` of the crop.
        anchors: regression anchors (sizes and strides of the heads).
        coder: decodes the kept cells' offsets.
        crop_shape: ``(I, J, K)`` of the whole crop, which fixes the anchor index.
        score_thresh: keep noduleness ``sigmoid(logit) > score_thresh``.
        topk_candidates: at most this many per head (the caller caps the merged candidates again).
        origin: the input's offset in the crop (a multiple of each head's stride).
        core: ``(lo, hi)`` crop voxel bounds (half-open) of the cells to keep, by cell centre; ``None``: all cells.
    """
    lo, hi = core if core is not None else ((-math.inf,) * 3, (math.inf,) * 3)
    base = 0
    parts = []
    for out, stride, sizes in zip(outputs, anchors.strides, anchors.sizes_per_head):
        num_anchors = len(sizes)
        maps = out.view(num_anchors, NUM_OUTPUTS, *out.shape[1:])
        full = [(int(n) + stride - 1) // stride for n in crop_shape]
        if any(o % stride for o in origin):
            raise ValueError(f"tile origin {tuple(origin)} is not on the stride-{stride} cell grid")
        first = [o // stride for o in origin]
        bounds = [_core_cells(stride, o, a, b, n) for o, a, b, n in zip(origin, lo, hi, maps.shape[2:])]
        (u0, u1), (v0, v1), (w0, w1) = bounds
        scores = torch.sigmoid(maps[:, 0, u0:u1, v0:v1, w0:w1].float()).reshape(-1)
        shape = (num_anchors, u1 - u0, v1 - v0, w1 - w0)
        if int((scores > score_thresh).sum()) > topk_candidates:
            keep = scores.topk(topk_candidates).indices
        else:
            keep = torch.nonzero(scores > score_thresh).squeeze(1)
        a, u, v, w = torch.unravel_index(keep, shape)
        u, v, w = u + u0, v + v0, w + w0
        offsets = maps[a, 1:, u, v, w].float()
        gu, gv, gw = u + first[0], v + first[1], w + first[2]
        centre = torch.stack([gu, gv, gw], dim=1).float() * stride + (stride - 1) / 2
        size = torch.tensor(sizes, dtype=torch.float32, device=out.device)[a]
        cubes = coder.decode(offsets, torch.cat([centre, size[:, None]], dim=1))
        index = base + ((gu * full[1] + gv) * full[2] + gw) * num_anchors + a
        parts.append(Candidates(index, scores[keep], cubes))
        base += full[0] * full[1] * full[2] * num_anchors
    return Candidates.cat(parts)
