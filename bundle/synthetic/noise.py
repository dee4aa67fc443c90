"""Low-frequency texture of the lung parenchyma (the scanner's blur and noise are in :mod:`.imaging`)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from bundle.synthetic.raster import ScanGrid

__all__ = ["SmoothField"]


def _linear_positions(coords: np.ndarray, first: float, step: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower neighbour index and weight of the upper one, to interpolate ``n`` samples at ``first + step * m``."""
    pos = np.clip((coords - first) / step, 0.0, n - 1.000001)
    lo = np.floor(pos).astype(int)
    return lo, (pos - lo).astype(np.float32)


class SmoothField:
    """A Gaussian random field of unit standard deviation and ``cell_mm`` correlation length over a scan's extent.

    Drawn on a coarse grid and interpolated slice by slice, so its cost does not grow with
    the number of voxels; it gives lung parenchyma its low-frequency texture.
    """

    def __init__(self, grid: ScanGrid, rng: np.random.Generator, cell_mm: float = 5.0) -> None:
        extent = [grid.spacing[d] * (grid.size[d] - 1) for d in range(3)]
        counts = [int(np.ceil(e / cell_mm)) + 4 for e in extent]
        field = ndimage.gaussian_filter(rng.standard_normal(counts[::-1]), 1.0, mode="wrap")
        self._field = (field / field.std()).astype(np.float32)
        first = [grid.origin[d] - 2 * cell_mm for d in range(3)]
        self._z, self._y, self._x = (
            _linear_positions(grid.axis(d), first[d], cell_mm, counts[d]) for d in (2, 1, 0)
        )

    def slice(self, k: int) -> np.ndarray:
        """The field on slice ``k`` of the grid, ``(J, I)`` float32 (trilinear interpolation)."""
        lo, w = self._z[0][k], self._z[1][k]
        plane = (1.0 - w) * self._field[lo] + w * self._field[lo + 1]
        lo, w = self._y
        rows = (1.0 - w[:, None]) * plane[lo] + w[:, None] * plane[lo + 1]
        lo, w = self._x
        return (1.0 - w) * rows[:, lo] + w * rows[:, lo + 1]
