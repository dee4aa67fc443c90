"""Hybrid cohort: synthetic nodules inserted into real (here: stand-in) chest CT backgrounds.

Most tests use small synthetic chests (``synthesize_scan``) written as MetaImage as stand-in backgrounds, so they run
without the shared real scans; the tests on the real scans skip cleanly when ``../shared/data`` is absent.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from bundle.synthetic import synthesize_scan, write_scan
from bundle.synthetic.hybrid import (
    HYBRID_UID_ROOT,
    _site_maps,
    _vary,
    default_backgrounds,
    generate_hybrid_cohort,
    load_background,
    make_hybrid_scan,
)
from bundle.synthetic.insertion import (
    Imaging,
    Lesion,
    estimate_imaging,
    insert_lesion,
    lesion_extent,
)
from bundle.synthetic.nodules import make_nodule
from bundle.synthetic.raster import ScanGrid, paint_spheres
from custom_components.errors import InputError
from custom_components.luna16 import build_datalist

REPO = Path(__file__).resolve().parents[1]
HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"


@lru_cache(maxsize=None)
def synthetic(index: int):
    return synthesize_scan(3, index)


@pytest.fixture(scope="module")
def backgrounds(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path, Path]:
    """Two stand-in backgrounds (synthetic chests, LUNA16 layout) and tables holding their own nodules/findings."""
    root = tmp_path_factory.mktemp("backgrounds")
    paths, nodules, excluded = [], [], []
    for index in (0, 1):
        scan = synthetic(index)
        paths.append(write_scan(scan, root))
        nodules += [f"{scan.seriesuid},{n.centre[0]},{n.centre[1]},{n.centre[2]},{n.diameter}\n" for n in scan.nodules]
        excluded += [f"{scan.seriesuid},{n.centre[0]},{n.centre[1]},{n.centre[2]},-1\n" for n in scan.excluded]
    (root / "annotations.csv").write_text(HEADER + "".join(nodules))
    (root / "annotations_excluded.csv").write_text(HEADER + "".join(excluded))
    return paths, root / "annotations.csv", root / "annotations_excluded.csv"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bundle", "insert-nodules", *args], cwd=REPO, capture_output=True, text=True
    )


def rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def hu_at(mhd: Path, point: list[float]) -> float:
    """HU of ``mhd`` at an LPS world point, through SimpleITK: the densest of the 3 slices around it of the mean over
    3 x 3 voxels (a small nodule centred between two thick slices shows partly in each)."""
    image = sitk.ReadImage(str(mhd))
    i, j, k = image.TransformPhysicalPointToIndex([float(v) for v in point[:3]])
    array = sitk.GetArrayFromImage(image)
    return float(array[max(k - 1, 0) : k + 2, max(j - 1, 0) : j + 2, max(i - 1, 0) : i + 2].mean(axis=(1, 2)).max())


def test_cli_writes_luna16_layout_that_prepare_reads(backgrounds, tmp_path: Path) -> None:
    paths, annotations, excluded = backgrounds
    out = tmp_path / "hybrid"
    result = run_cli(
        "--backgrounds", ",".join(map(str, paths)), "--out", str(out), "--scans", "4", "--seed", "1",
        "--annotations", str(annotations), "--excluded", str(excluded), "--max-size-mm", "110",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    uids = [r[0] for r in csv.reader(open(out / "seriesuids.csv"))]
    assert uids == [f"{HYBRID_UID_ROOT}.1.{i}" for i in range(4)]
    for i, uid in enumerate(uids):
        mhd = out / f"subset{i}" / f"{uid}.mhd"
        image = sitk.ReadImage(str(mhd))
        assert image.GetPixelID() == sitk.sitkInt16
        assert image.GetSpacing()[2] * (image.GetSize()[2] - 1) <= 110.0 + image.GetSpacing()[2]
    datalist = build_datalist(out)
    assert [s["seriesuid"] for s in datalist["scans"]] == sorted(uids)
    nodule_rows = rows(out / "annotations.csv")
    assert sum(len(s["nodules"]) for s in datalist["scans"]) == len(nodule_rows) > 0
    for uid, x, y, z, d in nodule_rows:  # every nodule, inserted or carried, is dense where the table says
        mhd = out / f"subset{uids.index(uid)}" / f"{uid}.mhd"
        assert hu_at(mhd, [float(x), float(y), float(z)]) > -600.0, (uid, x, y, z, d)


def test_same_seed_same_bytes_other_seed_other_scans(backgrounds, tmp_path: Path) -> None:
    paths, annotations, excluded = backgrounds

    def files(folder: Path, seed: int, workers: int) -> dict[str, bytes]:
        generate_hybrid_cohort(folder, paths, scans=2, seed=seed, annotations=annotations, excluded=excluded,
                               max_size_mm=110, progress=False, workers=workers)  # fmt: skip
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    # one process, then two in parallel: the same files (each scan from its own seed, rows gathered in scan order)
    first, again = files(tmp_path / "a", 5, 1), files(tmp_path / "b", 5, 2)
    assert first == again and len(first) == 7  # 2 x (.mhd + .raw) + 3 tables
    other = files(tmp_path / "c", 6, 2)
    raws = lambda f: sorted(v for k, v in f.items() if k.endswith(".raw"))  # noqa: E731
    assert not set(raws(first)) & set(raws(other))


def test_estimate_imaging_recovers_psf_noise_and_texture() -> None:
    rng = np.random.default_rng(0)
    psf_voxels, noise = 1.2, 25.0
    white = rng.standard_normal((60, 160, 160)).astype(np.float32)
    blurred = ndimage.gaussian_filter(white, (0, psf_voxels, psf_voxels))
    blurred = ndimage.uniform_filter1d(blurred, 2, axis=0)  # slices twice as thick as their spacing
    volume = 40.0 + blurred * (noise / blurred.std())
    volume[:, :10] = -1000.0  # some air, as in a scan
    est = estimate_imaging(volume, (0.7, 0.7, 1.25))
    assert est.psf_mm == pytest.approx(psf_voxels * 0.7, rel=0.12)
    assert est.thickness_mm == 1.25  # the slice spacing (see estimate_imaging)
    assert est.noise_hu == pytest.approx(noise, rel=0.1)
    # the noise kernel reproduces the texture: same level, same share of high frequencies (voxel minus 3 x 3 mean)
    synthetic = ndimage.convolve(rng.standard_normal((8, 160, 160)).astype(np.float32), est.noise_kernel[None])
    highpass = lambda v: (v - ndimage.uniform_filter(v, (1, 3, 3)))[:, 10:-10, 10:-10].std()  # noqa: E731
    assert synthetic.std() == pytest.approx(noise, rel=0.1)
    assert highpass(synthetic) == pytest.approx(highpass(volume[:8, 20:, :]), rel=0.15)


def _lung_phantom(rng: np.random.Generator) -> tuple[np.ndarray, ScanGrid]:
    """Aerated lung (-850 HU) with a 3 mm vessel along x at the centre and scanner-like noise, ``(k, j, i)``."""
    grid = ScanGrid(size=(96, 96, 40), spacing=(0.7, 0.7, 1.0), origin=(0.0, 0.0, 0.0))
    volume = np.full(grid.shape, -850.0, dtype=np.float32)
    z, y = np.meshgrid(grid.axis(2), grid.axis(1), indexing="ij")
    volume[np.hypot(z - 20.0, y - 33.6) < 1.5] = 40.0
    volume = ndimage.gaussian_filter(volume, (0.6, 0.9, 0.9))
    volume += ndimage.gaussian_filter(rng.standard_normal(grid.shape).astype(np.float32), (0, 0.9, 0.9)) * 60.0
    return volume, grid


def test_ground_glass_keeps_the_vessels_running_through_it() -> None:
    rng = np.random.default_rng(1)
    volume, grid = _lung_phantom(rng)
    before = volume.copy()
    centre = np.array([33.6, 33.6, 20.0])
    nodule = make_nodule(rng, centre, 14.0, "ground-glass", "free")
    imaging = estimate_imaging(np.full((20, 60, 60), 40.0) + 20.0 * rng.standard_normal((20, 60, 60)), grid.spacing)
    insert_lesion(volume, grid, Lesion(nodule, np.empty((0, 8)), "round"), imaging, rng)
    z, y, x = np.meshgrid(grid.axis(2), grid.axis(1), grid.axis(0), indexing="ij")
    near_centre = np.hypot(np.hypot(x - centre[0], y - centre[1]), z - centre[2]) < 3.5
    vessel = near_centre & (before > -100.0)
    lung = near_centre & (before < -700.0)
    assert vessel.sum() > 20 and lung.sum() > 20
    assert abs(float((volume - before)[vessel].mean())) < 40.0  # the vessel stays as it was
    assert float(volume[lung].mean()) == pytest.approx(nodule.hu, abs=40.0)  # the lung around it turns ground-glass
    assert float(volume[vessel].mean()) > float(volume[lung].mean()) + 250.0  # and the vessel still stands out


def _ring(grid: ScanGrid, lesion: Lesion, imaging: Imaging) -> np.ndarray:
    """In-plane ring 1.5-4 mm outside the lesion's extent on the slices within half its extent of its centre."""
    centre, extent = np.asarray(lesion.nodule.centre), lesion_extent(lesion)
    z, y, x = np.meshgrid(grid.axis(2), grid.axis(1), grid.axis(0), indexing="ij", sparse=True)
    radial = np.hypot(x - centre[0], y - centre[1])
    lo = extent + 3.0 * imaging.psf_mm
    return (radial >= lo) & (radial <= lo + 3.0) & (np.abs(z - centre[2]) <= 0.5 * extent)


def test_no_seam_ring_statistics_match_and_no_noise_free_patch(backgrounds) -> None:
    """The seam test: HU mean and spread of a ring just outside each inserted nodule equal those of the same ring
    before insertion; inside, the noise is the scan's own level (not a smooth patch)."""
    paths, _, _ = backgrounds
    background = load_background(paths[0])
    rng = np.random.default_rng(2)
    volume, grid, *_ = _vary(background, rng, None, 0.0)
    maps = _site_maps(volume, grid)
    imaging = estimate_imaging(volume, grid.spacing)
    before = volume.copy()
    spacing = np.asarray(grid.spacing)
    candidates = np.argwhere((maps["depth"] > 14.0) & (maps["clear"] > 3.0))
    lesions = []
    for number, kind in enumerate(["solid", "ground-glass", "part-solid", "solid"]):
        k, j, i = candidates[rng.integers(len(candidates))]
        centre = np.asarray(grid.origin) + np.array([i, j, k]) * spacing
        if any(np.linalg.norm(centre - np.asarray(l.nodule.centre)) < 30 for l in lesions):
            continue
        lesions.append(Lesion(make_nodule(rng, centre, 9.0 + 2 * number, kind, "free"), np.empty((0, 8)), "round"))
    assert len(lesions) >= 2
    for lesion in lesions:
        insert_lesion(volume, grid, lesion, imaging, rng)
    for lesion in lesions:
        ring = _ring(grid, lesion, imaging)
        assert ring.sum() > 100
        ring_before, ring_after = before[ring], volume[ring]
        assert abs(ring_after.mean() - ring_before.mean()) < 0.15 * ring_before.std() + 2.0
        assert ring_after.std() == pytest.approx(ring_before.std(), rel=0.05)
    # noise inside each lesion: the in-plane high-pass of the scan (voxel minus its 3 x 3 mean) where the lesion is
    # fully present, against the same measure in the scan's flat soft tissue
    highpass = lambda v: v - ndimage.uniform_filter(v, (1, 3, 3))  # noqa: E731
    z, y, x = np.meshgrid(grid.axis(2), grid.axis(1), grid.axis(0), indexing="ij", sparse=True)
    soft = (ndimage.uniform_filter(before, (1, 9, 9)) > -50) & (ndimage.uniform_filter(before, (1, 9, 9)) < 100)
    reference = float(highpass(before)[soft].std())
    for lesion in lesions:
        c = lesion.nodule.centre
        core = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) < 0.3 * lesion.nodule.diameter
        inside = float(highpass(volume)[core].std())
        if lesion.nodule.kind == "solid":  # replaced voxels: fresh noise of the scan's texture, at its level
            assert 0.6 * reference < inside < 1.6 * reference
        else:  # translucent: the lung's own structure and noise show through, never a smooth patch
            assert inside > 0.6 * reference


def test_own_unannotated_lesion_is_excluded_and_avoided(tmp_path: Path) -> None:
    """A 24 mm mass painted into a background's lung, in no table: found, written to annotations_excluded.csv, and
    no inserted nodule goes near it."""
    scan = synthesize_scan(3, 2)
    lung = np.argwhere(ndimage.distance_transform_edt(scan.lungs, sampling=scan.grid.spacing[::-1]) > 16.0)
    k, j, i = lung[len(lung) // 2]
    mass = np.asarray(scan.grid.origin) + np.array([i, j, k]) * np.asarray(scan.grid.spacing)
    image = scan.image.astype(np.float32)
    paint_spheres(image, scan.grid, mass[None], np.array([12.0]), 40.0)
    scan.image = image.astype(np.int16)
    path = write_scan(scan, tmp_path / "bg")
    background = load_background(path)
    found = [r for r in background.own_lesions if np.linalg.norm(np.array(r[:3]) - mass) < 6.0]
    assert len(found) == 1 and found[0][3] == pytest.approx(24.0, abs=6.0)
    for index in range(3):
        out = make_hybrid_scan(background, seed=0, index=index)
        assert out.variation["flip"] in (True, False)
        assert any(r[3] > 15.0 for r in out.excluded)  # the mass, in the output scan's world coordinates
        mass_out = np.array([r[:3] for r in out.excluded if r[3] > 15.0][0])
        for lesion in out.lesions:
            assert np.linalg.norm(np.asarray(lesion.nodule.centre) - mass_out) > 12.0 + lesion_extent(lesion)


def test_placements_touch_pleura_and_vessels(backgrounds) -> None:
    """Juxta-pleural nodules reach the pleura, juxta-vascular ones a dense structure inside the lung."""
    paths, _, _ = backgrounds
    background = load_background(paths[1])
    seen = {}
    for index in range(12):
        out = make_hybrid_scan(background, seed=4, index=index)
        for lesion, attachment in zip(out.lesions, out.variation["attachments"]):
            seen.setdefault(attachment, []).append((lesion, out))
            assert lesion.shape in ("round", "lobulated", "spiculated")
    assert {"free", "juxta-pleural", "juxta-vascular"} <= set(seen)
    from bundle.synthetic.hybrid import _enclosed_air

    def outside_lung_share(lesion: Lesion, out) -> float:
        """Share of the ball of the lesion's radius that is not enclosed lung (holes filled: a lesion inside the
        lung counts as lung, one fused with the chest wall does not)."""
        spacing = np.asarray(out.grid.spacing)
        lungs = _enclosed_air(out.image, spacing[::-1], min_ml=100.0)
        z, y, x = np.meshgrid(*(out.grid.axis(d) for d in (2, 1, 0)), indexing="ij", sparse=True)
        c = lesion.nodule.centre
        ball = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= (0.5 * lesion.nodule.diameter) ** 2
        return float((~lungs[ball]).mean())

    pleural = [outside_lung_share(lesion, out) for lesion, out in seen["juxta-pleural"][:3]]
    free = [outside_lung_share(lesion, out) for lesion, out in seen["free"][:3]]
    assert min(pleural) > 0.1 and max(free) < 0.02, (pleural, free)


@pytest.mark.parametrize(
    "make, message",
    [
        ("unreadable", "header is unreadable"),
        ("not_ct", "not a chest CT"),
        ("no_lungs", "no lungs"),
    ],
)
def test_bad_background_is_one_clear_error(tmp_path: Path, make: str, message: str) -> None:
    path = tmp_path / f"{make}.mhd"
    if make == "unreadable":
        path.write_text("this is not a MetaImage header\n")
    else:
        z, y, x = np.mgrid[:60, :200, :200]  # 120 mm along z: past the reader's 100 mm chest floor
        if make == "not_ct":  # an MRI-like volume: positive intensities only
            array = (400 + 300 * np.sin(x / 9.0) * np.cos(y / 13.0)).astype(np.int16)
        else:  # a water cylinder in air: a body, no lungs
            array = np.where(np.hypot(x - 100, y - 100) < 80, 0, -1000).astype(np.int16)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(image, str(path))
    result = run_cli("--backgrounds", str(path), "--out", str(tmp_path / "out"), "--scans", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert str(path) in lines[0] and message in lines[0]
    with pytest.raises(InputError, match=message):
        load_background(path)


def test_bad_numbers_are_input_errors(backgrounds, tmp_path: Path) -> None:
    paths, _, _ = backgrounds
    for kwargs in ({"scans": 0}, {"seed": -1}, {"max_size_mm": 10.0}):
        with pytest.raises(InputError):
            generate_hybrid_cohort(tmp_path, paths, **({"scans": 1} | kwargs), progress=False)
    with pytest.raises(InputError, match="no background"):
        generate_hybrid_cohort(tmp_path, [], scans=1, progress=False)


SHARED = default_backgrounds(REPO)
requires_shared = pytest.mark.skipif(len(SHARED) < 4, reason="shared real scans not found at ../shared/data")


@requires_shared
def test_real_background_carries_its_luna16_nodule() -> None:
    """LIDC-IDRI-0001's LUNA16 nodule (23 mm) is carried into each varied scan, where the output really is dense."""
    from bundle.synthetic.hybrid import default_tables

    annotations, excluded = default_tables(REPO)
    from custom_components.luna16 import read_annotations

    lidc_0001 = [p for p in SHARED if "179049373636438705059720603192" in p.name][0]
    background = load_background(lidc_0001, read_annotations(annotations), read_annotations(excluded, True))
    assert len(background.nodules) == 1 and len(background.excluded) > 0
    out = make_hybrid_scan(background, seed=0, index=0)
    carried = [r for r in out.nodules if r[3] > 20.0]
    assert len(carried) == 1
    c = np.rint((np.asarray(carried[0][:3]) - out.grid.origin) / out.grid.spacing).astype(int)
    assert out.image[c[2], c[1] - 2 : c[1] + 3, c[0] - 2 : c[0] + 3].mean() > -200
