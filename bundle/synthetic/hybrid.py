"""A hybrid cohort: real chest CT backgrounds, each varied into many scans, with synthetic nodules inserted.

For each output scan, one background (a real chest CT) is

1. **varied**: resampled through a similarity transform (left-right flip, rotation of up to 8 degrees about z and 3
   about x and y, isotropic scaling 0.92-1.08) onto a new axis-aligned grid: in-plane spacing 1.0-1.2 times the
   background's (at least ``in_plane_mm``), a slice spacing drawn from the background's own and the standard 1.25,
   1.5, 2, 2.5, 3 and 5 mm that are thicker (thicker slices are made by averaging the background over the new slice
   thickness first), and a field of view cropped to the lungs plus 5-25 mm in-plane and, along z, to a window of at
   most ``max_size_mm`` placed at random within the lungs;
2. **searched** for its own lesions (:func:`find_own_lesions`), which become excluded findings and are kept clear of
   insertions, together with the background's own LUNA16 nodules and excluded findings (found by seriesuid in the
   given tables);
3. given **nodules** drawn from LUNA16's size distribution (``nodules.py``): solid, part-solid and ground-glass;
   round, lobulated or spiculated; free in the parenchyma, juxta-pleural (touching the real pleura) or juxta-vascular
   (touching a real vessel: a dense structure inside the lung), each placed by the scan's own distance maps; and
4. **imaged**: each nodule is inserted with :func:`bundle.synthetic.insertion.insert_lesion` using the PSF,
   slice thickness and noise measured on the varied scan itself.

The cohort is written in LUNA16's layout, as ``python -m bundle synth`` writes (``cohort.py``): ``subsetK/<uid>.mhd``
+ ``.raw``, ``annotations.csv``, ``annotations_excluded.csv``, ``seriesuids.csv``. Coordinates are LPS world mm of
the output scan. Arrays are numpy in SimpleITK order ``(k, j, i)``.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from bundle.synthetic.cohort import CSV_HEADER, HU_RANGE, UID_ROOT, metaimage_header
from bundle.synthetic.insertion import (
    Imaging,
    Lesion,
    estimate_imaging,
    insert_lesion,
    lesion_extent,
)
from bundle.synthetic.nodules import make_nodule, sample_diameters, sample_nodule_count
from bundle.synthetic.parallel import map_scans
from bundle.synthetic.raster import ScanGrid
from custom_components.atomic import atomic_write
from custom_components.errors import InputError
from custom_components.io import affine_from_sitk, read_image
from custom_components.luna16_tables import read_annotations
from custom_components.volume_checks import MIN_EXTENT_MM

__all__ = [
    "HYBRID_UID_ROOT",
    "Background",
    "HybridScan",
    "default_backgrounds",
    "default_tables",
    "load_background",
    "find_own_lesions",
    "lung_region",
    "make_hybrid_scan",
    "generate_hybrid_cohort",
]

#: Series UIDs ``<root>.<seed>.<index>``; one more component than ``synth``'s, so the two never collide.
HYBRID_UID_ROOT = UID_ROOT + ".9"
#: the least z window: the reader's chest floor plus a 5 mm slice at each end, so every output scan reads back
MIN_WINDOW_MM = MIN_EXTENT_MM + 10.0
AIR_HU = -400.0  # lung / soft tissue threshold, as the preprocessing's lung mask (lung_mask.lung_mask)
DENSE_HU = -300.0  # vessels, airway walls, lesions inside the lung (smoothed HU above)
MIN_LUNG_ML = 300.0  # a chest CT shows at least this much lung
OUTPUT_LUNG_ML = 100.0  # a varied (cropped, rescaled) scan keeps at least this much: the preprocessing's own floor
MIN_FOV_MM = 120.0  # smallest in-plane field of view of a chest CT
SLICE_SPACINGS_MM = (1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
KIND_P = {"solid": 0.6, "part-solid": 0.2, "ground-glass": 0.2}  # nodules of 6 mm and more
ATTACHMENT_P = {"free": 0.4, "juxta-pleural": 0.3, "juxta-vascular": 0.3}  # nodules of 5 mm and more
_IN_SLICE = np.array([[[0, 0, 0], [0, 0, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]], [[0] * 3] * 3], bool)


@dataclass
class Background:
    """A real chest CT: ``image`` int16 HU ``(k, j, i)``; ``affine`` maps ``(i, j, k, 1)`` to LPS mm; ``nodules``,
    ``excluded`` (from the LUNA16 tables, by seriesuid) and ``own_lesions`` (found, :func:`find_own_lesions`) are
    rows ``[x, y, z, d]`` in its LPS mm (``d = -1``: size unknown); ``avoid`` the same for every compact dense
    structure insertions keep clear of; ``lung_box`` the lungs' ``(lo, hi)`` LPS mm."""

    path: str
    seriesuid: str | None
    image: np.ndarray
    affine: np.ndarray
    thickness_mm: float
    lung_box: tuple[np.ndarray, np.ndarray]
    nodules: list[list[float]] = field(default_factory=list)
    excluded: list[list[float]] = field(default_factory=list)
    own_lesions: list[list[float]] = field(default_factory=list)
    avoid: list[list[float]] = field(default_factory=list)


@dataclass
class HybridScan:
    """One output scan: ``image`` int16 ``(k, j, i)`` on ``grid``; ``nodules`` (inserted and the background's own,
    carried) and ``excluded`` rows ``[x, y, z, d]`` in its LPS mm; ``lesions`` the inserted ones with ``attachments``;
    ``imaging`` what was measured on it; ``variation`` how it was made from ``background``."""

    seriesuid: str
    subset: int
    grid: ScanGrid
    image: np.ndarray
    nodules: list[list[float]]
    excluded: list[list[float]]
    lesions: list[Lesion]
    imaging: Imaging
    background: str
    variation: dict


def default_backgrounds(repo_root: str | os.PathLike) -> list[Path]:
    """The shared real scans next to the repository: ``../shared/data/lidc/*.mhd`` (LIDC-IDRI-0001, -0002) and
    ``../shared/data/backgrounds/*/image.mhd``; empty when absent."""
    shared = Path(repo_root).resolve().parent / "shared" / "data"
    return sorted((shared / "lidc").glob("*.mhd")) + sorted((shared / "backgrounds").glob("*/image.mhd"))


def default_tables(repo_root: str | os.PathLike) -> tuple[Path | None, Path | None]:
    """LUNA16's ``annotations.csv`` and ``annotations_excluded.csv`` in ``../shared/data/lidc``, None when absent."""
    lidc = Path(repo_root).resolve().parent / "shared" / "data" / "lidc"
    tables = (lidc / "annotations.csv", lidc / "annotations_excluded.csv")
    return tuple(p if p.is_file() else None for p in tables)  # type: ignore[return-value]


def _enclosed_air(volume: np.ndarray, spacing: np.ndarray, min_ml: float = MIN_LUNG_ML) -> np.ndarray | None:
    """The lungs as air: the one or two largest components below :data:`AIR_HU` not touching the in-plane border
    (the preprocessing's rule, ``lung_mask.lung_mask``), holes filled per slice (vessels, central nodules), no hull.
    ``volume`` ``(k, j, i)``, ``spacing`` ``(z, y, x)`` mm. None when they hold under ``min_ml``."""
    labels, count = ndimage.label(volume < AIR_HU)
    if count == 0:
        return None
    border = np.unique(np.concatenate([labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()]))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    sizes[border] = 0
    order = np.argsort(sizes)[::-1][:2]
    keep = [order[0]] + ([order[1]] if count > 1 and sizes[order[1]] >= 0.2 * sizes[order[0]] else [])
    if sizes[keep].sum() * np.prod(spacing) / 1000.0 < min_ml:
        return None
    return ndimage.binary_fill_holes(np.isin(labels, keep), structure=_IN_SLICE)


def lung_region(lungs: np.ndarray, spacing: np.ndarray, radius_mm: float = 20.0) -> np.ndarray:
    """``lungs`` closed per slice by a disc of ``radius_mm``: adds what lies in the lungs' in-plane concavities
    narrower than the disc, i.e. pleural-based lesions up to about its diameter (and the hilum). Distance transforms
    with a huge z spacing do the 2D closing in one call. ``spacing`` ``(z, y, x)`` mm."""
    planar = (1e6, float(spacing[1]), float(spacing[2]))
    out = np.zeros_like(lungs)
    if not lungs.any():
        return out
    # only the lungs' box (plus the disc's reach) can change: the transforms run on that box alone
    reach = [0] + [int(np.ceil(radius_mm / s)) + 2 for s in spacing[1:]]
    box = tuple(
        slice(max(int(idx.min()) - r, 0), int(idx.max()) + r + 1) for idx, r in zip(np.nonzero(lungs), reach)
    )
    dilated = ndimage.distance_transform_edt(~lungs[box], sampling=planar) <= radius_mm
    out[box] = ndimage.distance_transform_edt(dilated, sampling=planar) > radius_mm
    return out


def find_own_lesions(
    volume: np.ndarray, spacing: np.ndarray, lungs: np.ndarray
) -> tuple[list[tuple[np.ndarray, float]], list[tuple[np.ndarray, float]]]:
    """A scan's own unannotated lesions: ``(lesions, compact)``, each ``(centre (z, y, x) mm from voxel 0, diameter
    mm)``.

    Dense tissue (smoothed HU above :data:`DENSE_HU`) in :func:`lung_region` is reduced to its cores (points at least
    4 mm inside it: structures 8 mm thick or more, thicker than all but the central vessels). A core is **compact**
    when its length (``sqrt(12 * largest variance)`` of its points, the length of a uniform rod) is at most 1.5 times
    its thickness: a blob, not a vessel. A compact core is a **lesion** when at least 60 % of a shell 1.5-5 mm
    around its dense blob is aerated lung (a nodule or mass inside or against the lung); compact cores with less air
    around them are vessel junctions at the hilum or lesions sunk into the chest wall or mediastinum, which cannot be
    told apart here: they are only kept clear of insertions, not excluded. ``volume`` ``(k, j, i)`` HU, ``spacing``
    ``(z, y, x)`` mm, ``lungs`` from :func:`_enclosed_air`.
    """
    region = lung_region(lungs, spacing)
    dense = region & (volume > DENSE_HU)
    inside = ndimage.distance_transform_edt(dense, sampling=spacing)
    labels, _ = ndimage.label(inside >= 4.0)
    lesions, compact = [], []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        core = labels[box] == index
        points = (np.argwhere(core) + [b.start for b in box]) * spacing
        thickness = 2.0 * float(inside[box][core].max())
        length = float(np.sqrt(12.0 * max(np.linalg.eigvalsh(np.cov(points.T))[-1], 0.0))) if len(points) > 3 else 0
        if thickness < 8.0 or length > 1.5 * thickness:
            continue
        margin = int(np.ceil((thickness / 2 + 6.0) / spacing.min()))
        wide = tuple(slice(max(b.start - margin, 0), b.stop + margin) for b in box)
        near_core = ndimage.distance_transform_edt(labels[wide] != index, sampling=spacing) <= thickness / 2 + 1.0
        blob = dense[wide] & near_core
        shell_distance = ndimage.distance_transform_edt(~blob, sampling=spacing)
        shell = (shell_distance > 1.5) & (shell_distance <= 5.0)
        centre = points.mean(axis=0)
        diameter = 2.0 * (3.0 * blob.sum() * np.prod(spacing) / (4.0 * np.pi)) ** (1 / 3)
        compact.append((centre, max(diameter, thickness)))
        if shell.any() and float((volume[wide][shell] < AIR_HU).mean()) >= 0.6:
            lesions.append((centre, max(diameter, thickness)))
    return lesions, compact


def _coarse(image: np.ndarray, spacing_xy: float, target_mm: float = 2.0) -> tuple[np.ndarray, int]:
    """Block mean over ``s x s`` in-plane (``s = round(target_mm / spacing)``), float32 ``(k, j // s, i // s)``."""
    s = max(1, int(round(target_mm / spacing_xy)))
    k, j, i = image.shape
    blocks = image[:, : j // s * s, : i // s * s].reshape(k, j // s, s, i // s, s)
    return blocks.mean(axis=(2, 4), dtype=np.float32), s


def load_background(
    path: str | os.PathLike,
    annotations: dict[str, np.ndarray] | None = None,
    excluded: dict[str, np.ndarray] | None = None,
) -> Background:
    """Read a real chest CT and analyse it once: its lungs, its own lesions, its LUNA16 rows (by seriesuid).

    Raises:
        InputError: unreadable file (:func:`custom_components.io.read_image`'s message); not a chest CT (values
            not Hounsfield units, a field of view under :data:`MIN_FOV_MM` or under 30 mm along z); no lungs (no
            air enclosed by the body of at least :data:`MIN_LUNG_ML`).
    """
    loaded = read_image(path, check_hu=False)
    image = loaded.image
    array = np.asarray(sitk.GetArrayFromImage(image), dtype=np.int16)  # (k, j, i); CT stores 12-16 bit integers
    affine = affine_from_sitk(image)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    low, high = float(array.min()), float(array.max())
    if not low < AIR_HU < high:
        raise InputError(
            f"{path}: not a chest CT (values {low:g}..{high:g} are not CT Hounsfield units: a chest CT holds air "
            f"below {AIR_HU:g} HU and tissue above)"
        )
    extent = spacing * (np.asarray(image.GetSize()) - 1)
    if min(extent[0], extent[1]) < MIN_FOV_MM or extent[2] < 30.0:
        raise InputError(
            f"{path}: not a chest CT (field of view {extent[0]:.0f} x {extent[1]:.0f} x {extent[2]:.0f} mm; a chest "
            f"CT covers at least {MIN_FOV_MM:g} mm in-plane and 30 mm along z)"
        )
    if not np.allclose(np.abs(np.asarray(image.GetDirection()).reshape(3, 3)), np.eye(3), atol=1e-3):
        raise InputError(f"{path}: not an axial scan (direction {image.GetDirection()}); give an axial chest CT")
    coarse, s = _coarse(array, spacing[0])
    coarse_spacing = np.array([spacing[2], spacing[1] * s, spacing[0] * s])
    lungs = _enclosed_air(coarse, coarse_spacing)
    if lungs is None:
        raise InputError(
            f"{path}: no lungs (no air component of at least {MIN_LUNG_ML:g} ml below {AIR_HU:g} HU enclosed by the "
            "body); give a chest CT"
        )
    step = np.diag(affine[:3, :3])  # axis-aligned (checked above): signed spacing per axis

    def to_world(kji: np.ndarray) -> np.ndarray:
        """Coarse voxel ``(k, j, i)`` (fractional) -> LPS mm; a coarse voxel is the mean of ``s`` full ones."""
        kji = np.asarray(kji, dtype=float)
        full = np.array([kji[2] * s + 0.5 * (s - 1), kji[1] * s + 0.5 * (s - 1), kji[0]])
        return affine[:3, 3] + full * step

    k, j, i = np.nonzero(lungs)
    corners = np.array([to_world((k.min(), j.min(), i.min())), to_world((k.max(), j.max(), i.max()))])
    pad = np.array([s * spacing[0], s * spacing[1], 0.0])
    lung_box = (corners.min(axis=0) - pad, corners.max(axis=0) + pad)
    lesions, compact = find_own_lesions(ndimage.uniform_filter(coarse, (1, 3, 3)), coarse_spacing, lungs)
    uid = loaded.seriesuid
    background = Background(
        path=str(path),
        seriesuid=uid,
        image=array,
        affine=affine,
        thickness_mm=float(spacing[2]),
        lung_box=(np.asarray(lung_box[0]), np.asarray(lung_box[1])),
        nodules=[[float(v) for v in r] for r in (annotations or {}).get(uid or "", [])],
        excluded=[[float(v) for v in r] for r in (excluded or {}).get(uid or "", [])],
    )
    for centre, diameter in lesions:
        world = to_world(centre / coarse_spacing)
        if all(np.linalg.norm(world - r[:3]) > max(r[3], 10.0) for r in background.nodules):
            background.own_lesions.append([*world, diameter])
    background.avoid = [[*to_world(c / coarse_spacing), d] for c, d in compact]
    return background


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """Rotation matrix: up to 8 degrees about z, 3 about x and y (a patient lying a little differently)."""
    ax, ay, az = np.radians(rng.uniform([-3, -3, -8], [3, 3, 8]))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _vary(
    background: Background, rng: np.random.Generator, max_size_mm: float | None, in_plane_mm: float
) -> tuple[np.ndarray, ScanGrid, np.ndarray, np.ndarray, dict]:
    """Resample the background through a random similarity onto a new grid (see the module docstring).

    Returns ``(volume float32 (k, j, i), grid, matrix, centre, variation)``: output world ``w`` maps to background
    world ``centre + matrix @ (w - centre)``.
    """
    flip = bool(rng.random() < 0.5)
    scale = float(rng.uniform(0.92, 1.08))
    matrix = _rotation(rng) @ np.diag([-1.0 if flip else 1.0, 1.0, 1.0]) * scale
    lo, hi = background.lung_box
    centre = 0.5 * (lo + hi)
    spacing_bg = np.abs(np.diag(background.affine[:3, :3]))
    slice_mm = float(rng.choice([spacing_bg[2]] + [s for s in SLICE_SPACINGS_MM if s > spacing_bg[2] * 1.05]))
    pixel_mm = max(float(spacing_bg[0] * rng.uniform(1.0, 1.2)), in_plane_mm)
    # the lungs' box in output world: the background box's corners through the inverse similarity
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    out_corners = centre + (corners - centre) @ np.linalg.inv(matrix).T
    box_lo, box_hi = out_corners.min(axis=0), out_corners.max(axis=0)
    margin = rng.uniform(5.0, 25.0, size=(2, 2))
    box_lo[:2] -= margin[0]
    box_hi[:2] += margin[1]
    # stay inside the background along z (less the tilt of the rotation over the field of view): beyond it there
    # is nothing to resample, and a slab of padding would join the lungs to the air around the body
    z_first = background.affine[2, 3]
    z_last = z_first + background.affine[2, 2] * (background.image.shape[0] - 1)
    tilt = 0.06 * float(np.max(box_hi[:2] - box_lo[:2])) + spacing_bg[2]
    box_lo[2] = max(box_lo[2], min(z_first, z_last) + tilt)
    box_hi[2] = min(box_hi[2], max(z_first, z_last) - tilt)
    height = box_hi[2] - box_lo[2]
    if max_size_mm is not None and height > max_size_mm:
        box_lo[2] = box_lo[2] + rng.uniform(0.0, height - max_size_mm)
        box_hi[2] = box_lo[2] + max_size_mm
    size = np.maximum(np.ceil((box_hi - box_lo) / [pixel_mm, pixel_mm, slice_mm]).astype(int) + 1, 2)
    grid = ScanGrid(
        size=tuple(int(n) for n in size),
        spacing=(pixel_mm, pixel_mm, slice_mm),
        origin=tuple(float(v) for v in box_lo),
    )
    source = background.image.astype(np.float32)
    thickness = background.thickness_mm
    if slice_mm > thickness * 1.05:  # thicker slices: average the background over the new slice thickness
        source = ndimage.uniform_filter1d(source, max(1, int(round(slice_mm / spacing_bg[2]))), axis=0)
        thickness = slice_mm
    # output index (i, j, k) -> output world -> background world -> background index, in (k, j, i) order for scipy
    to_index = np.linalg.inv(background.affine)
    world_of_out = np.eye(4)
    world_of_out[:3, :3] = matrix @ np.diag(grid.spacing)
    world_of_out[:3, 3] = centre + matrix @ (np.asarray(grid.origin) - centre)
    ijk = to_index @ world_of_out
    flip_axes = np.eye(4)[[2, 1, 0, 3]]
    kji = flip_axes @ ijk @ flip_axes
    volume = ndimage.affine_transform(
        source, kji[:3, :3], kji[:3, 3], output_shape=grid.shape, order=1, mode="nearest",
    )  # fmt: skip
    variation = {
        "flip": flip, "scale": round(scale, 4), "slice_mm": slice_mm, "pixel_mm": round(pixel_mm, 4),
        "thickness_mm": round(thickness, 3),
    }  # fmt: skip
    return volume, grid, matrix, centre, variation


def _choose_kind(rng: np.random.Generator, diameter: float) -> str:
    """Solid under 6 mm (a faint ground-glass lesion that small would not be visible), else by :data:`KIND_P`."""
    if diameter < 6.0:
        return "solid"
    return str(rng.choice(list(KIND_P), p=list(KIND_P.values())))


def _spicules(rng: np.random.Generator, centre: np.ndarray, radius: float) -> np.ndarray:
    """4-9 thin tapering spicules from the surface outwards, 0.6-1.1 radii long: ``(n, 8)`` capsules (mm)."""
    n = int(rng.integers(4, 10))
    directions = rng.standard_normal((n, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    start = centre + directions * 0.7 * radius
    end = centre + directions * radius * rng.uniform(1.6, 2.1, size=(n, 1))
    widths = np.clip(radius * rng.uniform(0.12, 0.2, size=n), 0.35, 1.2)
    return np.column_stack([start, end, widths, np.full(n, 0.2)])


def _place(
    rng: np.random.Generator,
    diameter: float,
    attachment: str,
    maps: dict[str, np.ndarray],
    grid: ScanGrid,
    taken: list[tuple[np.ndarray, float]],
) -> np.ndarray | None:
    """A centre (LPS mm) for a nodule of ``diameter`` with ``attachment``, or None after 30 tries.

    ``maps`` (``(k, j, i)`` mm): ``depth`` inside the lungs (distance to the pleura), ``clear`` distance to the
    nearest dense structure (vessel) of the lung. Free: depth >= r + 3, clear >= 0.6 r + 1 (not on a vessel);
    juxta-pleural: depth in [0.55 r, 0.85 r] (the lesion reaches into the chest wall); juxta-vascular: clear in
    [0.5 r, 0.9 r] and depth >= r + 2 (what it touches is a vessel, not the pleura). Never within 3 mm (plus radii)
    of a lesion in ``taken`` (inserted, annotated, excluded or found), nor within r + 2 mm of the grid's ends.
    """
    r = 0.5 * diameter
    depth, clear = maps["depth"], maps["clear"]
    if attachment == "juxta-pleural":
        ok = (depth >= 0.55 * r) & (depth <= max(0.85 * r, 0.55 * r + 1.0)) & (maps["aerated"])
    elif attachment == "juxta-vascular":
        ok = (clear >= 0.5 * r) & (clear <= 0.9 * r) & (depth >= r + 2.0)
    else:
        ok = (depth >= r + 3.0) & (clear >= 0.6 * r + 1.0)
    end_slices = int(np.ceil((r + 2.0) / grid.spacing[2]))
    ok[:end_slices] = False
    ok[len(ok) - end_slices :] = False
    candidates = np.flatnonzero(ok)
    if candidates.size == 0:
        return None
    for _ in range(30):
        k, j, i = np.unravel_index(candidates[rng.integers(candidates.size)], ok.shape)
        centre = np.asarray(grid.origin) + np.array([i, j, k]) * np.asarray(grid.spacing)
        if all(np.linalg.norm(centre - c) > r + other + 3.0 for c, other in taken):
            return centre
    return None


def _site_maps(volume: np.ndarray, grid: ScanGrid) -> dict[str, np.ndarray] | None:
    """Distance maps for placement (see :func:`_place`); None when the varied scan shows no lungs."""
    spacing = np.asarray(grid.spacing)[::-1]
    lungs = _enclosed_air(volume, spacing, min_ml=OUTPUT_LUNG_ML)
    if lungs is None:
        return None
    smooth = ndimage.gaussian_filter(volume, (0.0, 1.0, 1.0))
    dense = lungs & (smooth > DENSE_HU)
    return {
        "depth": ndimage.distance_transform_edt(lungs, sampling=spacing).astype(np.float32),
        "clear": ndimage.distance_transform_edt(~dense, sampling=spacing).astype(np.float32),
        "aerated": smooth < -600.0,
    }


def make_hybrid_scan(
    background: Background,
    seed: int,
    index: int,
    max_size_mm: float | None = None,
    in_plane_mm: float = 0.0,
) -> HybridScan:
    """Scan ``index`` of the hybrid cohort ``seed`` from ``background``; depends on nothing else.

    Args:
        background: the real scan (:func:`load_background`).
        seed, index: the scan's generator is seeded with ``(seed, index)``.
        max_size_mm: longest z extent of the output (a window within the lungs); None: all of the lungs.
        in_plane_mm: smallest in-plane spacing of the output (coarser makes smaller files).
    """
    rng = np.random.default_rng([seed, index, 13])
    volume, grid, matrix, centre, variation = _vary(background, rng, max_size_mm, in_plane_mm)
    inverse = np.linalg.inv(matrix)
    scale = float(np.cbrt(abs(np.linalg.det(matrix))))

    def to_output(rows: list[list[float]]) -> list[list[float]]:
        """Background LPS rows ``[x, y, z, d]`` -> output LPS (d shrinks by the scaling; -1 stays unknown)."""
        out = []
        for x, y, z, d in rows:
            w = centre + inverse @ (np.array([x, y, z]) - centre)
            out.append([float(v) for v in w] + [float(d / scale) if d > 0 else float(d)])
        return out

    lo = np.asarray(grid.origin)
    hi = lo + np.asarray(grid.spacing) * (np.asarray(grid.size) - 1)
    inside = lambda rows: [r for r in rows if np.all(r[:3] >= lo) and np.all(r[:3] <= hi)]  # noqa: E731
    carried = inside(to_output(background.nodules))
    excluded = inside(to_output(background.excluded)) + inside(to_output(background.own_lesions))
    taken = [(np.array(r[:3]), max(r[3], 10.0) / 2.0) for r in carried + excluded]
    taken += [(np.array(r[:3]), r[3] / 2.0) for r in inside(to_output(background.avoid))]
    maps = _site_maps(volume, grid)
    if maps is None:
        raise InputError(f"{background.path}: the lungs vanish when cropped (lungs under {OUTPUT_LUNG_ML:g} ml)")
    # in-plane PSF and noise as measured on the varied scan (the resampling blurs a little); the slice thickness as
    # made (resampling along z correlates neighbouring slices, which the noise-based estimate would read as thickness)
    measured = estimate_imaging(volume, grid.spacing)
    imaging = Imaging(measured.psf_mm, variation["thickness_mm"], measured.noise_hu, measured.noise_kernel)
    lesions: list[Lesion] = []
    attachments: list[str] = []
    count = sample_nodule_count(rng)
    for diameter in sample_diameters(rng, count):
        kind = _choose_kind(rng, diameter)
        attachment = "free"
        if diameter >= 5.0:
            attachment = str(rng.choice(list(ATTACHMENT_P), p=list(ATTACHMENT_P.values())))
        site = _place(rng, diameter, attachment, maps, grid, taken)
        if site is None:
            continue
        nodule = make_nodule(rng, site, diameter, kind, attachment)
        spiculated = kind != "ground-glass" and diameter >= 6.0 and rng.random() < 0.3
        spicules = _spicules(rng, site, 0.5 * diameter) if spiculated else np.empty((0, 8))
        shape = "spiculated" if spiculated else ("round" if len(nodule.spheres) == 1 else "lobulated")
        lesion = Lesion(nodule, spicules, shape)
        insert_lesion(volume, grid, lesion, imaging, rng)
        lesions.append(lesion)
        attachments.append(attachment)
        taken.append((site, lesion_extent(lesion)))
    np.rint(volume, out=volume)
    image = np.clip(volume, *HU_RANGE).astype(np.int16)
    nodules = carried + [[*l.nodule.centre, l.nodule.diameter] for l in lesions]
    return HybridScan(
        seriesuid=f"{HYBRID_UID_ROOT}.{seed}.{index}",
        subset=index % 10,
        grid=grid,
        image=image,
        nodules=nodules,
        excluded=excluded,
        lesions=lesions,
        imaging=imaging,
        background=background.path,
        variation=variation | {"attachments": attachments},
    )


def _write_scan(scan: HybridScan, out: Path) -> None:
    """``out/subsetK/<uid>.raw`` then its ``.mhd``, each atomically (a ``.mhd`` on disk always has its data)."""
    mhd = out / f"subset{scan.subset}" / f"{scan.seriesuid}.mhd"
    with atomic_write(mhd.with_suffix(".raw"), "wb") as f:
        f.write(scan.image.astype("<i2", copy=False).tobytes())
    with atomic_write(mhd, "w") as f:
        f.write(metaimage_header(scan.grid, mhd.with_suffix(".raw").name))


def _rows(uid: str, rows: list[list[float]]) -> list[str]:
    return [f"{uid},{x:.6f},{y:.6f},{z:.6f},{d:.6f}\n" for x, y, z, d in rows]


#: The loaded backgrounds of the cohort being written, set in each worker process by :func:`_share_backgrounds`.
_backgrounds: list[Background] = []


def _share_backgrounds(loaded: list[Background]) -> None:
    """Worker initializer: the forked worker sees the parent's loaded backgrounds without a copy through a pipe."""
    _backgrounds[:] = loaded


def _make_scan(
    out: Path, seed: int, max_size_mm: float | None, in_plane_mm: float, index: int
) -> tuple[list[str], list[str], int]:
    """Make hybrid scan ``index`` from background ``index % len`` and write it; its CSV rows and inserted count."""
    scan = make_hybrid_scan(_backgrounds[index % len(_backgrounds)], seed, index, max_size_mm, in_plane_mm)
    _write_scan(scan, out)
    return _rows(scan.seriesuid, scan.nodules), _rows(scan.seriesuid, scan.excluded), len(scan.lesions)


def generate_hybrid_cohort(
    out: str | os.PathLike,
    backgrounds: list[str | os.PathLike],
    scans: int = 20,
    seed: int = 0,
    annotations: str | os.PathLike | None = None,
    excluded: str | os.PathLike | None = None,
    max_size_mm: float | None = None,
    in_plane_mm: float = 0.0,
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Write ``scans`` hybrid scans under ``out`` in LUNA16's layout; scan ``i`` uses background ``i % len``.

    The same arguments write byte-identical files, whatever the number of ``workers`` (processes writing scans in
    parallel; default one per available CPU). Hybrid scans of an earlier run in ``out`` that this run does not
    rewrite are deleted (only files named with :data:`HYBRID_UID_ROOT`).

    Returns:
        ``{"out", "scans", "nodules", "inserted", "excluded", "own_lesions"}``.

    Raises:
        InputError: bad numbers, no backgrounds, a background that is unreadable, not a chest CT or without lungs
            (:func:`load_background`), a bad table.
    """
    for name, value, least in (("--scans", scans, 1), ("--seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise InputError(f"{name}: expected a whole number >= {least}, got {value!r}")
    if max_size_mm is not None and (isinstance(max_size_mm, bool) or not float(max_size_mm) >= MIN_WINDOW_MM):
        raise InputError(
            f"--max-size-mm: expected a length of at least {MIN_WINDOW_MM:g} mm (the reader refuses scans under "
            f"{MIN_EXTENT_MM:g} mm, and a window loses up to a slice at each end), got {max_size_mm!r}"
        )
    if not backgrounds:
        raise InputError("--backgrounds: no background scans given (and none found in ../shared/data)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    nodule_table = read_annotations(annotations) if annotations else {}
    excluded_table = read_annotations(excluded, excluded=True) if excluded else {}
    loaded = [load_background(p, nodule_table, excluded_table) for p in backgrounds]
    out.mkdir(parents=True, exist_ok=True)
    uids = {f"{HYBRID_UID_ROOT}.{seed}.{i}" for i in range(scans)}
    pattern = re.compile(re.escape(HYBRID_UID_ROOT) + r"\.\d+\.\d+\.(mhd|raw)")
    for path in out.glob("subset[0-9]/*"):
        if pattern.fullmatch(path.name) and path.with_suffix("").name not in uids:
            path.unlink()
    made = map_scans(
        functools.partial(_make_scan, out, seed, max_size_mm, in_plane_mm), range(scans), workers, "insert-nodules",
        progress, initializer=_share_backgrounds, initargs=(loaded,),
    )
    _backgrounds.clear()  # set here too when a single worker ran in this process
    nodule_rows = [row for nodules, _, _ in made for row in nodules]
    excluded_rows = [row for _, findings, _ in made for row in findings]
    inserted = sum(count for _, _, count in made)
    for name, rows in (("annotations.csv", nodule_rows), ("annotations_excluded.csv", excluded_rows)):
        with atomic_write(out / name) as f:
            f.write(CSV_HEADER + "".join(rows))
    with atomic_write(out / "seriesuids.csv") as f:
        f.write("".join(f"{HYBRID_UID_ROOT}.{seed}.{i}\n" for i in range(scans)))
    return {
        "out": str(out),
        "scans": scans,
        "nodules": len(nodule_rows),
        "inserted": inserted,
        "excluded": len(excluded_rows),
        "own_lesions": sum(len(b.own_lesions) for b in loaded),
    }
