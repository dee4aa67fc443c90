"""Low-frequency texture and the scanner's blur and correlated noise."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from bundle.synthetic.raster import ScanGrid

__all__ = ["SmoothField", "blur_and_add_noise"]


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


def blur_and_add_noise(
    volume: np.ndarray, sigma_hu: float, psf_voxels: float, rng: np.random.Generator, chunk: int = 16
) -> None:
    """Apply the in-plane point-spread function and add noise of ``sigma_hu`` correlated by that same kernel, in place.

    White noise is added before the Gaussian blur (``psf_voxels`` standard deviation, in-plane), which is how a CT
    reconstruction kernel shapes both resolution and noise texture. A 2D Gaussian of standard deviation ``s`` scales
    white noise by ``1 / (2 s sqrt(pi))``, so the white noise is drawn that much stronger. Works ``chunk`` slices at
    a time to bound memory on full-size scans.
    """
    white_sigma = sigma_hu * 2.0 * psf_voxels * np.sqrt(np.pi)
    # Buffers are reused across chunks: fresh large arrays cost page faults that dominate these cheap operations.
    noisy = np.empty((min(chunk, volume.shape[0]),) + volume.shape[1:], dtype=np.float32)
    for k0 in range(0, volume.shape[0], chunk):
        part = volume[k0 : k0 + chunk]
        buffer = noisy[: len(part)]
        rng.standard_normal(dtype=np.float32, out=buffer)
        buffer *= white_sigma
        buffer += part
        ndimage.gaussian_filter(buffer, (0.0, psf_voxels, psf_voxels), output=part, mode="nearest")
