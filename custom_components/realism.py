"""Realism statistics of chest CT scans: how far a generated cohort is from real scans, in numbers.

Every statistic is measured the same way on generated and on real scans, from the HU values of the file as written
(no preprocessing), so the two can be put side by side (``python -m bundle realism``, ``bundle/realism.py``):

- **lung volume** (litres) and the **lung HU distribution**: the voxels of the *aerated lung*, i.e. the bundle's own
  lung mask (:func:`custom_components.lung_mask.lung_mask`, on a ~2.5 mm grid) restricted to its air (HU < -400)
  with the holes of each axial slice filled (vessels and nodules enclosed by lung). The bundle's mask alone also holds
  the per-slice convex hull of each lung, which takes in the heart's notch and the concave pleura; its air with its
  enclosed holes is the lung a radiologist would outline. Its distance to the reference is the Wasserstein-1 (earth
  mover's) distance in HU between the two HU distributions;
- the **fraction of lung voxels above -500 and -300 HU** (vessels, airway walls, dependent density, scars);
- **vessel calibres**: on up to ``vessel_slices`` axial slices through the central 80 % of the lungs' extent, at the
  scan's own in-plane resolution, the 8-connected components of HU > -500 inside the aerated lung of that slice
  (enclosed by lung, so not the hilum nor the pleura); each component's area A gives an equivalent diameter
  ``2 sqrt(A / pi)`` mm. Quantiles of those diameters and components per cm² of lung section;
- **noise**: measured in *homogeneous soft tissue* (muscle, heart, liver), not in air: air outside the body is clipped
  at -1024 HU by many scanners (and by the synthetic generator) so its noise is truncated, and the trachea is too
  small for a noise-power spectrum. On up to ``noise_slices`` axial slices, square ROIs of ``roi_mm`` are taken on a
  half-overlapping grid; an ROI counts when the slice smoothed by a 2 mm Gaussian stays within [-60, 160] HU over it
  and varies by less than 40 HU (no fat, air, bone or contrast-filled vessel, no edge). Each ROI loses its
  least-squares quadratic surface (slow anatomical trends); ROIs whose standard deviation exceeds twice the median
  (an edge slipped in) are dropped. The noise standard deviation is the median ROI standard deviation; the 2D
  noise-power spectrum (NPS) is the mean of ``|DFT(roi)|² dx dy / (n_i n_j)`` over the ROIs, averaged over rings of
  width ``1 / (n dx)`` cycles/mm. Its peak and its NPS-weighted mean frequency (cycles/mm) tell the reconstruction
  kernel: filtered back-projection gives a spectrum that rises from zero and peaks at 0.1-0.5 cycles/mm (sharper
  kernels higher), white noise blurred by a Gaussian peaks at the lowest frequency. Anatomy left in patient ROIs
  adds power to the lowest ring, so on real scans the peak can sit there; the mean frequency is the steadier figure.
  The quadratic surface also takes the noise power below about two rings (0.08 cycles/mm for 24 mm ROIs): the
  standard deviation of strongly low-pass noise reads about 8 % low.

Arrays are in MONAI/ITK order ``(I, J, K)`` with ``K`` the slice axis (the voxel axis closest to the patient's
superior-inferior axis), spacings in mm in the same order. Only the voxels each statistic needs are read from the
file's buffer (a strided subsample for the lung mask and the HU distribution, whose marginal a subsample keeps; whole
slices for calibres and noise), which keeps a 512 x 512 x 261 scan at about a second.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from scipy.stats import wasserstein_distance

from custom_components.errors import InputError
from custom_components.io import read_image
from custom_components.lung_mask import lung_mask

__all__ = [
    "HU_BINS",
    "NoiseStatistics",
    "ScanStatistics",
    "aerated_lung",
    "compare",
    "display_name",
    "noise_statistics",
    "scan_statistics",
    "vessel_diameters",
]

HU_BINS = np.arange(-1100.0, 201.0, 20.0)  # edges of the lung HU histogram (HU)
DENSE_HU = (-500.0, -300.0)  # lung voxels above these are reported as fractions
VESSEL_HU = -500.0  # a lung voxel above this is part of a dense cross-section (vessel, airway wall, nodule)
AIR_HU = -400.0  # the bundle's lung threshold (``air_threshold_hu``): below it a voxel is aerated
SOFT_TISSUE_HU = (-60.0, 160.0)  # smoothed HU range of a homogeneous soft-tissue noise ROI
SOFT_TISSUE_RANGE_HU = 40.0  # ... and the most its smoothed values may vary over it
_SAMPLE = 200_000  # lung HU values kept per scan for the Wasserstein distances
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class ScanStatistics:
    """The realism statistics of one scan (see the module docstring for how each is measured).

    ``lung_hu`` is a random sample (at most 200,000 values) of the aerated lung's HU values, kept for distances;
    ``vessel_diameters_mm`` every dense cross-section's equivalent diameter (mm); ``noise`` the soft-tissue noise;
    ``slice_hu`` the mid-lung axial slice ``(I, J)`` in HU with ``pixel_mm`` its pixel size (i, j) mm.
    """

    name: str
    path: str
    group: str
    spacing_mm: tuple[float, float, float]
    lung_volume_l: float
    lung_hu: np.ndarray
    hu_histogram: np.ndarray
    fraction_above: dict[float, float]
    vessel_diameters_mm: np.ndarray
    vessels_per_cm2: float
    noise: NoiseStatistics
    slice_hu: np.ndarray
    pixel_mm: tuple[float, float]
    w1_to_reference_hu: float = float("nan")

    def row(self) -> dict[str, Any]:
        """The scan's line of the table: plain numbers, keyed by column name."""
        d = self.vessel_diameters_mm
        q = (lambda p: float(np.quantile(d, p))) if d.size else (lambda p: float("nan"))
        return {
            "group": self.group,
            "scan": self.name,
            "slice_mm": round(self.spacing_mm[2], 3),
            "pixel_mm": round(self.spacing_mm[0], 3),
            "lung_volume_l": round(self.lung_volume_l, 3),
            "lung_hu_median": round(float(np.median(self.lung_hu)), 1),
            "lung_hu_p05": round(float(np.quantile(self.lung_hu, 0.05)), 1),
            "lung_hu_p95": round(float(np.quantile(self.lung_hu, 0.95)), 1),
            "w1_to_reference_hu": round(self.w1_to_reference_hu, 1),
            "above_-500_pct": round(100 * self.fraction_above[-500.0], 2),
            "above_-300_pct": round(100 * self.fraction_above[-300.0], 2),
            "vessel_d_p10_mm": round(q(0.1), 2),
            "vessel_d_p50_mm": round(q(0.5), 2),
            "vessel_d_p90_mm": round(q(0.9), 2),
            "vessels_per_cm2": round(self.vessels_per_cm2, 2),
            "noise_std_hu": round(self.noise.std_hu, 1),
            "nps_peak_cycles_mm": round(self.noise.peak_cycles_mm, 3),
            "nps_mean_cycles_mm": round(self.noise.mean_cycles_mm, 3),
            "noise_rois": self.noise.rois,
        }


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of each axial slice (axis 2) of ``mask`` ``(I, J, K)``."""
    return np.stack([ndi.binary_fill_holes(mask[:, :, k]) for k in range(mask.shape[2])], axis=2)


def aerated_lung(hu: np.ndarray, spacing: Sequence[float]) -> np.ndarray | None:
    """The aerated lung of ``hu`` ``(I, J, K)`` (HU, K the slice axis, voxel size ``spacing`` mm), ``None`` if none.

    The bundle's lung mask (:func:`custom_components.lung_mask.lung_mask`) restricted to its air (HU < -400), with
    the holes of each axial slice filled: vessels and nodules surrounded by lung belong to it, the chest wall, the
    heart's notch and the hilum (which the bundle's per-slice convex hull takes in) do not.
    """
    mask = lung_mask(hu, spacing, slice_axis=2, air_threshold_hu=AIR_HU)
    return None if mask is None else _aerated(mask, hu)


def _aerated(mask: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """The air (HU < -400) of the bundle's lung ``mask`` with each axial slice's holes filled; both ``(I, J, K)``."""
    return _fill_slices(mask & (hu < AIR_HU))


def _section_of_lung(hu_slice: np.ndarray, lung_slice: np.ndarray) -> np.ndarray:
    """The aerated lung of one native-resolution axial slice ``(I, J)``: its air inside ``lung_slice`` (the coarse
    lung mask brought to this grid), holes filled."""
    return ndi.binary_fill_holes(lung_slice & (hu_slice < AIR_HU))


def vessel_diameters(hu_slice: np.ndarray, lung_section: np.ndarray, pixel_mm: Sequence[float]) -> np.ndarray:
    """Equivalent diameters (mm) ``2 sqrt(A / pi)`` of the 8-connected components of HU > -500 inside
    ``lung_section`` on one axial slice ``hu_slice`` ``(I, J)`` of pixel size ``pixel_mm`` (i, j)."""
    labels, count = ndi.label(lung_section & (hu_slice > VESSEL_HU), structure=_EIGHT)
    if count == 0:
        return np.zeros(0)
    areas = np.bincount(labels.ravel())[1:] * float(pixel_mm[0] * pixel_mm[1])
    return 2.0 * np.sqrt(areas / math.pi)


def _detrend(roi: np.ndarray, design: np.ndarray, pinv: np.ndarray) -> np.ndarray:
    """``roi`` ``(n, n)`` minus its least-squares quadratic surface in ``(i, j)`` (slow anatomical trends)."""
    values = roi.ravel()
    return (values - design @ (pinv @ values)).reshape(roi.shape)


class NoiseStatistics(NamedTuple):
    """Noise of a scan in homogeneous soft tissue: standard deviation (HU), NPS peak and mean frequency
    (cycles/mm), ROIs used, and the radial NPS (``frequencies`` cycles/mm, ``nps`` HU² mm²)."""

    std_hu: float
    peak_cycles_mm: float
    mean_cycles_mm: float
    rois: int
    frequencies: np.ndarray
    nps: np.ndarray


def noise_statistics(slices: Sequence[np.ndarray], pixel_mm: Sequence[float], roi_mm: float = 24.0) -> NoiseStatistics:
    """Noise standard deviation and noise-power spectrum in homogeneous soft tissue of axial ``slices`` (each
    ``(I, J)`` in HU, pixel size ``pixel_mm`` (i, j) mm); see the module docstring for the method.

    The ROI side is ``roi_mm`` for every scan (in pixels it follows the larger pixel side, at least 16). An ROI is
    homogeneous when the slice smoothed by a 2 mm Gaussian stays within [-60, 160] HU over it and varies by less than
    ``SOFT_TISSUE_RANGE_HU`` (no edge of fat, bone or a contrast-filled vessel). Besides the peak, the NPS-weighted mean
    frequency is given (AAPM TG-233's f_av): anatomy left in the ROIs puts power into the lowest ring, which can move
    the peak there, while the mean moves little. NaNs and 0 ROIs when no slice holds a homogeneous region.
    """
    n = max(int(round(roi_mm / max(pixel_mm))), 16)
    step = n // 2
    ii, jj = (a.ravel() / n for a in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    design = np.stack([np.ones(n * n), ii, jj, ii * ii, jj * jj, ii * jj], axis=1)
    pinv = np.linalg.pinv(design)
    rois = []
    for hu in slices:
        hu = np.asarray(hu, dtype=np.float64)
        smooth = ndi.gaussian_filter(hu, sigma=[2.0 / p for p in pixel_mm[:2]])
        for i in range(0, hu.shape[0] - n + 1, step):
            for j in range(0, hu.shape[1] - n + 1, step):
                window = smooth[i : i + n, j : j + n]
                low, high = window.min(), window.max()
                if low >= SOFT_TISSUE_HU[0] and high <= SOFT_TISSUE_HU[1] and high - low < SOFT_TISSUE_RANGE_HU:
                    rois.append(_detrend(hu[i : i + n, j : j + n], design, pinv))
    if not rois:
        return NoiseStatistics(float("nan"), float("nan"), float("nan"), 0, np.zeros(0), np.zeros(0))
    stack = np.stack(rois)
    stds = stack.std(axis=(1, 2))
    keep = stds <= 2.0 * np.median(stds)
    stack, stds = stack[keep], stds[keep]
    power = (np.abs(np.fft.fft2(stack)) ** 2).mean(axis=0) * (pixel_mm[0] * pixel_mm[1]) / (n * n)
    fi = np.fft.fftfreq(n, d=pixel_mm[0])
    fj = np.fft.fftfreq(n, d=pixel_mm[1])
    radius = np.hypot(*np.meshgrid(fi, fj, indexing="ij"))
    width = 1.0 / (n * max(pixel_mm[:2]))
    rings = np.rint(radius / width).astype(int).ravel()
    radial = np.bincount(rings, weights=power.ravel()) / np.maximum(np.bincount(rings), 1)
    last = n // 2  # rings beyond Nyquist along an axis hold only the corners
    frequencies, radial = np.arange(1, last + 1) * width, radial[1 : last + 1]  # ring 0: the mean, detrended away
    return NoiseStatistics(
        std_hu=float(np.median(stds)),
        peak_cycles_mm=float(frequencies[int(np.argmax(radial))]),
        mean_cycles_mm=float((frequencies * radial).sum() / radial.sum()),
        rois=len(stack),
        frequencies=frequencies,
        nps=radial,
    )


def _axial_view(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """A read-only ``(I, J, K)`` view of ``image``'s voxels with ``K`` the slice axis, and the spacings in that order.

    A view of SimpleITK's own buffer (no copy; valid while ``image`` lives): the statistics read only a subsample
    and a few slices of it.
    """
    view = sitk.GetArrayViewFromImage(image).T  # (I, J, K)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    axis = int(np.argmax(np.abs(direction[2])))  # voxel axis closest to LPS z (superior-inferior)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    order = [a for a in range(3) if a != axis] + [axis]
    return np.moveaxis(view, axis, 2), spacing[order]


def display_name(path: str | os.PathLike) -> str:
    """A short name for a scan: its file stem (``<parent>/<stem>`` for generic stems like ``image``), long DICOM-style
    UIDs shortened to their last 12 characters."""
    p = Path(path)
    stem = p.name
    for suffix in (".nii.gz", ".mhd", ".mha", ".nii", ".nrrd"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if stem.lower() in ("image", "ct", "scan", "volume"):
        stem = f"{p.parent.name}/{stem}"
    return "…" + stem[-12:] if len(stem) > 16 and stem.replace(".", "").isdigit() else stem


def scan_statistics(
    path: str | os.PathLike,
    group: str = "cohort",
    coarse_mm: float = 2.5,
    vessel_slices: int = 16,
    noise_slices: int = 8,
    seed: int = 0,
) -> ScanStatistics:
    """Measure one scan (a file or DICOM folder :func:`custom_components.io.read_image` reads).

    Args:
        path: the scan.
        group: its column in the report (``cohort`` or ``reference``).
        coarse_mm: grid step of the lung mask and the HU distribution (every ``round(coarse_mm / spacing)``-th voxel
            per axis; the mask is what the bundle's preprocessing computes on the same grid).
        vessel_slices, noise_slices: axial slices measured at full resolution for the calibres and the noise.
        seed: seed of the HU subsample kept for distances.

    Raises:
        InputError: unreadable, not a CT in HU, or no lungs found.
    """
    loaded = read_image(path)
    view, spacing = _axial_view(loaded.image)
    stride = np.maximum(np.rint(coarse_mm / spacing), 1).astype(int)
    coarse = np.ascontiguousarray(view[:: stride[0], :: stride[1], :: stride[2]], dtype=np.float32)
    coarse_spacing = spacing * stride
    lung_hull = lung_mask(coarse, coarse_spacing, slice_axis=2, air_threshold_hu=AIR_HU)
    lung = None if lung_hull is None else _aerated(lung_hull, coarse)
    if lung is None or not lung.any():
        raise InputError(f"{path}: no lungs found (no air enclosed by the body above 100 ml: not a chest CT?)")
    values = coarse[lung]
    rng = np.random.default_rng(seed)
    sample = values if values.size <= _SAMPLE else rng.choice(values, _SAMPLE, replace=False)
    histogram, _ = np.histogram(values, bins=HU_BINS)
    fraction = {t: float((values > t).mean()) for t in DENSE_HU}
    volume_l = float(lung.sum() * np.prod(coarse_spacing) / 1e6)

    # native-resolution axial slices through the central 80 % of the lungs' extent
    ks = np.flatnonzero(lung.any(axis=(0, 1)))
    lo, hi = ks[0] * stride[2], ks[-1] * stride[2]
    central = (lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo))
    pixel = (float(spacing[0]), float(spacing[1]))

    def native(k: int) -> tuple[np.ndarray, np.ndarray]:
        hu = np.asarray(view[:, :, k], dtype=np.float32)
        kc = min(int(round(k / stride[2])), lung_hull.shape[2] - 1)
        up = np.repeat(np.repeat(lung_hull[:, :, kc], stride[0], axis=0), stride[1], axis=1)
        return hu, _section_of_lung(hu, up[: hu.shape[0], : hu.shape[1]])

    diameters, section_cm2 = [], 0.0
    for k in np.unique(np.rint(np.linspace(*central, vessel_slices)).astype(int)):
        hu, section = native(int(k))
        diameters.append(vessel_diameters(hu, section, pixel))
        section_cm2 += float(section.sum()) * pixel[0] * pixel[1] / 100.0
    d = np.concatenate(diameters)
    noise_ks = np.unique(np.rint(np.linspace(*central, noise_slices)).astype(int))
    noise = noise_statistics([np.asarray(view[:, :, int(k)]) for k in noise_ks], pixel)
    mid = int(round((lo + hi) / 2))
    return ScanStatistics(
        name=display_name(path),
        path=str(path),
        group=group,
        spacing_mm=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        lung_volume_l=volume_l,
        lung_hu=np.asarray(sample, dtype=np.float32),
        hu_histogram=histogram,
        fraction_above=fraction,
        vessel_diameters_mm=d,
        vessels_per_cm2=float(d.size / section_cm2) if section_cm2 else float("nan"),
        noise=noise,
        slice_hu=np.asarray(view[:, :, mid], dtype=np.float32),
        pixel_mm=pixel,
    )


def _pool(samples: Sequence[np.ndarray], size: int = 50_000, seed: int = 0) -> np.ndarray:
    """Equal-weight pool of several scans' HU samples (``size`` values drawn from each), so a big lung does not
    outweigh a small one."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(s, size, replace=s.size < size) for s in samples])


def _spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of the finite ``values`` (NaN for each when none is)."""
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if not finite.size:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": float(np.median(finite)), "min": float(finite.min()), "max": float(finite.max())}


def compare(cohort: Sequence[ScanStatistics], reference: Sequence[ScanStatistics]) -> dict[str, Any]:
    """Set every scan's Wasserstein-1 distance (HU) to the reference's pooled lung HU distribution and summarise.

    A reference scan is compared with the pool of the *other* reference scans (leave one out), so the reference
    column shows how far real scans are from each other: the yardstick for the cohort's distances.

    Returns ``{"cohort": {column: median}, "reference": {...}, "pooled_w1_hu": W1(pooled cohort, pooled reference)}``
    (medians over the scans of each group; the per-scan rows are :meth:`ScanStatistics.row`).
    """
    if not reference:
        raise InputError("the reference holds no scan")
    pool = _pool([r.lung_hu for r in reference])
    for scan in cohort:
        scan.w1_to_reference_hu = float(wasserstein_distance(scan.lung_hu, pool))
    for index, scan in enumerate(reference):
        others = [r.lung_hu for j, r in enumerate(reference) if j != index]
        scan.w1_to_reference_hu = float(wasserstein_distance(scan.lung_hu, _pool(others))) if others else float("nan")
    summary: dict[str, Any] = {}
    for group, scans in (("cohort", cohort), ("reference", reference)):
        rows = [s.row() for s in scans]
        numeric = [k for k, v in rows[0].items() if isinstance(v, (int, float))] if rows else []
        summary[group] = {k: _spread([r[k] for r in rows]) for k in numeric} | {"scans": len(rows)}
    summary["pooled_w1_hu"] = float(wasserstein_distance(_pool([c.lung_hu for c in cohort]), pool)) if cohort else None
    return summary
