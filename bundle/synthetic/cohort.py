"""One synthetic scan from its seed, and a whole cohort written in LUNA16's own layout.

Layout of a cohort folder (as LUNA16's)::

    subset0/<seriesuid>.mhd + .raw ... subset9/    scan i in subset i % 10; MetaImage, int16 HU, identity direction
    annotations.csv                                seriesuid,coordX,coordY,coordZ,diameter_mm (nodules >= 3 mm)
    annotations_excluded.csv                       same columns, findings under 3 mm
    seriesuids.csv                                 the seriesuids, one a line, no header

Coordinates are LPS world mm; a scan's ``Offset`` is the world position of voxel (0, 0, 0).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bundle.synthetic.anatomy import HU, ChestAnatomy, LungField, Tube
from bundle.synthetic.imaging import (
    Scanner,
    add_bone_streaks,
    cardiac_blur,
    reconstruct,
)
from bundle.synthetic.mimics import (
    BULLA_WALL_HU,
    BULLA_WALL_MM,
    EMPHYSEMA_HU,
    Mimics,
    draw_mimics,
)
from bundle.synthetic.nodules import Nodule, place_nodules, sample_nodule_count
from bundle.synthetic.noise import SmoothField
from bundle.synthetic.parallel import map_scans
from bundle.synthetic.raster import ScanGrid, paint_capsules, paint_spheres
from bundle.synthetic.vessels import VesselTrees, grow_vessel_trees
from custom_components.atomic import atomic_write
from custom_components.errors import InputError

__all__ = ["UID_ROOT", "SyntheticScan", "seriesuid", "synthesize_scan", "write_scan", "generate_cohort"]

#: DICOM UID root for synthetic data (pydicom's, free for such use); a scan's UID is ``<root>.<seed>.<index>``.
UID_ROOT = "1.2.826.0.1.3680043.8.498"
CSV_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
PADDING_HU = -2048  # scanner value outside the reconstruction circle
HU_RANGE = (-1024, 3071)  # what a 12-bit CT stores
BACKGROUND_STEP_MM = 1.5  # thick slices average the analytic background over sub-slices this far apart


@dataclass
class SyntheticScan:
    """A rendered scan and its ground truth.

    ``image`` (int16 HU) and ``lungs`` (bool) are arrays in SimpleITK order ``(k, j, i)`` on ``grid``; ``nodules`` and
    ``excluded`` (findings under 3 mm) have centres in LPS mm; ``vessels`` ``(n, 8)`` are the vessel capsules (start,
    end in LPS mm, start and end radius in mm) and ``trees`` the full vessel and airway trees; ``mimics`` the
    non-nodule findings (calcified granulomas, scars, atelectasis bands, emphysema; in no annotation file);
    ``scanner`` the kernel, dose and artefacts it was imaged with.
    """

    seriesuid: str
    subset: int
    grid: ScanGrid
    image: np.ndarray
    lungs: np.ndarray
    nodules: list[Nodule]
    excluded: list[Nodule]
    vessels: np.ndarray
    trees: VesselTrees
    mimics: Mimics
    scanner: Scanner


def seriesuid(seed: int, index: int) -> str:
    """Series UID of scan ``index`` of the cohort drawn with ``seed``."""
    return f"{UID_ROOT}.{seed}.{index}"


def synthesize_scan(seed: int, index: int, full_size: bool = False) -> SyntheticScan:
    """Render scan ``index`` of the cohort ``seed``; the result depends on nothing else (same arguments, same scan).

    Args:
        seed: cohort seed (>= 0).
        index: scan number in the cohort (>= 0); the scan goes to LUNA16 subset ``index % 10``.
        full_size: an adult chest on a 512 x 512 grid (LUNA16-sized) instead of the small chest of the CPU demo.
    """
    rng = np.random.default_rng([seed, index, int(full_size)])
    anatomy = ChestAnatomy.draw(rng, full_size)
    grid = anatomy.grid
    lung_field = LungField(anatomy, spacing=2.0)
    trees = grow_vessel_trees(anatomy, lung_field, rng)
    vessels = trees.vessels
    nodules, excluded = place_nodules(
        rng, lung_field, vessels, count=sample_nodule_count(rng), tiny=min(int(rng.poisson(0.8)), 3)
    )
    mimics = draw_mimics(rng, anatomy, lung_field, nodules + excluded)
    scanner = Scanner.draw(rng, grid.slice_thickness)

    texture = SmoothField(grid, rng)
    volume = np.empty(grid.shape, dtype=np.float32)
    lungs = np.empty(grid.shape, dtype=bool)
    plane = anatomy.plane()
    # The analytic background is sampled at sub-slices across each slice's thickness, like the capsules, so ribs,
    # pleura and fissures get the partial volume of thick slices too.
    sub = max(1, int(np.ceil(grid.slice_thickness / BACKGROUND_STEP_MM)))
    depths = ((np.arange(sub) + 0.5) / sub - 0.5) * grid.slice_thickness
    for k, z in enumerate(grid.axis(2)):
        renders = [anatomy.render_slice(plane, float(z + dz), texture.slice(k)) for dz in depths]
        volume[k] = renders[0][0] if sub == 1 else np.mean([hu for hu, _ in renders], axis=0)
        lungs[k] = renders[0][1] if sub == 1 else 2 * np.sum([lung for _, lung in renders], axis=0) > sub

    def paint_tubes(tubes: tuple[Tube, ...]) -> None:
        for tube in tubes:
            radius = [tube.radius]
            paint_capsules(volume, grid, np.array(tube.start), np.array(tube.end), radius, radius, tube.hu)

    paint_tubes(anatomy.tubes)
    holes, bullae = mimics.holes, mimics.holes[len(mimics.holes) - mimics.bullae :]
    walls = bullae[:, 3] + BULLA_WALL_MM
    paint_capsules(volume, grid, bullae[:, :3], bullae[:, :3], walls, walls, BULLA_WALL_HU)
    paint_capsules(volume, grid, holes[:, :3], holes[:, :3], holes[:, 3], holes[:, 3], EMPHYSEMA_HU)
    paint_capsules(volume, grid, vessels[:, :3], vessels[:, 3:6], vessels[:, 6], vessels[:, 7], HU["blood"])
    # Airways over the vessels: the independently grown trees may cross, and an airway is never filled by a vessel.
    airways = trees.airways
    paint_capsules(volume, grid, airways[:, :3], airways[:, 3:6], airways[:, 6], airways[:, 7], rng.uniform(-30, 40))
    paint_capsules(volume, grid, airways[:, :3], airways[:, 3:6], airways[:, 8], airways[:, 9], HU["air"])
    paint_tubes(anatomy.airway_lumen)
    strands = np.concatenate([mimics.strands, mimics.plaques])
    for hu in np.unique(strands[:, 8]):
        row = strands[strands[:, 8] == hu]
        paint_capsules(volume, grid, row[:, :3], row[:, 3:6], row[:, 6], row[:, 7], float(hu))
    for finding in nodules + excluded:
        paint_spheres(volume, grid, finding.spheres[:, :3], finding.spheres[:, 3], finding.hu)
        if len(finding.core):
            paint_spheres(volume, grid, finding.core[:, :3], finding.core[:, 3], finding.core_hu)
    for x, y, z, radius, hu in mimics.granulomas:
        paint_spheres(volume, grid, np.array([[x, y, z]]), np.array([radius]), float(hu))

    blur_px = scanner.cardiac_blur_mm / grid.spacing[0]
    for k, z in enumerate(grid.axis(2)):
        weight = anatomy.heart_motion(plane, float(z))
        if weight is not None:
            cardiac_blur(volume[k], weight, blur_px)
    add_bone_streaks(volume, grid, (anatomy.cx, anatomy.spine_y), scanner.streak_hu, rng)
    reconstruct(volume, grid, scanner, rng)
    np.rint(volume, out=volume)
    image = np.clip(volume, *HU_RANGE, out=volume).astype(np.int16)
    if anatomy.fov_radius is not None:
        x, y = grid.axis(0), grid.axis(1)
        centre_x, centre_y = 0.5 * (x[0] + x[-1]), 0.5 * (y[0] + y[-1])
        outside = (x[None, :] - centre_x) ** 2 + (y[:, None] - centre_y) ** 2 > anatomy.fov_radius**2
        image[:, outside] = PADDING_HU
    return SyntheticScan(
        seriesuid(seed, index), index % 10, grid, image, lungs, nodules, excluded, vessels, trees, mimics, scanner
    )


def metaimage_header(grid: ScanGrid, raw_name: str) -> str:
    """MetaImage header of a LUNA16 scan (uncompressed int16, identity direction)."""
    numbers = lambda values: " ".join(repr(float(v)) for v in values)  # noqa: E731 - shortest exact decimal
    return (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\nCompressedData = False\n"
        "TransformMatrix = 1 0 0 0 1 0 0 0 1\n"
        f"Offset = {numbers(grid.origin)}\nCenterOfRotation = 0 0 0\nAnatomicalOrientation = RAI\n"
        f"ElementSpacing = {numbers(grid.spacing)}\nDimSize = {' '.join(str(n) for n in grid.size)}\n"
        f"ElementType = MET_SHORT\nElementDataFile = {raw_name}\n"
    )


def write_scan(scan: SyntheticScan, out: str | os.PathLike) -> Path:
    """Write ``scan`` as ``out/subsetK/<seriesuid>.mhd`` + ``.raw``, each atomically; returns the ``.mhd`` path.

    The ``.raw`` goes first, so a ``.mhd`` on disk always has complete voxel data.
    """
    folder = Path(out) / f"subset{scan.subset}"
    mhd = folder / f"{scan.seriesuid}.mhd"
    with atomic_write(mhd.with_suffix(".raw"), "wb") as f:
        f.write(scan.image.astype("<i2", copy=False).tobytes())
    with atomic_write(mhd, "w") as f:
        f.write(metaimage_header(scan.grid, mhd.with_suffix(".raw").name))
    return mhd


def _rows(uid: str, findings: list[Nodule]) -> list[str]:
    return [f"{uid},{n.centre[0]:.6f},{n.centre[1]:.6f},{n.centre[2]:.6f},{n.diameter:.6f}\n" for n in findings]


def _remove_stale_scans(out: Path, keep: set[str]) -> None:
    """Delete synthetic scans (named with our UID root) of an earlier run that this cohort does not rewrite, so the
    folder never holds scans missing from its annotations. Nothing else in ``out`` is touched."""
    pattern = re.compile(re.escape(UID_ROOT) + r"\.\d+\.\d+\.(mhd|raw)")
    for path in out.glob("subset[0-9]/*"):
        if pattern.fullmatch(path.name) and path.with_suffix("").name not in keep:
            path.unlink()


def _make_scan(out: Path, seed: int, full_size: bool, index: int) -> tuple[list[str], list[str]]:
    """Synthesize scan ``index`` and write it under ``out``; its annotation and excluded-finding CSV rows."""
    scan = synthesize_scan(seed, index, full_size)
    write_scan(scan, out)
    return _rows(scan.seriesuid, scan.nodules), _rows(scan.seriesuid, scan.excluded)


def generate_cohort(
    out: str | os.PathLike,
    scans: int = 40,
    seed: int = 0,
    full_size: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Write a synthetic chest-CT cohort of ``scans`` scans in LUNA16's layout under ``out`` (see module docstring).

    Args:
        out: cohort folder (created when missing).
        scans: number of scans (>= 1).
        seed: cohort seed (>= 0); the same seed writes byte-identical files.
        full_size: LUNA16-sized adult scans (512 x 512, 100-400 slices) instead of the small default chests.
        progress: show a tqdm progress bar over the scans.
        workers: processes writing scans in parallel (default: one per available CPU); the files do not depend on it.

    Returns:
        summary: ``{"out", "scans", "nodules", "excluded", "scans_without_nodules"}``.

    Raises:
        InputError: ``scans`` or ``seed`` is not a valid number, or ``out`` is a file.
    """
    if isinstance(scans, bool) or not isinstance(scans, (int, np.integer)) or scans < 1:
        raise InputError(f"--scans: expected a whole number >= 1, got {scans!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"--seed: expected a whole number >= 0, got {seed!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    uids = [seriesuid(seed, i) for i in range(scans)]
    _remove_stale_scans(out, set(uids))
    rows = map_scans(functools.partial(_make_scan, out, seed, full_size), range(scans), workers, "synth", progress)
    annotations = [row for nodules, _ in rows for row in nodules]
    excluded = [row for _, findings in rows for row in findings]
    empty = sum(not nodules for nodules, _ in rows)
    for name, rows in (("annotations.csv", annotations), ("annotations_excluded.csv", excluded)):
        with atomic_write(out / name) as f:
            f.write(CSV_HEADER + "".join(rows))
    with atomic_write(out / "seriesuids.csv") as f:
        f.write("".join(f"{uid}\n" for uid in uids))
    return {
        "out": str(out),
        "scans": scans,
        "nodules": len(annotations),
        "excluded": len(excluded),
        "scans_without_nodules": empty,
    }
