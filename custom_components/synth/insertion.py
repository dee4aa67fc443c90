"""Inserting a synthetic lesion into a real CT scan as the scanner would have imaged it.

A lesion is rendered on a fine grid (about 0.3 mm) around it, blurred by the scan's own point-spread function
(in-plane Gaussian) and slice sensitivity profile (a box of the slice thickness along z), averaged over each voxel's
extent, and **added to the real voxels as a HU difference**. Nothing of the real scan is replaced or masked, so the
scan's own noise, with its own texture (noise-power spectrum), runs unbroken across the lesion and its surroundings:
there is no patch boundary to see.

The difference is that of replacing the tissue the lesion occupies (a smoothed, i.e. denoised, copy ``S`` of the
scan) by the lesion's density ``hu``, where the lesion is denser: ``D = occupancy * max(hu - S, 0)`` on the fine grid,
then blurred and averaged. The ``max`` makes a ground-glass lesion (about -450 HU) fill the aerated lung around the
vessels running through it without erasing them (a vessel at +40 HU is denser than the lesion and stays), while a
solid lesion (+20..+80 HU) takes in the vessels it engulfs, as a real solid nodule does; where a lesion lies against
the chest wall or a vessel of its own density nothing changes, so attached lesions merge with the wall or vessel.

Replacing ``S`` removes the part of the scan's noise that survives in ``S`` (its low-frequency share, a few percent
to a third of the variance depending on the kernel); that share is put back with noise drawn with the scan's own
in-plane correlation and level (:func:`estimate_imaging`) and low-passed like ``S``, weighted so the noise variance
stays constant across the lesion edge. The inside of the lesion therefore carries the scan's noise at the scan's
level, not a noise-free patch.

Arrays are numpy in SimpleITK order ``(k, j, i)`` on a :class:`~custom_components.synth.raster.ScanGrid` (identity
direction); world coordinates are LPS mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from custom_components.synth.nodules import Nodule
from custom_components.synth.raster import ScanGrid

__all__ = ["Imaging", "Lesion", "estimate_imaging", "insert_lesion", "lesion_extent"]

FINE_MM = 0.3  # fine-grid spacing the lesion is rendered on before the scan's blur and voxel averaging
DENOISE_MM = 0.7  # in-plane Gaussian giving ``S``, the noise-free tissue the lesion replaces (about a CT's PSF)
SOFT_TISSUE_HU = (-150.0, 150.0)  # muscle, heart, liver: the flat regions the noise is measured in


@dataclass(frozen=True)
class Imaging:
    """How a scan images: in-plane PSF ``psf_mm`` (Gaussian sigma), slice ``thickness_mm`` (box slice sensitivity
    profile) and noise standard deviation ``noise_hu`` (of a voxel, in soft tissue)."""

    psf_mm: float
    thickness_mm: float
    noise_hu: float


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
    flat = (smooth > SOFT_TISSUE_HU[0]) & (smooth < SOFT_TISSUE_HU[1])
    return ndimage.binary_erosion(flat, np.ones((3, 7, 7), dtype=bool))


def estimate_imaging(volume: np.ndarray, spacing: tuple[float, float, float]) -> Imaging:
    """Measure a scan's in-plane PSF, slice thickness and noise level from its noise in flat soft tissue.

    A CT's reconstruction kernel shapes both its resolution and its noise texture; modelling the noise as white noise
    blurred by the in-plane Gaussian PSF of sigma ``s`` voxels, neighbouring voxels ``d`` apart correlate by
    ``rho(d) = exp(-d**2 / (4 s**2))``. With ``V1``, ``V2`` the mean squared differences of in-plane neighbours 1 and
    2 voxels apart (``V_d = 2 sigma_n**2 (1 - rho(d))``), ``V2 / V1 = 1 + r + r**2 + r**3`` with ``r = rho(1)``
    gives ``r``, then ``s`` and the noise ``sigma_n``. Along z, slices of thickness ``T`` reconstructed every ``dz``
    share ``1 - dz / T`` of their noise (box slice profiles), so the neighbouring-slice difference gives ``T``
    (between ``dz`` and ``3 dz``: slices reconstructed thicker than their spacing, as 5 mm every 2.5 mm).

    Anatomy left in the measured region biases ``r`` up (a sharper scan looks softer) and ``T`` down; the flat-tissue
    mask keeps that small. Without enough flat soft tissue (fewer than 2000 voxel pairs) the defaults of a standard
    kernel are returned: PSF 0.6 mm, thickness = slice spacing, noise 20 HU.

    Args:
        volume: HU volume ``(k, j, i)``.
        spacing: ``(x, y, z)`` voxel size in mm (square pixels assumed: the x spacing is used in-plane).
    """
    dx, dz = float(spacing[0]), float(spacing[2])
    volume = np.asarray(volume, dtype=np.float32)
    flat = _flat_soft_tissue(volume)
    pairs1 = flat[:, :, :-2] & flat[:, :, 2:]
    if pairs1.sum() < 2000:
        return Imaging(psf_mm=0.6, thickness_mm=dz, noise_hu=20.0)
    v1 = float(np.mean((volume[:, :, 1:-1] - volume[:, :, :-2])[pairs1] ** 2))
    v2 = float(np.mean((volume[:, :, 2:] - volume[:, :, :-2])[pairs1] ** 2))
    q = float(np.clip(v2 / max(v1, 1e-6), 1.0 + 1e-3, 4.0 - 1e-3))
    r = float(np.clip(np.roots([1.0, 1.0, 1.0, 1.0 - q]).real.max(), 1e-3, 0.98))  # the one real root in [0, 1)
    psf_voxels = np.sqrt(-1.0 / (4.0 * np.log(r)))
    noise = np.sqrt(v1 / (2.0 * (1.0 - r)))
    thickness = dz
    pairs_z = flat[:-1] & flat[1:]
    if pairs_z.sum() >= 2000:
        vz = float(np.mean((volume[1:] - volume[:-1])[pairs_z] ** 2))
        rho_z = float(np.clip(1.0 - vz / (2.0 * noise**2), 0.0, 2.0 / 3.0))
        thickness = dz / (1.0 - rho_z)
    return Imaging(
        psf_mm=float(np.clip(psf_voxels * dx, 0.25, 2.0)), thickness_mm=float(thickness), noise_hu=float(noise)
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
    tissue = ndimage.gaussian_filter(region, (0.0, sigma_denoise, sigma_denoise), mode="nearest")
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

    occupied = _occupancy(nodule.spheres, z, y, x)
    if len(lesion.spicules):
        occupied |= _capsules(lesion.spicules, z, y, x)
    target = np.full(occupied.shape, nodule.hu, dtype=np.float32)
    if nodule.kind in ("ground-glass", "part-solid"):
        texture = ndimage.gaussian_filter(rng.standard_normal(occupied.shape).astype(np.float32), 1.5 / FINE_MM)
        target += 25.0 * texture / max(float(texture.std()), 1e-6)
    if len(nodule.core):
        core = _occupancy(nodule.core, z, y, x)
        target[core] = nodule.core_hu
        occupied |= core
    denser = occupied & (target > tissue_fine)
    difference = np.where(denser, target - tissue_fine, 0.0).astype(np.float32)
    replaced = denser.astype(np.float32)

    def image(fine: np.ndarray) -> np.ndarray:
        """The scanner's view of a fine-grid field: PSF in-plane, slice profile along z, voxel averages."""
        sigma = imaging.psf_mm / (spacing[0] / f_xy)
        fine = ndimage.gaussian_filter(fine, (0.0, sigma, sigma), mode="constant")
        width = max(1, int(round(imaging.thickness_mm / fine_dz)))
        fine = ndimage.uniform_filter1d(fine, width, axis=0, mode="constant")
        fine = fine[pad_z + f_z // 2 : fine.shape[0] - pad_z : f_z]  # each slice's centre
        shape = (fine.shape[0], fine.shape[1] // f_xy, f_xy, fine.shape[2] // f_xy, f_xy)
        return fine.reshape(shape).mean(axis=(2, 4))

    delta = image(difference)
    weight = np.clip(image(replaced), 0.0, 1.0)
    # the noise S carried is removed where S is replaced: restore that low-frequency share with fresh noise of the
    # scan's texture; weight sqrt(w (2 - w)) keeps (1 - w)**2 + w (2 - w) = 1, i.e. the variance, across the edge
    white_sigma = imaging.noise_hu * 2.0 * (imaging.psf_mm / spacing[0]) * np.sqrt(np.pi)
    noise = ndimage.gaussian_filter(
        white_sigma * rng.standard_normal(region.shape).astype(np.float32),
        (0.0, imaging.psf_mm / spacing[0], imaging.psf_mm / spacing[0]),
    )
    low = ndimage.gaussian_filter(noise, (0.0, sigma_denoise, sigma_denoise))
    region += delta + np.sqrt(weight * (2.0 - weight)) * low
    return box
