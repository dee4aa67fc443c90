"""Is this volume a chest CT the bundle can use? Checks on its grid and its values, run by every reader path.

:func:`custom_components.io.read_image` (so ``SimpleITKReader``, ``LoadCTd``, every config, MONAI Label and the
Deploy app) runs :func:`check_grid` on the header's size and spacing *before* the voxels are read, and
:func:`check_finite` and :func:`check_ct_values` on the voxels. Each raises
:class:`~custom_components.errors.InputError` naming the file and the problem; a coarse but usable grid only warns
(one ``logging`` line).

Thresholds, and why (grid axes are the voxel axes ``(i, j, k)``; extent = voxels x spacing along an axis):

* :data:`MAX_SPACING_MM` 10 mm, refused above: no CT is reconstructed with thicker slices or coarser pixels; a
  larger spacing is a wrong header (a scan whose ``ElementSpacing`` was multiplied by 20 resampled to a 417 GiB
  array before this check).
* :data:`COARSE_SPACING_MM` 5 mm, warned above: LUNA16 keeps scans with slices <= 2.5 mm; at 5-10 mm a nodule of
  3-10 mm spans one or two slices and may be missed.
* :data:`MAX_EXTENT_MM` 2000 mm per axis and :data:`MAX_VOLUME_L` 1000 litres for the whole box, refused above:
  a whole-body CT is about 500 x 500 x 2000 mm (500 l). The bound is what keeps the 1 mm resampling of the
  preprocessing from allocating more than 10^9 voxels (4 GB of float32).
* :data:`MIN_EXTENT_MM` 100 mm per axis, refused below (``check_size=False`` turns it off): a chest CT covers both
  lungs, over 250 mm across and 150 mm head-to-foot in an adult, and the detector's largest regression anchor is
  40 mm. Less than 100 mm along an axis is a handful of slices, a localiser or a biopsy-guidance stack, or a
  squeezed geometry. It also bounds the voxel count from below: with slices <= 10 mm, at least 10 per axis.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from custom_components.errors import InputError

__all__ = [
    "AIR_MAX_HU",
    "COARSE_SPACING_MM",
    "MAX_EXTENT_MM",
    "MAX_SPACING_MM",
    "MAX_VOLUME_L",
    "MIN_EXTENT_MM",
    "check_ct_values",
    "check_finite",
    "check_grid",
    "refuse_non_finite",
]

logger = logging.getLogger(__name__)

COARSE_SPACING_MM = 5.0
MAX_SPACING_MM = 10.0
MAX_EXTENT_MM = 2000.0
MAX_VOLUME_L = 1000.0
MIN_EXTENT_MM = 100.0

# "Is this a CT in Hounsfield units?": a CT holds air (about -1000 HU; lungs and the air around the body) and
# something denser than air. No voxel below AIR_MAX_HU means the values are not HU (MRI, CT stored without its
# rescale intercept, a label map); a maximum below AIR_MAX_HU means the volume holds nothing but air or padding.
AIR_MAX_HU = -500.0


def _mm(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.4g}" for v in values) + " mm"


def check_grid(path: str | os.PathLike, size: Sequence[int], spacing: Sequence[float], check_size: bool = True) -> None:
    """Refuse a grid that is absurd, too large to resample or (with ``check_size``) too small for a chest CT.

    Args:
        path: the file, for the message.
        size: voxels per axis ``(I, J, K)``.
        spacing: mm per voxel along ``(i, j, k)``.
        check_size: also refuse an extent below :data:`MIN_EXTENT_MM` along any axis.

    Warns (one line) when a spacing exceeds :data:`COARSE_SPACING_MM`. See the module docstring for the thresholds.
    """
    size_a = np.asarray(size, dtype=np.float64)
    spacing_a = np.asarray(spacing, dtype=np.float64)
    shape = "x".join(str(int(n)) for n in size)
    if not np.all(np.isfinite(spacing_a)) or np.any(spacing_a <= 0):
        raise InputError(f"{path}: voxel spacing {tuple(spacing)} mm is not positive (a broken header)")
    if spacing_a.max() > MAX_SPACING_MM:
        raise InputError(
            f"{path}: voxel spacing {_mm(spacing_a)} is coarser than any CT (at most {MAX_SPACING_MM:g} mm per "
            "voxel accepted; a wrong spacing in the header?)"
        )
    extent = size_a * spacing_a
    volume_l = float(np.prod(extent)) / 1e6
    if extent.max() > MAX_EXTENT_MM or volume_l > MAX_VOLUME_L:
        raise InputError(
            f"{path}: {shape} voxels of {_mm(spacing_a)} cover {_mm(extent)} ({volume_l:.4g} l), larger than any "
            f"body (at most {MAX_EXTENT_MM:g} mm per axis and {MAX_VOLUME_L:g} l accepted; a wrong spacing in the "
            "header?)"
        )
    if check_size and extent.min() < MIN_EXTENT_MM:
        axis = int(np.argmin(extent))
        raise InputError(
            f"{path}: covers only {extent[axis]:.4g} mm along {'ijk'[axis]} ({int(size_a[axis])} voxels of "
            f"{spacing_a[axis]:.4g} mm; {shape} voxels in all), too small for a chest CT (at least "
            f"{MIN_EXTENT_MM:g} mm along every axis)"
        )
    if spacing_a.max() > COARSE_SPACING_MM:
        logger.warning(
            "%s: voxel spacing %s is coarser than %g mm: nodules smaller than about twice the spacing may be missed",
            path,
            _mm(spacing_a),
            COARSE_SPACING_MM,
        )


def refuse_non_finite(path: str | os.PathLike, n_nan: int, n_inf: int, total: int, hits: Sequence[np.ndarray]) -> None:
    """Raise the :class:`InputError` for ``n_nan`` NaN and ``n_inf`` infinite voxels among ``total``;
    ``hits[a]`` are the sorted indices along voxel axis ``a`` of ``(i, j, k)`` holding any of them (their bounding
    box goes into the message)."""
    kinds = " and ".join(text for n, text in ((n_nan, f"{n_nan} NaN"), (n_inf, f"{n_inf} infinite")) if n)
    if n_nan + n_inf == total:
        raise InputError(f"{path}: all {total} voxels are NaN or infinite ({kinds}): the volume holds no values")
    box = ", ".join(f"{name} {hit[0]}..{hit[-1]}" for name, hit in zip("ijk", hits))
    raise InputError(
        f"{path}: {kinds} voxels of {total}, within voxels {box}: the values are broken there "
        "(the detector would see no tissue)"
    )


def check_finite(array: np.ndarray, path: str | os.PathLike) -> None:
    """Refuse a float volume holding NaN or infinite voxels; ``array`` is SimpleITK's ``(K, J, I)`` view.

    The message gives the count and their bounding box in voxel indices ``(i, j, k)``. One sum over the volume
    decides (a NaN or infinity anywhere makes the sum non-finite), so a clean scan pays a single pass, and integer
    volumes (every LUNA16 scan) nothing.
    """
    if not np.issubdtype(array.dtype, np.floating):
        return
    if np.isfinite(np.sum(array)):
        return
    bad = ~np.isfinite(array)
    count = int(np.count_nonzero(bad))
    if count == 0:
        return  # the float32 sum overflowed on finite values; nothing to refuse
    n_nan = int(np.count_nonzero(np.isnan(array)))
    hits = [np.flatnonzero(bad.any(axis=tuple(a for a in range(3) if a != axis))) for axis in (2, 1, 0)]
    refuse_non_finite(path, n_nan, count - n_nan, array.size, hits)


def check_ct_values(array: np.ndarray, path: str | os.PathLike) -> None:
    """Raise :class:`InputError` unless ``array`` looks like a CT in Hounsfield units (see :data:`AIR_MAX_HU`).

    The rule runs on every second voxel per axis: the statistics it needs (is there air, is there anything denser)
    do not need every voxel, and it keeps the check at a few milliseconds for a 512 x 512 x 300 scan. NaN never
    passes: a non-finite minimum or maximum hands over to :func:`check_finite`, which refuses.
    """
    sample = array[tuple(slice(None, None, 2) for _ in range(array.ndim))]
    low, high = float(sample.min()), float(sample.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        check_finite(array, path)
        raise InputError(f"{path}: values are not finite (range [{low:g}, {high:g}])")
    if low < AIR_MAX_HU <= high:
        return
    low, high = float(array.min()), float(array.max())  # the exact range, for the message
    if low >= AIR_MAX_HU:
        raise InputError(
            f"{path}: values are not CT Hounsfield units (range [{low:g}, {high:g}], no air below {AIR_MAX_HU:g} HU; "
            "an MRI, or a CT saved without its rescale intercept?)"
        )
    if high < AIR_MAX_HU:
        raise InputError(f"{path}: values are not a CT in Hounsfield units (range [{low:g}, {high:g}]: only air)")
