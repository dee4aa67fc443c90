"""Tiles of a whole-scan inference whose peak memory does not grow with the scan.

The lung crop ``(I, J, K)`` (voxel index coordinates of the preprocessed 1 mm volume) is cut into *cores* that
partition it; each tile's network input is its core plus ``margin`` voxels of context on every side that has a
neighbour (none at the crop's faces, where the untiled network sees its own zero padding). Each output cell belongs
to the one tile whose core holds the cell's centre, so every cell is decoded exactly once (no seam duplicates), and
with a margin at least the network's effective receptive radius it sees the same voxels as in an untiled pass (no
detection lost at a seam). Cores and margins are multiples of the network's ``size_divisible`` (16), so each tile's
origin lies on the coarsest feature grid and its cells coincide with the untiled pass's cells.

Why not MONAI's ``SlidingWindowInferer``: it stitches full-size output maps (``(A*5, I/2, J/2, K/2)`` floats for the
stride-2 head), which grow with the scan; here each tile's cells are thresholded and capped before the next tile runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

import torch

__all__ = ["DEFAULT_TILE_MARGIN", "Tile", "default_tile_size", "plan_tiles"]

#: Context voxels around each core: covers the radius of the largest regression anchor (40 mm) plus 12 voxels. The
#: network's theoretical receptive field is wider, so tiled marks are close to, not equal to, untiled ones: for a
#: 3-epoch lean demo model on two synthetic scans cut into 2-4 tiles, the top-20 marks' noduleness moved by a median
#: 2e-4 and at most 0.08 (docs/performance.md). Raise it (``tile_margin``) where exactness matters more than time.
DEFAULT_TILE_MARGIN = 32


@dataclass(frozen=True)
class Tile:
    """One tile, per axis ``(i, j, k)`` in voxel index coordinates of the whole crop.

    ``core_lo .. core_hi`` (half-open) is the part whose cells this tile decodes; ``input_lo .. input_hi`` the part the
    network sees (the core plus the margins).
    """

    core_lo: tuple[int, int, int]
    core_hi: tuple[int, int, int]
    input_lo: tuple[int, int, int]
    input_hi: tuple[int, int, int]

    @property
    def input_slices(self) -> tuple[slice, slice, slice]:
        """Slices of the crop's spatial axes that give the tile's network input."""
        return tuple(slice(lo, hi) for lo, hi in zip(self.input_lo, self.input_hi))  # type: ignore[return-value]


def _split(extent: int, count: int, align: int) -> list[tuple[int, int]]:
    """``count`` (or fewer) aligned cores ``[lo, hi)`` covering ``[0, extent)``."""
    core = max(align, math.ceil(extent / count / align) * align)
    return [(lo, min(lo + core, extent)) for lo in range(0, extent, core)]


def _largest_input(extent: int, count: int, margin: int, align: int) -> int:
    """The largest tile input extent along an axis split into ``count`` cores."""
    cores = _split(extent, count, align)
    if len(cores) == 1:
        return extent
    return max(min(hi + margin, extent) - max(lo - margin, 0) for lo, hi in cores)


def plan_tiles(shape: Sequence[int], tile_size: int | None, margin: int = DEFAULT_TILE_MARGIN, align: int = 16) -> list[Tile]:
    """Tiles of a crop of spatial shape ``(I, J, K)`` whose network inputs hold at most ``tile_size**3`` voxels.

    The axis of the largest tile input is split further until the largest tile fits, so a crop that fits is one
    tile (no overlap cost) and a long crop is cut along its long axis first.

    Args:
        shape: ``(I, J, K)`` of the crop.
        tile_size: side of the cube whose volume bounds a tile's input; ``None`` or ``0`` for one tile.
        margin: context voxels on each inner side of a core (a multiple of ``align``).
        align: cores start at multiples of this (the network's ``size_divisible``).

    Raises:
        ValueError: ``margin`` or ``tile_size`` do not fit ``align`` (``tile_size >= align + 2 * margin``).
    """
    shape = [int(n) for n in shape]
    if margin < 0 or margin % align:
        raise ValueError(f"tile margin must be a non-negative multiple of {align}, got {margin}")
    if tile_size and tile_size < align + 2 * margin:
        raise ValueError(f"tile_size {tile_size} leaves no core inside margins of {margin}: need >= {align + 2 * margin}")
    counts = [1, 1, 1]
    if tile_size:
        budget = int(tile_size) ** 3
        while True:
            inputs = [_largest_input(n, c, margin, align) for n, c in zip(shape, counts)]
            if math.prod(inputs) <= budget:
                break
            splittable = [a for a in range(3) if len(_split(shape[a], counts[a], align)) < math.ceil(shape[a] / align)]
            if not splittable:
                break
            axis = max(splittable, key=lambda a: inputs[a])
            counts[axis] += 1
    tiles = []
    for cores in product(*[_split(n, c, align) for n, c in zip(shape, counts)]):
        lo = tuple(c[0] for c in cores)
        hi = tuple(c[1] for c in cores)
        single = [len(_split(n, c, align)) == 1 for n, c in zip(shape, counts)]
        in_lo = tuple(0 if s else max(a - margin, 0) for a, s in zip(lo, single))
        in_hi = tuple(n if s else min(b + margin, n) for b, s, n in zip(hi, single, shape))
        tiles.append(Tile(lo, hi, in_lo, in_hi))  # type: ignore[arg-type]
    return tiles


def default_tile_size(device: torch.device | str) -> int:
    """Default ``tile_size`` of a device: on a CPU 256 (a tile of at most 256^3 = 16.8 M voxels; LIDC-IDRI-0002's
    lung crop, 291 x 210 x 312, runs as two), on CUDA 320 (32.8 M voxels: the paper preset's full-resolution stem
    then needs about 1.6 GiB per fp16 activation, within any 8 GiB card)."""
    return 320 if torch.device(device).type == "cuda" else 256
