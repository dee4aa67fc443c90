"""The scan grid and partial-volume rasterisation of capsules and spheres into a HU volume.

Volumes here are numpy arrays in SimpleITK order ``(k, j, i)`` (slice, row, column), the order in which a MetaImage
stores its voxels. World coordinates are LPS mm; with the identity direction of LUNA16 scans the world position of
voxel ``(i, j, k)`` is ``origin + (i, j, k) * spacing``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ScanGrid", "paint_capsules", "paint_spheres"]


@dataclass(frozen=True)
class ScanGrid:
    """Voxel grid of one scan: ``size`` ``(I, J, K)`` voxels, ``spacing`` mm and ``origin`` (LPS mm of voxel 0,0,0).

    ``thickness`` is the reconstructed slice thickness (mm, the width of the rectangular slice profile each slice
    averages over); None means the slice spacing. Overlapping reconstructions (thickness twice the spacing) are
    common clinically; the MetaImage header stores only the spacing.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    thickness: float | None = None

    @property
    def slice_thickness(self) -> float:
        """Slice thickness (mm): ``thickness``, or the slice spacing when that is None."""
        return self.spacing[2] if self.thickness is None else self.thickness

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(K, J, I)`` of the volume (SimpleITK order)."""
        return self.size[2], self.size[1], self.size[0]

    def axis(self, dim: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """World coordinates (mm) of the voxel centres ``start..stop`` along ``dim`` (0 = x/i, 1 = y/j, 2 = z/k)."""
        stop = self.size[dim] if stop is None else stop
        return self.origin[dim] + self.spacing[dim] * np.arange(start, stop, dtype=np.float64)

    def index_range(self, dim: int, lo: float, hi: float) -> tuple[int, int]:
        """Half-open range of voxel indices along ``dim`` whose centres may lie in ``[lo, hi]`` mm (clipped)."""
        first = int(np.floor((lo - self.origin[dim]) / self.spacing[dim]))
        last = int(np.ceil((hi - self.origin[dim]) / self.spacing[dim]))
        return max(first, 0), min(last + 1, self.size[dim])

    @property
    def subslices(self) -> int:
        """Sub-slices each slice is rendered with, so that partial volume along z is about as fine as in-plane (at
        most 8: a 5 mm slice is sampled every 0.6-0.8 mm, so a sub-millimetre vessel running in-plane is not missed)."""
        return int(np.clip(round(self.slice_thickness / self.spacing[0]), 1, 8))


def _box_occupancy(dist: np.ndarray, radius: np.ndarray | float, width: float) -> np.ndarray:
    """Fraction of a voxel of ``width`` mm, centred ``dist`` mm from an object's axis, lying within ``radius`` mm.

    This is the object's radial profile filtered with a box of the voxel's width, so edges ramp over one voxel and an
    object thinner than a voxel keeps a peak of ``2 * radius / width`` (its partial-volume share) instead of vanishing.
    """
    half = 0.5 * width
    return np.clip((np.minimum(dist + half, radius) - np.maximum(dist - half, -radius)) / width, 0.0, 1.0)


def _box(grid: ScanGrid, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Array slices ``(k, j, i)`` of the voxels whose centres may lie in the world box ``[lo, hi]``, None when empty."""
    (i0, i1), (j0, j1), (k0, k1) = (grid.index_range(d, lo[d], hi[d]) for d in range(3))
    if i0 >= i1 or j0 >= j1 or k0 >= k1:
        return None
    return slice(k0, k1), slice(j0, j1), slice(i0, i1)


def _coords(grid: ScanGrid, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable world coordinates ``(z, y, x)`` of a box, shaped ``(nk, sub, 1, 1)``, ``(nj, 1)`` and ``(ni,)``.

    Each slice is sampled at ``grid.subslices`` evenly spaced depths within its thickness (``grid.slice_thickness``),
    whose average is the partial-volume value of the slice (a rectangular slice profile).
    """
    ks, js, is_ = box
    sub = grid.subslices
    offsets = ((np.arange(sub) + 0.5) / sub - 0.5) * grid.slice_thickness
    z = grid.axis(2, ks.start, ks.stop)[:, None] + offsets[None, :]
    return z[:, :, None, None], grid.axis(1, js.start, js.stop)[:, None], grid.axis(0, is_.start, is_.stop)


def paint_capsules(
    volume: np.ndarray,
    grid: ScanGrid,
    start: np.ndarray,
    end: np.ndarray,
    radius_start: np.ndarray,
    radius_end: np.ndarray,
    hu: float,
    max_elements: int = 1 << 21,
) -> None:
    """Composite tapered capsules (line segments with a radius, world LPS mm) of density ``hu`` into ``volume``.

    Args:
        volume: float HU volume ``(K, J, I)`` on ``grid``, modified in place.
        grid: the scan grid.
        start, end: ``(n, 3)`` segment end points, LPS mm.
        radius_start, radius_end: ``(n,)`` radii (mm) at the two ends, interpolated linearly along the segment.
        hu: density of the capsules.
        max_elements: bound on the sub-sampled voxels evaluated at once (memory).

    Each capsule is evaluated only within its bounding box. Capsules whose boxes have the same (padded) shape are
    evaluated together, and their union (maximum occupancy, so joints have no seams) is gathered with
    ``np.maximum.at``; a voxel covered by a fraction ``f`` of the union then moves ``f`` of the way to ``hu``.
    """
    start, end = np.atleast_2d(start).astype(float), np.atleast_2d(end).astype(float)
    radius_start = np.broadcast_to(np.asarray(radius_start, dtype=float), (len(start),))
    radius_end = np.broadcast_to(np.asarray(radius_end, dtype=float), (len(start),))
    origin, spacing, size = np.array(grid.origin), np.array(grid.spacing), np.array(grid.size)
    width = grid.spacing[0]
    reach = np.maximum(radius_start, radius_end)[:, None] + [width, width, 0.5 * grid.slice_thickness]
    first = np.floor((np.minimum(start, end) - reach - origin) / spacing).astype(int)
    last = np.ceil((np.maximum(start, end) + reach - origin) / spacing).astype(int) + 1
    first, last = np.clip(first, 0, size), np.clip(last, 0, size)
    keep = np.all(last > first, axis=1)
    if not keep.any():
        return
    start, end, radius_start, radius_end = start[keep], end[keep], radius_start[keep], radius_end[keep]
    first, last = first[keep], last[keep]
    dims = (last - first + 1) // 2 * 2  # padded to even sizes so that few distinct box shapes remain
    low, high = first.min(axis=0), np.minimum((first + dims).max(axis=0), size)
    union = np.zeros((high - low)[::-1], dtype=np.float32)
    flat = union.reshape(-1)
    sub = grid.subslices
    offsets = ((np.arange(sub) + 0.5) / sub - 0.5) * grid.slice_thickness
    shapes, group_of = np.unique(dims, axis=0, return_inverse=True)
    for g, (ni, nj, nk) in enumerate(shapes):
        members = np.flatnonzero(group_of.ravel() == g)
        per_chunk = max(1, max_elements // int(ni * nj * nk * sub))
        for c0 in range(0, len(members), per_chunk):
            m = members[c0 : c0 + per_chunk]
            i = first[m, 0, None] + np.arange(ni)  # (G, ni) voxel indices of each box
            j = first[m, 1, None] + np.arange(nj)
            k = first[m, 2, None] + np.arange(nk)
            x = (origin[0] + spacing[0] * i)[:, None, None, None, :]
            y = (origin[1] + spacing[1] * j)[:, None, None, :, None]
            z = (origin[2] + spacing[2] * k[:, :, None] + offsets)[:, :, :, None, None]
            a = start[m][:, :, None, None, None, None]
            ab = end[m][:, :, None, None, None, None] - a
            length2 = np.maximum(np.sum(ab**2, axis=1), 1e-12)
            px, py, pz = x - a[:, 0], y - a[:, 1], z - a[:, 2]
            t = np.clip((px * ab[:, 0] + py * ab[:, 1] + pz * ab[:, 2]) / length2, 0.0, 1.0)
            dist = np.sqrt((px - t * ab[:, 0]) ** 2 + (py - t * ab[:, 1]) ** 2 + (pz - t * ab[:, 2]) ** 2)
            ra, rb = radius_start[m, None, None, None, None], radius_end[m, None, None, None, None]
            occupancy = _box_occupancy(dist, ra + t * (rb - ra), width).mean(axis=2)  # (G, nk, nj, ni)
            inside = (
                (k < size[2])[:, :, None, None] & (j < size[1])[:, None, :, None] & (i < size[0])[:, None, None, :]
            )
            index = (
                ((k - low[2]) * union.shape[1])[:, :, None, None] + (j - low[1])[:, None, :, None]
            ) * union.shape[2] + (i - low[0])[:, None, None, :]
            hit = inside & (occupancy > 0)
            np.maximum.at(flat, index[hit], occupancy[hit].astype(np.float32))
    region = volume[low[2] : high[2], low[1] : high[1], low[0] : high[0]]
    region += union * (hu - region)


def paint_spheres(volume: np.ndarray, grid: ScanGrid, centres: np.ndarray, radii: np.ndarray, hu: float) -> None:
    """Composite the union of spheres (``centres`` ``(m, 3)`` LPS mm, ``radii`` ``(m,)`` mm) of density ``hu``.

    Used for lobulated nodules: the union is rendered once (maximum occupancy over the spheres), so the lobes merge into
    one lesion of uniform density.
    """
    centres, radii = np.atleast_2d(centres), np.atleast_1d(radii)
    width = grid.spacing[0]
    reach = radii[:, None] + [width, width, 0.5 * grid.slice_thickness]
    box = _box(grid, (centres - reach).min(axis=0), (centres + reach).max(axis=0))
    if box is None:
        return
    z, y, x = _coords(grid, box)
    occupancy = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape))
    for c, r in zip(centres, radii):
        dist = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
        np.maximum(occupancy, _box_occupancy(dist, r, width), out=occupancy)
    region = volume[box]
    region += occupancy.mean(axis=1) * (hu - region)
