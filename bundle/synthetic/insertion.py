"""Inserting a synthetic lesion into a real CT scan as the scanner would have imaged it.

The lesion is rendered on a fine grid (about 0.3 mm) around it and passed through the scan's own imaging: an
in-plane Gaussian point-spread function and a box slice-sensitivity profile of the slice thickness along z
(both measured on, or known for, the scan, :func:`estimate_imaging`), then averaged over each voxel's extent. How
the imaged lesion meets the real voxels depends on what it is:

- **Ground-glass** (and the halo of a part-solid nodule) is translucent: it adds density to the aerated lung and
  leaves what is denser alone. With ``S`` the tissue without noise (a 5 x 5 in-plane median of the scan, which keeps
  the edges of vessels and chest wall in place), the fine-grid difference is ``occupancy * max(hu - S, 0)``; once
  imaged it is **added** to the real voxels. Vessels running through the lesion (denser than it) stay as they were,
  and the scan's own noise stays everywhere. Replacing ``S`` removes the low-frequency share of the noise that ``S``
  carries; that share is put back with fresh noise of the scan's texture, low-passed alike.
- **Solid** tissue (a solid nodule, a part-solid core, spicules) is opaque: the imaged solid fraction ``w`` of each
  voxel (its partial volume after the blur) replaces the voxel, ``v + w * (hu - v)``, wherever the tissue is not
  already as dense (the chest wall and large vessels a juxta-pleural or juxta-vascular nodule touches stay, so the
  lesion merges with them), and the noise it replaced is put back as ``sqrt(w * (2 - w))`` times fresh noise of the
  scan's texture and level. ``(1 - w)**2 + w * (2 - w) = 1``: the noise variance is the same inside, across the
  edge and outside.

So no voxel outside the imaged lesion changes (no patch boundary, no seam) and no voxel inside is noise-free.

Arrays are numpy in SimpleITK order ``(k, j, i)`` on a :class:`~bundle.synthetic.raster.ScanGrid` (identity
direction); world coordinates are LPS mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bundle.synthetic.nodules import Nodule
from bundle.synthetic.raster import ScanGrid

__all__ = ["Imaging", "Lesion", "estimate_imaging", "insert_lesion", "lesion_extent"]

FINE_MM = 0.3  # fine-grid spacing the lesion is rendered on before the scan's blur and voxel averaging
MEDIAN_VOXELS = 5  # in-plane median giving ``S``, the noise-free tissue the lesion replaces
DENOISE_MM = 0.7  # the Gaussian whose low-pass stands for what of the noise survives in ``S``
KERNEL_RADIUS = 3  # in-plane noise correlation is measured and synthesised over lags up to this many voxels
SOFT_TISSUE_HU = (-150.0, 150.0)  # muscle, heart, liver: the flat regions the noise is measured in


@dataclass(frozen=True)
class Imaging:
    """How a scan images: in-plane PSF ``psf_mm`` (Gaussian sigma), slice ``thickness_mm`` (box slice sensitivity
    profile), noise standard deviation ``noise_hu`` (of a voxel, in soft tissue) and ``noise_kernel``, the in-plane
    ``(2 R + 1, 2 R + 1)`` filter (``R`` = :data:`KERNEL_RADIUS`) that turns unit white noise into the scan's noise
    (its texture and level)."""

    psf_mm: float
    thickness_mm: float
    noise_hu: float
    noise_kernel: np.ndarray


@dataclass(frozen=True)
class Lesion:
    """A lesion to insert: the nodule (shape as spheres, density, LUNA16 centre and effective diameter, world LPS mm)
    and its spicules ``(n, 8)``: tapering capsules (start xyz, end xyz, start radius, end radius; mm) of the
    nodule's density radiating from its surface. ``shape`` is ``round``, ``lobulated`` or ``spiculated``."""

    nodule: Nodule
    spicules: np.ndarray
    shape: str


def lesion_extent(lesion: Lesion) -> float:
    """Largest distance (mm) from the lesion's centre to any of its surface points (spheres, core, spicules)."""
    centre = np.asarray(lesion.nodule.centre)
    reach = [np.linalg.norm(lesion.nodule.spheres[:, :3] - centre, axis=1) + lesion.nodule.spheres[:, 3]]
    if len(lesion.spicules):
        reach.append(np.linalg.norm(lesion.spicules[:, 3:6] - centre, axis=1) + lesion.spicules[:, 7])
    return float(np.concatenate(reach).max())


def _flat_soft_tissue(volume: np.ndarray) -> np.ndarray:
    """Voxels of soft tissue away from any edge (``(k, j, i)`` bool): smoothed HU in :data:`SOFT_TISSUE_HU`, the
    same for the whole 5 x 5 in-plane neighbourhood and the slices above and below."""
    smooth = ndimage.uniform_filter(volume, (1, 5, 5))
    flat = ((smooth > SOFT_TISSUE_HU[0]) & (smooth < SOFT_TISSUE_HU[1])).astype(np.float32)
    # an erosion by a 3 x 7 x 7 box, as a separable box mean (several times faster than binary_erosion)
    return ndimage.uniform_filter(flat, (3, 7, 7), mode="constant") > 1.0 - 1e-4


def _default_kernel(psf_voxels: float, noise_hu: float) -> np.ndarray:
    """In-plane noise kernel: white noise blurred by a Gaussian of ``psf_voxels``, scaled to ``noise_hu``."""
    radius = max(KERNEL_RADIUS, int(np.ceil(3.0 * psf_voxels)))
    axis = np.arange(-radius, radius + 1)
    kernel = np.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2.0 * psf_voxels**2))
    return (kernel * noise_hu / np.sqrt(np.sum(kernel**2))).astype(np.float32)


def estimate_imaging(volume: np.ndarray, spacing: tuple[float, float, float], max_slices: int = 40) -> Imaging:
    """Measure a scan's noise texture, in-plane PSF and slice thickness from its noise in flat soft tissue.

    The noise is the residual (voxel minus its 15 x 15 in-plane mean) in flat soft tissue; its variance is the noise
    level. A CT's reconstruction kernel shapes both its resolution and its noise texture; modelling the noise as white
    noise blurred by the in-plane Gaussian PSF of sigma ``s`` voxels, neighbouring voxels correlate by
    ``rho = exp(-1 / (4 s**2))``, so the measured neighbour correlation gives ``s``, and white noise through that
    Gaussian, scaled to the level, is noise of the scan's texture (``Imaging.noise_kernel``). (A kernel taken from the
    square root of the measured noise power spectrum was tried: the spectrum of a 7 x 7 autocovariance estimate has a
    noise floor that the square root turns into too much high-frequency noise.) The slice thickness is taken as the slice
    spacing: MetaImage and NIfTI do not record it, and the correlation of neighbouring slices' noise that would tell
    an overlapping reconstruction (5 mm slices every 2.5 mm) was swamped by anatomy in trials.

    Without enough flat soft tissue (fewer than 2000 voxels) the values of a standard kernel are returned: PSF
    0.6 mm, thickness = slice spacing, noise 20 HU.

    Args:
        volume: HU volume ``(k, j, i)``.
        spacing: ``(x, y, z)`` voxel size in mm (square pixels assumed: the x spacing is used in-plane).
        max_slices: measure on at most this many consecutive slices in the middle of the volume.
    """
    dx, dz = float(spacing[0]), float(spacing[2])
    # the middle 40 slices are plenty of noise samples (a 512 x 512 slice holds ~10^4 flat soft-tissue voxels)
    first = max(0, (len(volume) - max_slices) // 2)
    volume = np.asarray(volume[first : first + max_slices], dtype=np.float32)
    flat = _flat_soft_tissue(volume)
    flat[:, :KERNEL_RADIUS] = flat[:, -KERNEL_RADIUS:] = False
    flat[:, :, :KERNEL_RADIUS] = flat[:, :, -KERNEL_RADIUS:] = False
    where = np.flatnonzero(flat)
    if where.size < 2000:
        return Imaging(psf_mm=0.6, thickness_mm=dz, noise_hu=20.0, noise_kernel=_default_kernel(0.6 / dx, 20.0))
    where = where[:: max(1, where.size // 200_000)]  # a regular subsample bounds the cost
    residual = (volume - ndimage.uniform_filter(volume, (1, 15, 15))).ravel()
    ni = volume.shape[2]
    lags = range(-KERNEL_RADIUS, KERNEL_RADIUS + 1)
    acov = np.array([[np.mean(residual[where] * residual[where + dj * ni + di]) for di in lags] for dj in lags])
    acov = 0.5 * (acov + acov[::-1, ::-1])  # autocovariance is symmetric
    variance = float(acov[KERNEL_RADIUS, KERNEL_RADIUS])
    rho = float(np.mean(acov[KERNEL_RADIUS, [KERNEL_RADIUS - 1, KERNEL_RADIUS + 1]])) / variance
    rho = 0.5 * rho + 0.5 * float(np.mean(acov[[KERNEL_RADIUS - 1, KERNEL_RADIUS + 1], KERNEL_RADIUS])) / variance
    psf_voxels = np.sqrt(-1.0 / (4.0 * np.log(float(np.clip(rho, 1e-3, 0.98)))))
    noise = np.sqrt(variance)
    kernel = _default_kernel(float(psf_voxels), float(noise))
    return Imaging(
        psf_mm=float(np.clip(psf_voxels * dx, 0.25, 2.0)),
        thickness_mm=dz,
        noise_hu=float(noise),
        noise_kernel=kernel,
    )


def _occupancy(lesion_part: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bool union of spheres ``(m, 4)`` (centre xyz, radius; mm) on the fine grid (axes ``z``, ``y``, ``x`` mm)."""
    inside = np.zeros((len(z), len(y), len(x)), dtype=bool)
    for cx, cy, cz, r in lesion_part:
        inside |= (z[:, None, None] - cz) ** 2 + (y[None, :, None] - cy) ** 2 + (x[None, None, :] - cx) ** 2 < r * r
    return inside


def _capsules(capsules: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bool union of tapering capsules ``(n, 8)`` on the fine grid, each evaluated within its own bounding box."""
    inside = np.zeros((len(z), len(y), len(x)), dtype=bool)
    step = np.array([z[1] - z[0] if len(z) > 1 else 1.0, y[1] - y[0], x[1] - x[0]])
    first = np.array([z[0], y[0], x[0]])
    for cap in capsules:
        a, b = cap[[2, 1, 0]], cap[[5, 4, 3]]  # (z, y, x)
        reach = max(cap[6], cap[7])
        lo = np.maximum(np.floor((np.minimum(a, b) - reach - first) / step).astype(int), 0)
        hi = np.minimum(np.ceil((np.maximum(a, b) + reach - first) / step).astype(int) + 1, inside.shape)
        if np.any(hi <= lo):
            continue
        pz, py, px = np.meshgrid(z[lo[0] : hi[0]], y[lo[1] : hi[1]], x[lo[2] : hi[2]], indexing="ij")
        p = np.stack([pz, py, px], axis=-1) - a
        ab = b - a
        t = np.clip(p @ ab / max(float(ab @ ab), 1e-12), 0.0, 1.0)
        dist = np.linalg.norm(p - t[..., None] * ab, axis=-1)
        inside[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= dist < cap[6] + t * (cap[7] - cap[6])
    return inside


def insert_lesion(
    volume: np.ndarray, grid: ScanGrid, lesion: Lesion, imaging: Imaging, rng: np.random.Generator
) -> tuple[slice, slice, slice] | None:
    """Add ``lesion`` to ``volume`` (float32 HU ``(k, j, i)`` on ``grid``, in place) as ``imaging`` would show it.

    See the module docstring for the model. Ground-glass density gets a texture of +-25 HU (1.5 mm correlation), so a
    ground-glass lesion is not uniform. Returns the array box ``(k, j, i)`` that changed (None when the lesion lies
    outside the grid).
    """
    nodule = lesion.nodule
    spacing = np.asarray(grid.spacing, dtype=float)
    origin = np.asarray(grid.origin, dtype=float)
    centre = np.asarray(nodule.centre, dtype=float)
    reach = lesion_extent(lesion) + 3.0 * imaging.psf_mm + DENOISE_MM + spacing[0]
    reach_z = lesion_extent(lesion) + 0.5 * imaging.thickness_mm + spacing[2]
    lo = np.floor((centre - [reach, reach, reach_z] - origin) / spacing).astype(int)
    hi = np.ceil((centre + [reach, reach, reach_z] - origin) / spacing).astype(int) + 1
    lo, hi = np.maximum(lo, 0), np.minimum(hi, grid.size)
    if np.any(hi <= lo):
        return None
    box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    # fine grid: f samples per voxel and axis (odd along z, so one sample sits on each slice centre)
    f_xy = max(1, int(np.ceil(spacing[0] / FINE_MM)))
    f_z = int(np.ceil(spacing[2] / FINE_MM)) | 1
    # slices beyond the box's own are needed for the slice profile: pad the fine grid by half a thickness
    pad_z = int(np.ceil(0.5 * imaging.thickness_mm / (spacing[2] / f_z)))
    offsets_xy = ((np.arange(f_xy) + 0.5) / f_xy - 0.5) * spacing[0]
    offsets_z = ((np.arange(f_z) + 0.5) / f_z - 0.5) * spacing[2]
    x = (origin[0] + spacing[0] * np.arange(lo[0], hi[0]))[:, None] + offsets_xy
    y = (origin[1] + spacing[1] * np.arange(lo[1], hi[1]))[:, None] + offsets_xy
    z = (origin[2] + spacing[2] * np.arange(lo[2], hi[2]))[:, None] + offsets_z
    x, y, z = x.ravel(), y.ravel(), z.ravel()
    fine_dz = spacing[2] / f_z
    z = np.concatenate([z[0] - fine_dz * np.arange(pad_z, 0, -1), z, z[-1] + fine_dz * np.arange(1, pad_z + 1)])

    region = volume[box]
    sigma_denoise = DENOISE_MM / spacing[0]
    # S: a median keeps the edges of the chest wall and vessels where they are (a Gaussian would pull the wall's
    # edge voxels down, and the lesion's difference would then show there as a bright rim)
    tissue = ndimage.median_filter(region, size=(1, MEDIAN_VOXELS, MEDIAN_VOXELS), mode="nearest")
    # S on the fine grid: linear interpolation of the denoised voxels at the fine sample positions
    coords = np.meshgrid(
        np.clip((z - origin[2]) / spacing[2] - lo[2], 0, region.shape[0] - 1),
        (y - origin[1]) / spacing[1] - lo[1],
        (x - origin[0]) / spacing[0] - lo[0],
        indexing="ij",
        sparse=True,
    )
    tissue_fine = ndimage.map_coordinates(
        tissue, np.broadcast_arrays(*coords), order=1, mode="nearest"
    ).astype(np.float32)

    def image(fine: np.ndarray) -> np.ndarray:
        """The scanner's view of a fine-grid field: PSF in-plane, slice profile along z, voxel averages."""
        sigma = imaging.psf_mm / (spacing[0] / f_xy)
        fine = ndimage.gaussian_filter(fine, (0.0, sigma, sigma), mode="constant")
        width = max(1, int(round(imaging.thickness_mm / fine_dz)))
        fine = ndimage.uniform_filter1d(fine, width, axis=0, mode="constant")
        fine = fine[pad_z + f_z // 2 : fine.shape[0] - pad_z : f_z]  # each slice's centre
        shape = (fine.shape[0], fine.shape[1] // f_xy, f_xy, fine.shape[2] // f_xy, f_xy)
        return fine.reshape(shape).mean(axis=(2, 4))

    occupied = _occupancy(nodule.spheres, z, y, x)
    if len(lesion.spicules):
        occupied |= _capsules(lesion.spicules, z, y, x)
    solid = occupied if nodule.kind not in ("ground-glass", "part-solid") else np.zeros_like(occupied)
    if len(nodule.core):
        solid = _occupancy(nodule.core, z, y, x)
    # fresh noise of the scan's own texture and level: white noise through the measured in-plane noise kernel
    noise = ndimage.convolve(
        rng.standard_normal(region.shape).astype(np.float32), imaging.noise_kernel[None], mode="wrap"
    )
    if nodule.kind in ("ground-glass", "part-solid"):
        # translucent: add density where the tissue is lighter than the lesion, keep what is denser (vessels)
        target = np.full(occupied.shape, nodule.hu, dtype=np.float32)
        texture = ndimage.gaussian_filter(rng.standard_normal(occupied.shape).astype(np.float32), 1.5 / FINE_MM)
        target += 25.0 * texture / max(float(texture.std()), 1e-6)
        denser = occupied & (target > tissue_fine)
        delta = image(np.where(denser, target - tissue_fine, 0.0).astype(np.float32))
        weight = np.clip(image(denser.astype(np.float32)), 0.0, 1.0)
        # replacing S removed the low-frequency share of the noise S carries: put it back, fresh; the weight
        # sqrt(w (2 - w)) keeps (1 - w)**2 + w (2 - w) = 1, i.e. the noise variance, across the edge
        low = ndimage.gaussian_filter(noise, (0.0, sigma_denoise, sigma_denoise))
        region += delta + np.sqrt(weight * (2.0 - weight)) * low
    if solid.any():
        # opaque: the imaged solid fraction w of each voxel replaces the voxel (structure and noise), where the
        # tissue is not already as dense (chest wall, large vessels stay); the replaced noise is put back, fresh
        hu = nodule.core_hu if len(nodule.core) else nodule.hu
        weight = np.clip(image(solid.astype(np.float32)), 0.0, 1.0) * (tissue < hu)
        region += weight * (hu - region) + np.sqrt(weight * (2.0 - weight)) * noise
    return box
