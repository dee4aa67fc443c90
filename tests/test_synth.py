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
from bundle.synthetic.nodules import diameter_table, make_nodule, place_nodules
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


def test_scans_are_readable_ct_with_varied_anisotropic_spacing(cohort: Path) -> None:
    spacings = []
    for i, uid in enumerate(row[0] for row in read_rows(cohort / "seriesuids.csv")):
        image = sitk.ReadImage(str(cohort / f"subset{i % 10}" / f"{uid}.mhd"))
        assert image.GetPixelID() == sitk.sitkInt16
        assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        sx, sy, sz = image.GetSpacing()
        assert sx == sy and 0.6 <= sx <= 1.0 and 1.0 <= sz <= 2.5
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
        vessels = grow_vessel_trees(anatomy, lungs, rng, terminals_per_lung=200)
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
