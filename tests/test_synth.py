"""The synthetic LUNA16-format cohort: layout, determinism, readable scans, truthful annotations, hard negatives."""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from bundle.__main__ import main
from bundle.synthetic import (
    generate_cohort,
    sample_diameters,
    sample_nodule_count,
    synthesize_scan,
    write_scan,
)
from bundle.synthetic.anatomy import ChestAnatomy, LungField
from bundle.synthetic.imaging import (
    Scanner,
    add_bone_streaks,
    cardiac_blur,
    radial_nps,
    reconstruct,
)
from bundle.synthetic.mimics import GRANULOMA_MAX_MM, draw_mimics
from bundle.synthetic.nodules import diameter_table, make_nodule, place_nodules
from bundle.synthetic.raster import ScanGrid, paint_spheres
from bundle.synthetic.vessels import grow_vessel_trees
from custom_components.errors import InputError

SEED = 7
SCANS = 3
HEADER = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]


@lru_cache(maxsize=None)
def scan(index: int, seed: int = SEED):
    """In-memory scans, rendered once per test session."""
    return synthesize_scan(seed, index)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-scan cohort written through the CLI."""
    out = tmp_path_factory.mktemp("synth") / "cohort"
    assert main(["synth", "--out", str(out), "--scans", str(SCANS), "--seed", str(SEED)]) == 0
    return out


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_cli_writes_luna16_layout(cohort: Path) -> None:
    uids = [row[0] for row in read_rows(cohort / "seriesuids.csv")]
    assert len(uids) == SCANS and len(set(uids)) == SCANS
    assert all(uid.startswith("1.2.826.0.1.3680043.8.498.7.") for uid in uids)
    for i, uid in enumerate(uids):
        mhd = cohort / f"subset{i % 10}" / f"{uid}.mhd"
        assert mhd.is_file() and mhd.with_suffix(".raw").is_file()
        assert f"ElementDataFile = {uid}.raw" in mhd.read_text()
    for name in ("annotations.csv", "annotations_excluded.csv"):
        rows = read_rows(cohort / name)
        assert rows[0] == HEADER
        assert all(row[0] in uids and len(row) == 5 for row in rows[1:])
    assert not [p for p in cohort.rglob("*") if p.name.startswith(".")]  # no temporary files left behind


def test_same_seed_same_bytes_other_seed_differs(cohort: Path, tmp_path: Path) -> None:
    again = synthesize_scan(SEED, 1)  # rendered afresh, not the CLI's scan nor the cached one
    written = write_scan(again, tmp_path)
    original = cohort / "subset1" / written.name
    assert written.read_bytes() == original.read_bytes()
    assert written.with_suffix(".raw").read_bytes() == original.with_suffix(".raw").read_bytes()
    assert [n.centre for n in again.nodules] == [n.centre for n in scan(1).nodules]
    other = synthesize_scan(SEED + 1, 1)
    assert other.seriesuid != again.seriesuid
    assert other.image.shape != again.image.shape or not np.array_equal(other.image, again.image)


def test_parallel_processes_write_the_same_cohort(cohort: Path, tmp_path: Path) -> None:
    """The CLI's cohort (one process per CPU) and the same seed written in one process are byte-identical, tables
    included: the rows are gathered in scan order whatever order the processes finish in."""
    generate_cohort(tmp_path, scans=SCANS, seed=SEED, progress=False, workers=1)
    files = lambda folder: {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}  # noqa: E731
    assert files(tmp_path) == files(cohort)


def test_scans_are_readable_ct_with_varied_anisotropic_spacing(cohort: Path) -> None:
    spacings = []
    for i, uid in enumerate(row[0] for row in read_rows(cohort / "seriesuids.csv")):
        image = sitk.ReadImage(str(cohort / f"subset{i % 10}" / f"{uid}.mhd"))
        assert image.GetPixelID() == sitk.sitkInt16
        assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        sx, sy, sz = image.GetSpacing()
        assert sx == sy and 0.6 <= sx <= 1.0 and 0.6 <= sz <= 5.0
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), scan(i).image)  # the file is the scan
        assert image.GetOrigin() == pytest.approx(scan(i).grid.origin)
        array = scan(i).image
        assert array.min() >= -2048 and array.max() > 400  # air (and padding) up to bone
        spacings.append((sx, sz))
    assert len(set(spacings)) == SCANS


def test_default_scans_are_small_chests() -> None:
    for i in range(4):
        s = scan(i)
        k, j, i_ = np.nonzero(s.lungs)
        extent = [(np.ptp(a) + 1) * sp for a, sp in zip((i_, j, k), s.grid.spacing)]
        assert 90 <= extent[0] <= 160 and 50 <= extent[1] <= 140 and 80 <= extent[2] <= 145, extent


def sample_hu(image: sitk.Image, point: tuple[float, float, float]) -> float:
    """HU at a world point (LPS mm), trilinear, through SimpleITK's world -> index transform."""
    index = image.TransformPhysicalPointToContinuousIndex(point)
    array = sitk.GetArrayFromImage(image).astype(float)
    return float(ndimage.map_coordinates(array, [[c] for c in index[::-1]], order=1)[0])


def test_annotations_are_the_nodules_present(cohort: Path) -> None:
    rows = read_rows(cohort / "annotations.csv")[1:]
    excluded = read_rows(cohort / "annotations_excluded.csv")[1:]
    uids = [row[0] for row in read_rows(cohort / "seriesuids.csv")]
    assert len(rows) == sum(len(scan(i).nodules) for i in range(SCANS)) > 0
    for i, uid in enumerate(uids):
        image = sitk.ReadImage(str(cohort / f"subset{i % 10}" / f"{uid}.mhd"))
        parenchyma = np.median(scan(i).image[scan(i).lungs])
        mine = [[float(v) for v in row[1:]] for row in rows if row[0] == uid]
        assert len(mine) == len(scan(i).nodules)
        for x, y, z, d in mine:
            assert 3.0 <= d <= 32.0
            assert sample_hu(image, (x, y, z)) > parenchyma + 200.0
            ci, cj, ck = np.rint(image.TransformPhysicalPointToContinuousIndex((x, y, z))).astype(int)
            assert scan(i).lungs[ck, cj, ci], "nodule centre outside the lungs"
        assert all(float(row[4]) < 3.0 for row in excluded if row[0] == uid)
        assert len([r for r in excluded if r[0] == uid]) == len(scan(i).excluded)


def test_more_nodules_are_dense_and_inside_the_lungs() -> None:
    """The same check over more scans, through the in-memory API (world -> index as for the files)."""
    found = 0
    for i in range(SCANS, 6):
        s = scan(i)
        parenchyma = np.median(s.image[s.lungs])
        for n in s.nodules + s.excluded:
            index = (np.asarray(n.centre) - s.grid.origin) / s.grid.spacing
            hu = ndimage.map_coordinates(s.image.astype(float), [[c] for c in index[::-1]], order=1)[0]
            assert hu > parenchyma + (100.0 if n.kind == "tiny" else 200.0), (n.kind, n.diameter, hu)
            assert s.lungs[tuple(np.rint(index[::-1]).astype(int))]
            found += 1
    assert found > 0


def test_diameter_sampler_follows_luna16_table() -> None:
    rng = np.random.default_rng(0)
    d = sample_diameters(rng, 40000)
    assert d.min() >= 3.0 and d.max() <= 30.0
    probabilities, quantiles = diameter_table()
    assert quantiles[0] >= 3.0 and len(quantiles) == len(probabilities)
    for p in (0.1, 0.25, 0.5, 0.75, 0.9):
        expected = np.interp(p, probabilities, quantiles)
        assert np.quantile(d, p) == pytest.approx(expected, rel=0.04), p
    assert 6.0 < np.median(d) < 7.0  # LUNA16's median is 6.4 mm


def test_nodule_count_sampler_leaves_some_scans_empty() -> None:
    rng = np.random.default_rng(1)
    counts = np.array([sample_nodule_count(rng) for _ in range(4000)])
    assert counts.min() == 0 and counts.max() == 6
    assert 0.2 < np.mean(counts == 0) < 0.3


def test_nodule_shape_has_the_annotated_diameter_and_centroid() -> None:
    rng = np.random.default_rng(2)
    for kind in ("solid", "part-solid", "ground-glass"):
        n = make_nodule(rng, np.array([10.0, -20.0, 30.0]), 12.0, kind, "free")
        step = 0.15
        axis = np.arange(-9.0, 9.0, step)
        grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3) + np.asarray(n.centre)
        inside = np.zeros(len(grid), dtype=bool)
        for sphere in n.spheres:
            inside |= np.sum((grid - sphere[:3]) ** 2, axis=1) < sphere[3] ** 2
        assert not inside.reshape((len(axis),) * 3)[[0, -1]].any()  # the box holds the whole nodule
        volume = inside.sum() * step**3
        assert 2 * (3 * volume / (4 * np.pi)) ** (1 / 3) == pytest.approx(12.0, rel=0.03)
        np.testing.assert_allclose(grid[inside].mean(0), n.centre, atol=0.15)
        assert (len(n.core) > 0) == (kind == "part-solid")


def test_placement_mixes_kinds_and_never_overlaps() -> None:
    kinds, attachments = set(), set()
    for seed in range(10):
        rng = np.random.default_rng(seed)
        anatomy = ChestAnatomy.draw(rng, full_size=False)
        lungs = LungField(anatomy, 2.0)
        vessels = grow_vessel_trees(anatomy, lungs, rng, terminals_per_lung=200).vessels
        nodules, tiny = place_nodules(rng, lungs, vessels, count=6, tiny=3)
        assert len(nodules) >= 4
        found = nodules + tiny
        for a in range(len(found)):
            for b in range(a):
                gap = np.linalg.norm(np.subtract(found[a].centre, found[b].centre))
                assert gap > 0.5 * (found[a].diameter + found[b].diameter)
        assert all(n.diameter < 3.0 for n in tiny)
        kinds |= {n.kind for n in nodules}
        attachments |= {n.attachment for n in nodules}
    assert kinds == {"solid", "part-solid", "ground-glass"}
    assert attachments == {"free", "juxta-pleural", "juxta-vascular"}


def test_vessel_trees_are_hard_negatives() -> None:
    for i in range(3):
        s = scan(i)
        radii = s.vessels[:, 6:8]
        assert radii.max() > 3.0 and radii.min() < 0.5  # hilum to sub-millimetre periphery
        not_nodule = s.lungs.copy()
        k, j, i_ = np.indices(s.image.shape, sparse=True)
        for n in s.nodules + s.excluded:
            c = (np.asarray(n.centre) - s.grid.origin) / s.grid.spacing
            r = (n.diameter + 4.0) / np.asarray(s.grid.spacing)
            not_nodule &= ((i_ - c[0]) / r[0]) ** 2 + ((j - c[1]) / r[1]) ** 2 + ((k - c[2]) / r[2]) ** 2 > 1
        assert np.mean(s.image[not_nodule] > -300) > 0.005


def test_lung_threshold_finds_two_lungs() -> None:
    s = scan(0)
    labels, _ = ndimage.label(s.image < -400)
    faces = [labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]]
    border = np.unique(np.concatenate([f.ravel() for f in faces]))
    labels[np.isin(labels, border)] = 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    two = np.argsort(sizes)[-2:]
    found = np.isin(labels, two)
    assert (found & s.lungs).sum() > 0.9 * s.lungs.sum()
    x_centres = [np.nonzero(labels == lab)[2].mean() for lab in two]
    centre_x = (s.lungs.nonzero()[2].min() + s.lungs.nonzero()[2].max()) / 2
    assert min(x_centres) < centre_x < max(x_centres)  # one on each side


def test_bad_arguments_are_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(InputError, match="--scans"):
        generate_cohort(tmp_path, scans=0)
    with pytest.raises(InputError, match="--seed"):
        generate_cohort(tmp_path, scans=1, seed=-1)
    (tmp_path / "file").write_text("x")
    assert main(["synth", "--out", str(tmp_path / "file"), "--scans", "1"]) == 2
    assert "error:" in capsys.readouterr().err


def world_hu(s, points: np.ndarray) -> np.ndarray:
    """HU of an in-memory scan at world points ``(n, 3)`` (LPS mm), trilinear."""
    index = (np.atleast_2d(points) - s.grid.origin) / s.grid.spacing
    return ndimage.map_coordinates(s.image.astype(float), index[:, ::-1].T, order=1, mode="nearest")


def in_lungs(s, points: np.ndarray) -> np.ndarray:
    """Which world points ``(n, 3)`` lie in the scan's lung mask."""
    index = np.rint((np.atleast_2d(points) - s.grid.origin) / s.grid.spacing).astype(int)
    inside = np.all((index >= 0) & (index < s.grid.size), axis=1)
    out = np.zeros(len(index), dtype=bool)
    out[inside] = s.lungs[tuple(index[inside][:, ::-1].T)]
    return out


def test_vessel_trees_are_connected_tapering_tubes_from_hilum_to_sub_millimetre() -> None:
    for i in range(3):
        s = scan(i)
        v = s.vessels
        ends = {tuple(np.round(e, 6)): r for e, r in zip(v[:, 3:6], v[:, 7])}
        parent_radius = [ends.get(tuple(np.round(p, 6))) for p in v[:, :3]]
        roots = [k for k, r in enumerate(parent_radius) if r is None]
        assert len(roots) == 4  # an artery and a vein tree per lung, each one connected tube
        assert all(v[k, 6] <= r + 1e-9 for k, r in enumerate(parent_radius) if r is not None)  # no bulge at joints
        assert np.all(v[:, 7] <= v[:, 6] + 1e-9)  # tapering along every capsule
        middle = 0.5 * (v[:, :3] + v[:, 3:6])
        diameters = 2 * v[in_lungs(s, middle), 6]
        assert diameters.min() < 1.0 and diameters.max() > 4.0, (diameters.min(), diameters.max())
        assert np.mean(diameters < 1.5) > 0.5  # most branches are thin, as in a real lung
        assert len(v) > 4000
        lung = s.image[s.lungs]
        # Real lungs (LIDC-IDRI-0001/0002): 3.1-3.3 % of lung voxels above -500 HU, 1.0-1.1 % above -300 HU.
        assert 0.015 < np.mean(lung > -500) < 0.09 and 0.004 < np.mean(lung > -300) < 0.05


def test_airways_are_air_in_a_wall_beside_their_artery() -> None:
    checked = 0
    for i in range(3):
        s = scan(i)
        airways, arteries = s.trees.airways, s.vessels[s.trees.airway_artery]
        assert np.all(s.trees.is_artery[s.trees.airway_artery])
        middle = 0.5 * (airways[:, :3] + airways[:, 3:6])
        lumen, outer = 0.5 * (airways[:, 8] + airways[:, 9]), 0.5 * (airways[:, 6] + airways[:, 7])
        artery_middle = 0.5 * (arteries[:, :3] + arteries[:, 3:6])
        gap = np.linalg.norm(middle - artery_middle, axis=1) - outer - 0.5 * (arteries[:, 6] + arteries[:, 7])
        assert np.median(gap) < 0.5  # beside their artery
        np.testing.assert_allclose(outer, 0.5 * (arteries[:, 6] + arteries[:, 7]), rtol=0.25)  # about its calibre
        pick = np.flatnonzero((lumen >= 1.3) & in_lungs(s, middle))
        inside, wall = [], []
        for r in pick:
            axis = airways[r, 3:6] - airways[r, :3]
            axis /= np.linalg.norm(axis)
            e1 = np.cross(axis, [0.3, 0.5, 0.8])
            e1 /= np.linalg.norm(e1)
            e2 = np.cross(axis, e1)
            angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
            around = np.cos(angles)[:, None] * e1 + np.sin(angles)[:, None] * e2
            ring = middle[r] + 0.5 * (lumen[r] + outer[r]) * around
            inside.append(world_hu(s, middle[r])[0])
            wall.append(world_hu(s, ring).mean())
        inside, wall = np.array(inside), np.array(wall)
        assert np.median(inside) < -700  # the lumen is air
        assert np.median(wall - inside) > 150  # inside a denser wall
        assert np.median(world_hu(s, artery_middle[pick])) > -300  # next to a (dense) artery
        checked += len(pick)
    assert checked > 20


def noise_only(thickness: float | None, sharpness: float, noise_hu: float = 30.0) -> np.ndarray:
    """Noise-only reconstruction of a 1.25 mm-spaced grid with the given slice thickness and kernel sharpness."""
    grid = ScanGrid((160, 150, 48), (0.7, 0.7, 1.25), (0.0, 0.0, 0.0), thickness)
    scanner = Scanner(sharpness, 0.65 - 0.35 * sharpness, 1.2 * sharpness**1.5, 1.0, noise_hu, 0.0, 1.0)
    volume = np.zeros(grid.shape, dtype=np.float32)
    reconstruct(volume, grid, scanner, np.random.default_rng(3))
    return volume


def test_slice_thickness_sets_the_z_correlation_of_noise_and_the_slice_profile() -> None:
    def z_correlation(v: np.ndarray) -> float:
        return float(np.corrcoef(v[:-1].ravel(), v[1:].ravel())[0, 1])

    contiguous, overlapping = noise_only(None, 0.5), noise_only(2.5, 0.5)
    assert contiguous.std() == pytest.approx(30.0, rel=0.05) and overlapping.std() == pytest.approx(30.0, rel=0.05)
    assert abs(z_correlation(contiguous)) < 0.03  # slices that do not overlap have independent noise
    assert z_correlation(overlapping) == pytest.approx(0.5, abs=0.03)  # half of each 2.5 mm slice is shared
    assert abs(float(np.corrcoef(overlapping[:-2].ravel(), overlapping[2:].ravel())[0, 1])) < 0.03

    # Edges: a 3 mm sphere spreads over more slices, and fainter, when each slice averages over a thicker slab.
    profiles = []
    for thickness in (None, 2.5, 5.0):
        grid = ScanGrid((40, 40, 40), (0.7, 0.7, 1.25), (-14.0, -14.0, -25.0), thickness)
        volume = np.zeros(grid.shape, dtype=np.float32)
        paint_spheres(volume, grid, np.array([[0.0, 0.0, 0.0]]), np.array([1.5]), 1000.0)
        profiles.append(volume.max(axis=(1, 2)))
    spread = [int(np.sum(p > 1.0)) for p in profiles]
    assert spread[0] < spread[1] < spread[2], spread
    assert profiles[0].max() > profiles[2].max()
    np.testing.assert_allclose([p.sum() for p in profiles[1:]], profiles[0].sum(), rtol=0.1)  # same object, smeared


def test_noise_power_spectrum_is_band_pass_and_its_peak_moves_with_the_kernel() -> None:
    peaks = []
    for sharpness in (0.0, 0.5, 1.0):
        frequency, power = radial_nps(noise_only(None, sharpness), 0.7)
        peaks.append(frequency[np.argmax(power)])
        assert power[0] < 0.3 * power.max()  # not white: little power at the lowest frequencies (the ramp filter)
        if sharpness <= 0.5:
            assert power[-1] < 0.5 * power.max()  # soft kernels roll off well before Nyquist
    assert peaks[0] < peaks[1] < peaks[2], peaks
    # Same dose, sharper kernel: noisier (the drawn scanner's noise follows its kernel).
    soft = Scanner.draw(np.random.default_rng(0), 1.25)
    assert Scanner(1.0, 0.3, 1.2, soft.dose, 0, 0, 0).noise_hu == 0
    draws = [Scanner.draw(np.random.default_rng(k), 1.25) for k in range(200)]
    sharp = [d.noise_hu * np.sqrt(d.dose) for d in draws if d.sharpness > 0.8 and d.noise_hu < 120]
    soft = [d.noise_hu * np.sqrt(d.dose) for d in draws if d.sharpness < 0.2 and d.noise_hu > 5]
    assert min(sharp) > 1.5 * max(soft)


def test_calcified_granulomas_are_dense_small_and_in_no_annotation_file(cohort: Path) -> None:
    rows = [r for name in ("annotations.csv", "annotations_excluded.csv") for r in read_rows(cohort / name)[1:]]
    uids = [row[0] for row in read_rows(cohort / "seriesuids.csv")]
    found = 0
    for i in range(6):
        s = scan(i)
        listed = np.array([[float(v) for v in r[1:4]] for r in rows if r[0] == s.seriesuid]).reshape(-1, 3)
        if i >= len(uids):
            listed = np.array([n.centre for n in s.nodules + s.excluded]).reshape(-1, 3)
        parenchyma = np.median(s.image[s.lungs])
        for x, y, z, radius, hu in s.mimics.granulomas:
            assert 2 * radius <= GRANULOMA_MAX_MM < 3.0  # under LUNA16's nodule size
            assert hu >= 300
            assert world_hu(s, np.array([x, y, z]))[0] > parenchyma + 150  # dense after blur and partial volume
            assert in_lungs(s, np.array([x, y, z]))[0]
            if len(listed):
                assert np.linalg.norm(listed - [x, y, z], axis=1).min() > 3.0  # not annotated, not excluded
            found += 1
    assert found > 0


def test_hard_negatives_all_occur_inside_the_lungs_clear_of_nodules() -> None:
    seen = {"granulomas": 0, "strands": 0, "plaques": 0, "holes": 0}
    for seed in range(16):
        rng = np.random.default_rng(seed)
        anatomy = ChestAnatomy.draw(rng, full_size=False)
        lungs = LungField(anatomy, 2.0)
        vessels = grow_vessel_trees(anatomy, lungs, rng, terminals_per_lung=100).vessels
        nodules, tiny = place_nodules(rng, lungs, vessels, count=4, tiny=2)
        mimics = draw_mimics(rng, anatomy, lungs, nodules + tiny)
        for name, points, radii in (
            ("granulomas", mimics.granulomas[:, :3], mimics.granulomas[:, 3]),
            ("strands", 0.5 * (mimics.strands[:, :3] + mimics.strands[:, 3:6]), mimics.strands[:, 6]),
            ("plaques", 0.5 * (mimics.plaques[:, :3] + mimics.plaques[:, 3:6]), mimics.plaques[:, 6]),
            ("holes", mimics.holes[:, :3], mimics.holes[:, 3]),
        ):
            seen[name] += len(points)
            if not len(points):
                continue
            if name == "plaques":  # on the pleura, half in the chest wall
                assert np.all(lungs.depth_at(points) < 3.0)
            else:
                assert np.all(lungs.depth_at(points) > 0), name
            for n in nodules + tiny:
                assert np.all(np.linalg.norm(points - n.centre, axis=1) > 0.5 * n.diameter), name
        assert np.all(mimics.strands[:, 8] < 100) and np.all(mimics.strands[:, 8] > -200)  # soft tissue, not bone
    assert all(count > 0 for count in seen.values()), seen


def test_fissures_are_thin_sheets_and_the_dependent_lung_is_denser() -> None:
    from dataclasses import replace

    rng = np.random.default_rng(5)
    anatomy = ChestAnatomy.draw(rng, full_size=False)
    grid = anatomy.grid
    thin = replace(anatomy, grid=replace(grid, spacing=(*grid.spacing[:2], 1.0), thickness=None))  # 1 mm slices
    plane = anatomy.plane()
    z = anatomy.fissures[0].z0
    flat = np.zeros(plane.radial.shape, dtype=np.float32)
    with_fissures, lung = replace(thin, fissures=anatomy.fissures[:2]).render_slice(plane, z, flat)  # major ones
    without, _ = replace(thin, fissures=()).render_slice(plane, z, flat)
    delta = np.where(lung, with_fissures - without, 0.0)
    assert np.all(delta >= 0)  # a fissure is denser than the parenchyma it crosses
    line = delta > 20
    assert line.sum() > 50 and not ndimage.binary_erosion(line, iterations=3).any()  # a thin line, not a patch
    assert 100 < delta.max() < 800
    thick_grid = replace(grid, spacing=(*grid.spacing[:2], 5.0), thickness=None)
    thick, _ = replace(anatomy, grid=thick_grid, fissures=anatomy.fissures[:2]).render_slice(plane, z, flat)
    assert np.where(lung, thick - without, 0.0).max() < 0.7 * delta.max()  # fainter and broader on thick slices
    rows = np.nonzero(lung)[0]
    back = without[lung][rows > np.quantile(rows, 0.75)]  # rows grow towards the back (LPS y)
    front = without[lung][rows < np.quantile(rows, 0.25)]
    assert back.mean() > front.mean() + 10


def test_cardiac_motion_blurs_only_near_the_heart_and_streaks_are_mild() -> None:
    anatomy = ChestAnatomy.draw(np.random.default_rng(4), full_size=False)
    plane = anatomy.plane()
    weight = anatomy.heart_motion(plane, anatomy.heart_centre[2])
    assert anatomy.heart_motion(plane, anatomy.heart_centre[2] + 1.01 * anatomy.heart_axes[2]) is None
    hx, hy = anatomy.heart_centre[0] - anatomy.cx, anatomy.heart_centre[1] - anatomy.cy
    centre = np.unravel_index(np.argmin((plane.dx - hx) ** 2 + (plane.dy - hy) ** 2), weight.shape)
    assert weight[centre] >= 0.6 and weight.max() == pytest.approx(1.0)  # in the heart; full on its left side
    far = np.hypot(plane.dx - hx, plane.dy - hy) > max(anatomy.heart_axes[:2]) + 16.0
    assert np.all(weight[far] == 0)
    # A vertical step edge: smeared where the weight is 1, untouched where it is 0.
    edge = np.where(np.arange(64)[None, :] < 32, -900.0, 40.0) * np.ones((64, 1), dtype=np.float32)
    blurred = edge.copy()
    w = np.zeros_like(edge)
    w[:32] = 1.0
    cardiac_blur(blurred, w, 2.0)
    assert np.abs(np.diff(blurred[10])).max() < 0.5 * 940 and np.array_equal(blurred[50], edge[50])

    grid = ScanGrid((128, 128, 30), (0.8, 0.8, 2.0), (-51.2, -51.2, 0.0))
    streaks = np.zeros(grid.shape, dtype=np.float32)
    add_bone_streaks(streaks, grid, (0.0, 0.0), 10.0, np.random.default_rng(0))
    assert 0 < np.abs(streaks).max() <= 6 * 10.0  # at most all six lines of a key frame crossing
    assert np.mean(np.abs(streaks) > 5.0) < 0.1  # thin lines, not a haze
    assert np.abs(np.corrcoef(streaks[10].ravel(), streaks[11].ravel())[0, 1]) > 0.8  # slowly changing along z
