"""Reading one DICOM series with SimpleITK, and checking that its slices lie where the volume puts them.

SimpleITK (GDCM sorting, ITK's ``ImageSeriesReader``) places slice ``k`` of the volume at ``origin + k * spacing``
along the slice normal, with the spacing taken from the first and last slice, and only prints a C++ warning when
the files disagree. A duplicated slice makes GDCM give up sorting (the slices come in file-name order, the spacing
comes out as 0.244 mm and the scan is squeezed into 33 mm); a missing slice moves every slice by up to half a slice.
:func:`read_dicom_series` compares every slice's ``ImagePositionPatient`` with where the volume puts it and refuses
duplicates, gaps, uneven spacing and positions off the slice normal (a tilted gantry), naming the positions; with
``resample_slices=True`` it instead interpolates the slices, at their true positions, onto a uniform grid and warns.

Positions are LPS world mm; "position" of a slice means its ``ImagePositionPatient`` projected on the slice normal
``row x column`` of ``ImageOrientationPatient`` (the z coordinate for an axial series).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from custom_components.errors import InputError

__all__ = ["SLICE_TOLERANCE", "check_slice_positions", "find_dicom_series", "read_dicom_series"]

logger = logging.getLogger(__name__)

#: A slice may lie at most this fraction of the slice spacing from where the volume puts it (0.25 mm for 2.5 mm
#: slices): DICOM positions are decimal strings rounded to ~1e-3 mm, far below it, while a missing slice shifts
#: slices by up to half the spacing and a duplicate by a whole one. Below it the error stays under a quarter of the
#: 1 mm grid the detector sees.
SLICE_TOLERANCE = 0.1

_POSITION, _ORIENTATION = "0020|0032", "0020|0037"
_LISTED = 4  # positions named in a message before "..."


def find_dicom_series(folder: Path) -> dict[str, list[str]]:
    """SeriesInstanceUID -> slice files (GDCM's order) of every DICOM series in ``folder`` or, if none, in its
    sub-folders."""
    series: dict[str, list[str]] = {}
    # only folders holding files: GDCM prints a warning for every folder it finds no series in
    folders = sorted((Path(root) for root, _, files in os.walk(folder) if files), key=lambda p: (p != folder, p))
    for sub in folders:
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(sub)):
            series.setdefault(uid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(sub), uid)))
        if sub == folder and series:
            break
    return series


def _floats(reader: sitk.ImageSeriesReader, index: int, tag: str, count: int, folder: Path, name: str) -> list:
    values = reader.GetMetaData(index, tag).split("\\") if reader.HasMetaDataKey(index, tag) else []
    try:
        out = [float(v) for v in values]
    except ValueError:
        out = []
    if len(out) != count:
        label = "ImagePositionPatient" if tag == _POSITION else "ImageOrientationPatient"
        raise InputError(f"{folder}: DICOM slice {name} has no valid {label} ({tag}): where it lies is unknown")
    return out


def _listing(values: list[str]) -> str:
    return ", ".join(values[:_LISTED]) + (f" and {len(values) - _LISTED} more" if len(values) > _LISTED else "")


def check_slice_positions(
    folder: Path, uid: str, image: sitk.Image, positions: np.ndarray, orientations: np.ndarray, names: list[str],
    resample_slices: bool = False,
) -> sitk.Image:  # fmt: skip
    """Return ``image`` if every slice lies where it puts it, else refuse, or resample with ``resample_slices``.

    Args:
        folder, uid: for the messages.
        image: SimpleITK's volume of the series, slice ``k`` from file ``names[k]``.
        positions: ``(K, 3)`` ImagePositionPatient of each slice (LPS mm), in the order of ``image``'s slices.
        orientations: ``(K, 6)`` ImageOrientationPatient of each slice.
        names: the slice files' names, in the same order.
        resample_slices: interpolate the slices onto a uniform grid at their true positions (and warn) instead of
            refusing duplicates, gaps and uneven spacing.

    Raises:
        InputError: naming the positions; slices of different orientations or off the slice normal are refused
            even with ``resample_slices`` (interpolating them would need an in-plane shift per slice).
    """
    label = f"{folder}: DICOM series {uid}"
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        odd = _listing([names[k] for k in np.flatnonzero(np.abs(orientations - orientations[0]).max(axis=1) > 1e-4)])
        raise InputError(
            f"{label}: its slices have different orientations (ImageOrientationPatient of {odd} differs from "
            f"{names[0]}'s); one volume cannot hold them"
        )
    row, col = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    ordered = along[order]
    gaps = np.diff(ordered)
    spacing = float(np.median(gaps[gaps > 0])) if np.any(gaps > 0) else 0.0
    if spacing <= 0:
        raise InputError(f"{label}: all {len(names)} slices lie at the same position {ordered[0]:.4g} mm")
    tolerance = SLICE_TOLERANCE * spacing
    off_normal = positions - positions[order[0]] - np.outer(along - ordered[0], normal)
    drift = np.linalg.norm(off_normal, axis=1)
    if drift.max() > tolerance:
        k = int(np.argmax(drift))
        raise InputError(
            f"{label}: slice positions do not follow the slice normal ({names[k]} lies {drift[k]:.3g} mm beside "
            f"it: a tilted gantry?); this reader cannot place such slices"
        )
    # where SimpleITK's volume puts slice k (origin + k * spacing along its third axis) against where it lies
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    grid = np.asarray(image.GetOrigin()) + np.outer(np.arange(len(names)) * image.GetSpacing()[2], direction[:, 2])
    misplaced = np.linalg.norm(grid - positions, axis=1)
    problems = []
    duplicates = np.flatnonzero(gaps < tolerance)
    if duplicates.size:
        problems.append(
            f"{duplicates.size} duplicated position(s) "
            + _listing([f"{ordered[d]:.4g} mm ({names[order[d]]}, {names[order[d + 1]]})" for d in duplicates])
        )
    missing = np.flatnonzero(gaps > 1.5 * spacing)
    if missing.size:
        problems.append(
            f"{missing.size} gap(s) where slices are missing, "
            + _listing([f"{ordered[g]:.4g} to {ordered[g + 1]:.4g} mm" for g in missing])
        )
    uneven = np.flatnonzero((np.abs(gaps - spacing) > tolerance) & (gaps >= tolerance) & (gaps <= 1.5 * spacing))
    if uneven.size:
        problems.append(
            "uneven spacing, "
            + _listing([f"{gaps[u]:.4g} mm from {ordered[u]:.4g} to {ordered[u + 1]:.4g} mm" for u in uneven])
        )
    if problems:
        summary = (
            f"slice positions along the slice normal are not uniform ({spacing:.4g} mm apart elsewhere): "
            + "; ".join(problems)
        )
        if not resample_slices:
            raise InputError(
                f"{label}: {summary}; read as one volume, slices would be misplaced by up to "
                f"{misplaced.max():.3g} mm. Fix the series, or read it with resample_slices=True to interpolate "
                "the slices onto a uniform grid"
            )
        axes = np.column_stack([row, col, normal])
        return _resample(label, image, positions, along, order, axes, spacing, tolerance, summary)
    if misplaced.max() > tolerance:  # uniform positions, yet not in the volume's order
        k = int(np.argmax(misplaced))
        raise InputError(
            f"{label}: SimpleITK placed slice {names[k]} {misplaced[k]:.3g} mm away from its ImagePositionPatient "
            "(slices out of order?); read as one volume, slices would be misplaced"
        )
    return image


def _resample(
    label: str, image: sitk.Image, positions: np.ndarray, along: np.ndarray, order: np.ndarray, axes: np.ndarray,
    spacing: float, tolerance: float, summary: str,
) -> sitk.Image:  # fmt: skip
    """The slices of ``image`` (slice ``k`` at ImagePositionPatient ``positions[k]``, ``along[k]`` mm on the slice
    normal) linearly interpolated onto a uniform grid from the first to the last position, about ``spacing`` mm
    apart; ``axes`` ``(3, 3)`` holds row, column and normal as columns. Identical duplicates are dropped."""
    voxels = sitk.GetArrayViewFromImage(image)  # (K, J, I)
    keep = [int(order[0])]
    for k in order[1:]:
        if along[k] - along[keep[-1]] >= tolerance:
            keep.append(int(k))
        elif not np.array_equal(voxels[k], voxels[keep[-1]]):
            raise InputError(
                f"{label}: two different slices lie at the same position {along[k]:.4g} mm; which one is right is "
                "unknown, so resample_slices cannot fix it"
            )
    source = along[keep]
    span = source[-1] - source[0]
    count = round(span / spacing) + 1
    step = span / (count - 1)
    target = source[0] + step * np.arange(count)
    upper = np.clip(np.searchsorted(source, target, side="right"), 1, len(source) - 1)
    out = np.empty((count, *voxels.shape[1:]), dtype=voxels.dtype)
    for m in range(count):
        low, high = keep[upper[m] - 1], keep[upper[m]]
        below, above = target[m] - source[upper[m] - 1], source[upper[m]] - target[m]
        if below < 1e-3 or above < 1e-3:  # on a slice: its voxels unchanged
            out[m] = voxels[low] if below < 1e-3 else voxels[high]
            continue
        mixed = (above * voxels[low].astype(np.float32) + below * voxels[high].astype(np.float32)) / (below + above)
        out[m] = np.rint(mixed) if np.issubdtype(out.dtype, np.integer) else mixed
    resampled = sitk.GetImageFromArray(out)
    resampled.SetSpacing((*image.GetSpacing()[:2], step))
    resampled.SetOrigin(tuple(positions[keep[0]]))
    resampled.SetDirection(tuple(axes.ravel()))
    logger.warning(
        "%s: %s; resampled its %d slices at their true positions onto %d slices %.4g mm apart (resample_slices)",
        label, summary, len(along), count, step,
    )  # fmt: skip
    return resampled


def read_dicom_series(
    folder: Path, series_uid: str | None = None, resample_slices: bool = False
) -> tuple[sitk.Image, str]:
    """Read one DICOM series of ``folder`` (searched recursively) and check its slice positions.

    Args:
        folder: a folder holding the series, or above it.
        series_uid: the SeriesInstanceUID to read when there are several.
        resample_slices: see :func:`check_slice_positions`.

    Returns:
        The volume (slice axis ``k`` along the slice normal, LPS geometry) and its SeriesInstanceUID.
    """
    series = find_dicom_series(folder)
    if not series:
        raise InputError(f"{folder}: no DICOM series found in this folder or its sub-folders")
    if series_uid is None:
        if len(series) > 1:
            listing = ", ".join(f"{uid} ({len(files)} slices)" for uid, files in sorted(series.items()))
            raise InputError(f"{folder}: holds {len(series)} DICOM series, choose one with series_uid: {listing}")
        series_uid = next(iter(series))
    elif series_uid not in series:
        raise InputError(f"{folder}: no DICOM series {series_uid}; found {', '.join(sorted(series))}")
    files = series[series_uid]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's tags, read with its pixels: no second pass over files
    # ITK's multi-line C++ "non uniform sampling" warning is replaced by check_slice_positions' message
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        image = reader.Execute()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
    if len(files) < 2 or image.GetDimension() != 3:
        return image, series_uid
    names = [Path(f).name for f in files]
    positions = np.array([_floats(reader, k, _POSITION, 3, folder, names[k]) for k in range(len(files))])
    orientations = np.array([_floats(reader, k, _ORIENTATION, 6, folder, names[k]) for k in range(len(files))])
    return check_slice_positions(folder, series_uid, image, positions, orientations, names, resample_slices), series_uid
