"""LUNA16 tables, scan discovery, the datalist, fold selection and the prepare-luna16 command."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bundle.prepare_luna16 import prepare_luna16
from custom_components.datalist import load_datalist, select_fold
from custom_components.errors import InputError
from custom_components.luna16 import build_datalist, find_scans, fold_of
from tests.conftest import LIDC_0001_UID, LIDC_0002_UID

REPO = Path(__file__).resolve().parents[1]
HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
UID_A, UID_B, UID_C = "1.2.840.1.11", "1.2.840.1.22", "1.2.840.1.33"


def _csv_rows(path: Path, uid: str) -> list[list[float]]:
    with open(path, newline="") as f:
        return [[float(r["coordX"]), float(r["coordY"]), float(r["coordZ"]), float(r["diameter_mm"])]
                for r in csv.DictReader(f) if r["seriesuid"] == uid]  # fmt: skip


def _fake_luna(root: Path) -> Path:
    """subset3/ with A, subset8/subset8/ with B (a doubly unzipped folder), C flat; files are empty placeholders."""
    (root / "subset3").mkdir(parents=True)
    (root / "subset8" / "subset8").mkdir(parents=True)
    for path in (root / "subset3" / UID_A, root / "subset8" / "subset8" / UID_B, root / UID_C):
        path.with_name(f"{path.name}.mhd").write_text("")
    (root / "subset3" / f"{UID_A}.raw").write_text("")
    (root / "annotations.csv").write_text(
        HEADER + f"{UID_A},1,2,3,4.5\n{UID_A},-10,20.5,-30,12\n{UID_C},7,8,9,6\n1.2.840.1.99,0,0,0,5\n"
    )
    (root / "annotations_excluded.csv").write_text(HEADER + f"{UID_B},4,5,6,-1\n")
    return root


@pytest.mark.filterwarnings("ignore:.*annotations_excluded.csv.*:UserWarning")
def test_prepare_luna16_on_real_data(lidc_dir: Path, tmp_path: Path, capsys):
    with pytest.warns(UserWarning, match=r"annotations\.csv: 600 of 601 series \(1185 rows\) are not under"):
        prepare_luna16(str(lidc_dir), str(tmp_path))
    out = capsys.readouterr().out
    assert "2 scans, 1 nodules" in out and str(tmp_path / "datalist.json") in out

    datalist = load_datalist(tmp_path / "datalist.json")
    scans = {scan["seriesuid"]: scan for scan in datalist["scans"]}
    assert set(scans) == {LIDC_0001_UID, LIDC_0002_UID}
    assert datalist["root"] == str(lidc_dir.resolve())
    for uid, scan in scans.items():
        assert scan["image"] == str((lidc_dir / f"{uid}.mhd").resolve())
        assert scan["subset"] is None  # a flat folder
        assert scan["fold"] == int(hashlib.sha1(uid.encode()).hexdigest(), 16) % 5
        assert scan["nodules"] == _csv_rows(lidc_dir / "annotations.csv", uid)
        assert scan["excluded"] == _csv_rows(lidc_dir / "annotations_excluded.csv", uid)
    assert scans[LIDC_0001_UID]["nodules"] == [[56.20840547, 86.34341278, -115.8675792, 23.35064438]]
    assert scans[LIDC_0002_UID]["nodules"] == []
    lesion = [row for row in scans[LIDC_0002_UID]["excluded"] if row[3] > 0]  # the ~23 mm lesion, two readers
    assert len(scans[LIDC_0002_UID]["excluded"]) == 53 and len(lesion) == 2 and all(20 < r[3] < 25 for r in lesion)


@pytest.mark.filterwarnings("ignore:.*are not under.*:UserWarning")
def test_build_datalist_subsets_and_folds(tmp_path: Path):
    root = _fake_luna(tmp_path / "luna")
    assert {uid: subset for uid, (_, subset) in find_scans(root).items()} == {UID_A: 3, UID_B: 8, UID_C: None}
    with pytest.warns(UserWarning, match=r"annotations\.csv: 1 of 3 series \(1 rows\) are not under"):
        datalist = build_datalist(root)
    scans = {scan["seriesuid"]: scan for scan in datalist["scans"]}
    assert [scans[u]["fold"] for u in (UID_A, UID_B)] == [1, 4]
    assert scans[UID_C]["fold"] == fold_of(UID_C, None) == int(hashlib.sha1(UID_C.encode()).hexdigest(), 16) % 5
    assert scans[UID_A]["nodules"] == [[1.0, 2.0, 3.0, 4.5], [-10.0, 20.5, -30.0, 12.0]]
    assert scans[UID_B]["nodules"] == [] and scans[UID_B]["excluded"] == [[4.0, 5.0, 6.0, -1.0]]
    assert scans[UID_A]["image"] == str((root / "subset3" / f"{UID_A}.mhd").resolve())

    out = tmp_path / "lists" / "cv.json"
    prepare_luna16(str(root), str(out))
    datalist = load_datalist(out)
    assert [s["seriesuid"] for s in select_fold(datalist, 1, "validation")] == [UID_A]
    assert UID_A not in [s["seriesuid"] for s in select_fold(datalist, 1, "training")]
    assert len(select_fold(datalist, 1, "training")) == 2 and len(select_fold(datalist, 1, "all")) == 3
    assert len(select_fold(out, -1, "training")) == len(select_fold(datalist, -1, "validation")) == 3
    with pytest.raises(InputError, match="fold 5"):
        select_fold(datalist, 5, "training")
    with pytest.raises(InputError, match="split 'test'"):
        select_fold(datalist, 0, "test")


def test_no_scans_is_an_error(tmp_path: Path):
    (tmp_path / "annotations.csv").write_text(HEADER + f"{UID_A},1,2,3,4\n")
    with pytest.raises(InputError, match=rf"{tmp_path}: no scans found"):
        build_datalist(tmp_path)


def test_load_datalist_checks_images(tmp_path: Path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"scans": [{"image": "gone.mhd", "seriesuid": UID_A, "fold": 0}]}))
    with pytest.raises(InputError, match=rf"datalist\.json: scan 0 \({UID_A}\): image .*gone\.mhd not found"):
        load_datalist(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match=r"datalist\.json: not a JSON datalist"):
        load_datalist(path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bundle", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)


def test_cli_prepare_luna16(tmp_path: Path):
    root = _fake_luna(tmp_path / "luna")
    done = _cli("prepare-luna16", "--luna-root", str(root), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "3 scans, 3 nodules" in done.stdout
    assert len(json.loads((tmp_path / "out" / "datalist.json").read_text())["scans"]) == 3

    (root / "annotations.csv").write_text(HEADER + f"{UID_A},1,2,x,4\n")
    failed = _cli("prepare-luna16", "--luna-root", str(root), "--out", str(tmp_path / "out"))
    assert failed.returncode == 2
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {root / 'annotations.csv'}: row 2: coordZ is 'x', not a finite number"]
    assert "Traceback" not in failed.stderr


def test_cli_prepare_luna16_joins_several_roots(tmp_path: Path):
    """The demo's synthetic and hybrid cohorts: two roots, one datalist, each scan with its own root's rows; a
    seriesuid under both roots is one error line."""
    first = _fake_luna(tmp_path / "first")
    second = tmp_path / "second"
    (second / "subset1").mkdir(parents=True)
    (second / "subset1" / "1.2.840.2.5.mhd").write_text("")
    (second / "annotations.csv").write_text(HEADER + "1.2.840.2.5,5,6,7,8\n")
    done = _cli("prepare-luna16", "--luna-root", f"{first},{second}", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    scans = {s["seriesuid"]: s for s in load_datalist(tmp_path / "out" / "datalist.json")["scans"]}
    assert set(scans) == {UID_A, UID_B, UID_C, "1.2.840.2.5"}
    assert scans["1.2.840.2.5"]["nodules"] == [[5.0, 6.0, 7.0, 8.0]] and scans["1.2.840.2.5"]["fold"] == 0
    assert scans[UID_A]["nodules"] == [[1.0, 2.0, 3.0, 4.5], [-10.0, 20.5, -30.0, 12.0]]
    (second / "subset1" / f"{UID_C}.mhd").write_text("")
    failed = _cli("prepare-luna16", "--luna-root", f"{first},{second}", "--out", str(tmp_path / "out2"))
    assert failed.returncode == 2
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {second.resolve()}: seriesuid {UID_C} is also under {first.resolve()}"]
    assert "Traceback" not in failed.stderr
