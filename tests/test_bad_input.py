"""Bad input, case by case: each refused with one message naming the file and the problem, never read silently wrong.

``CASES`` is the matrix: ``(kind, make, exit status, message fragment)``. ``make(tmp_path, request)`` writes the
input and returns its path (it may ask ``request`` for the real-data fixtures, which skip when the data is absent).
Each case runs

* through the reader every path of the bundle uses (:func:`custom_components.io.read_image`, and MONAI's
  ``LoadCTd``): refused with :class:`InputError` holding the fragment and the path, or read with a warning;
* through a real command line in a subprocess (``python -m bundle bench-preprocess --image X``, which reads the
  scan with the preprocessing chain of ``configs/inference.json``): the exit status, one ``error:`` line naming the
  file and the problem, no traceback; for accepted inputs, exit 0 and the fragment on stderr (the warning).

Add a row to extend the matrix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from custom_components.errors import InputError
from custom_components.io import LoadCTd, read_image
from tests.conftest import LIDC_0001_UID

REPO = Path(__file__).resolve().parents[1]


def chest_hu(size=(128, 112, 48)) -> np.ndarray:
    """An int16 chest-like HU volume ``(K, J, I)`` (SimpleITK order) for ``size`` ``(I, J, K)``: air, a 40 HU body
    and two -850 HU lungs, so that preprocessing finds lungs."""
    i, j, k = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in size), indexing="ij")
    hu = np.full(size, -1000, dtype=np.int16)
    hu[i**2 + j**2 <= 0.8] = 40
    for centre in (-0.4, 0.4):
        hu[((i - centre) / 0.3) ** 2 + (j / 0.5) ** 2 + (k / 0.8) ** 2 <= 1] = -850
    return np.ascontiguousarray(hu.T)


def write(path: Path, array: np.ndarray, spacing=(0.8, 0.9, 2.5), compress: bool = False) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-50.0, -60.0, -300.0))
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def _lidc_0001(tmp: Path, request: pytest.FixtureRequest, copy_data: bool = False) -> tuple[Path, Path]:
    """LIDC-IDRI-0001's ``.mhd`` in ``tmp`` with its ``.zraw`` linked (or copied, to be damaged)."""
    lidc = request.getfixturevalue("lidc_dir")
    header = tmp / f"{LIDC_0001_UID}.mhd"
    data = tmp / f"{LIDC_0001_UID}.zraw"
    shutil.copy(lidc / header.name, header)
    (shutil.copy if copy_data else os.symlink)(lidc / data.name, data)
    return header, data


def zraw_garbage(tmp: Path, request) -> Path:
    header, data = _lidc_0001(tmp, request, copy_data=True)
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    data.write_bytes(raw)  # same size: SimpleITK decodes half the slices as garbage without raising
    return header


def zraw_bit_flip(tmp: Path, request) -> Path:
    header, data = _lidc_0001(tmp, request, copy_data=True)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(raw)
    return header


def spacing_times_20(tmp: Path, request) -> Path:
    header, _ = _lidc_0001(tmp, request)
    header.write_text(
        header.read_text().replace("ElementSpacing = 0.703125 0.703125 2.5", "ElementSpacing = 14.0625 14.0625 50")
    )
    return header


def raw_truncated(tmp: Path, request) -> Path:
    path = write(tmp / "scan.mhd", chest_hu())
    raw = tmp / "scan.raw"
    raw.write_bytes(raw.read_bytes()[:-4096])
    return path


def raw_too_long(tmp: Path, request) -> Path:
    path = write(tmp / "scan.mhd", chest_hu())
    with open(tmp / "scan.raw", "ab") as f:
        f.write(bytes(128 * 112 * 2))  # one slice more than the header says
    return path


def zraw_too_long(tmp: Path, request) -> Path:
    path = write(tmp / "scan.mhd", chest_hu(), compress=True)
    with open(tmp / "scan.zraw", "ab") as f:
        f.write(b"\0" * 100)
    return path


def nifti_gz_damaged(tmp: Path, request) -> Path:
    values = chest_hu() + np.random.default_rng(0).integers(-30, 30, chest_hu().shape).astype(np.int16)
    path = write(tmp / "scan.nii.gz", values)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(data)
    return path


def _nifti_float(tmp: Path, fill: Callable[[np.ndarray], None]) -> Path:
    values = chest_hu().astype(np.float32)
    fill(values)
    return write(tmp / "scan.nii.gz", values)


def nan_block(tmp: Path, request) -> Path:
    def fill(v):
        v[20:30, 40:50, 60:70] = np.nan  # (K, J, I): k 20..29, j 40..49, i 60..69

    return _nifti_float(tmp, fill)


def nan_in_mhd(tmp: Path, request) -> Path:
    values = chest_hu().astype(np.float32)
    values[0, 0, :3] = np.nan  # (K, J, I): k 0, j 0, i 0..2
    return write(tmp / "scan.mhd", values)


def nan_in_nii(tmp: Path, request) -> Path:
    values = chest_hu().astype(np.float32)
    values[47, 111, 127] = -np.inf  # the last voxel
    return write(tmp / "scan.nii", values)


def header_larger_than_a_body(tmp: Path, request) -> Path:
    """A NIfTI header declaring 4000^3 voxels of 1 mm and no voxel data: refused from the header alone (reading the
    voxels would fail, or allocate 238 GiB)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((4000, 4000, 4000))
    header.set_zooms((1.0, 1.0, 1.0))
    header.set_sform(np.eye(4), code=1)
    path = tmp / "scan.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4)  # vox_offset 352: the voxels would start here
    return path


def all_nan(tmp: Path, request) -> Path:
    return _nifti_float(tmp, lambda v: v.fill(np.nan))


def one_inf(tmp: Path, request) -> Path:
    def fill(v):
        v[5, 6, 7] = np.inf

    return _nifti_float(tmp, fill)


def two_slices(tmp: Path, request) -> Path:
    return write(tmp / "scan.mhd", chest_hu((512, 512, 2)), spacing=(0.7, 0.7, 2.5))


def five_cubed(tmp: Path, request) -> Path:
    return write(tmp / "scan.nii.gz", chest_hu((5, 5, 5)), spacing=(1.0, 1.0, 1.0))


def larger_than_a_body(tmp: Path, request) -> Path:
    return write(tmp / "scan.mhd", chest_hu((300, 300, 40)), spacing=(8.0, 8.0, 2.5))


def slices_10mm(tmp: Path, request) -> Path:
    return write(tmp / "scan.mhd", chest_hu((128, 112, 24)), spacing=(0.8, 0.9, 10.0))


def _dicom_copy(tmp: Path, request) -> tuple[Path, list[Path]]:
    """A copy of the LIDC-IDRI-0001 series folder and its slice files in order of position (inferior first)."""
    source = next(
        p for p in request.getfixturevalue("lidc_0001_dicom").rglob("*") if p.is_dir() and any(p.glob("*.dcm"))
    )
    folder = tmp / "series"
    shutil.copytree(source, folder)
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return folder, [Path(f) for f in files]


def _tag(path: Path, tag: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetMetaData(tag).strip()


def dicom_duplicate(tmp: Path, request) -> Path:
    folder, files = _dicom_copy(tmp, request)
    middle = files[66]
    sop = _tag(middle, "0008|0018")
    other = sop[:-1] + ("1" if sop[-1] != "1" else "2")  # same length: the file stays valid DICOM
    (folder / "duplicate.dcm").write_bytes(middle.read_bytes().replace(sop.encode(), other.encode()))
    return folder


def dicom_missing(tmp: Path, request) -> Path:
    folder, files = _dicom_copy(tmp, request)
    files[66].unlink()
    return folder


def dicom_uneven(tmp: Path, request) -> Path:
    folder, files = _dicom_copy(tmp, request)
    position = _tag(files[66], "0020|0032")  # "-166.000000\-171.699997\-175.000000"
    x, y, z = position.split("\\")
    moved = f"{float(z) + 0.5:.6f}"
    assert len(moved) == len(z)
    data = files[66].read_bytes()
    files[66].write_bytes(data.replace(position.encode(), f"{x}\\{y}\\{moved}".encode()))
    return folder


# (kind, make, exit status of the command, fragment of the message: the error line, or the warning for status 0)
CASES = [
    (
        "zraw-garbage-bytes",
        zraw_garbage,
        2,
        ".zraw is damaged (zlib: Error -3 while decompressing data: invalid stored block lengths; after ",
    ),
    (
        "zraw-one-bit-flipped",
        zraw_bit_flip,
        2,
        "incorrect data check; the decoded voxels are not those that were written)",
    ),
    ("raw-truncated", raw_truncated, 2, "data file scan.raw is truncated"),
    ("raw-too-long", raw_too_long, 2, "data file scan.raw is too long"),
    ("zraw-too-long", zraw_too_long, 2, "data file scan.zraw is too long"),
    ("nifti-gz-damaged", nifti_gz_damaged, 2, "scan.nii.gz is damaged (zlib:"),
    ("nan-block", nan_block, 2, "1000 NaN voxels of 688128, within voxels i 60..69, j 40..49, k 20..29"),
    ("nan-in-mhd", nan_in_mhd, 2, "3 NaN voxels of 688128, within voxels i 0..2, j 0..0, k 0..0"),
    ("inf-in-nii", nan_in_nii, 2, "1 infinite voxels of 688128, within voxels i 127..127, j 111..111, k 47..47"),
    ("all-nan", all_nan, 2, "all 688128 voxels are NaN or infinite"),
    ("one-inf", one_inf, 2, "1 infinite voxels of 688128, within voxels i 7..7, j 6..6, k 5..5"),
    ("two-slices", two_slices, 2, "covers only 5 mm along k (2 voxels of 2.5 mm"),
    ("5x5x5", five_cubed, 2, "covers only 5 mm along i (5 voxels of 1 mm"),
    ("spacing-x20", spacing_times_20, 2, "voxel spacing 14.06 x 14.06 x 50 mm is coarser than any CT"),
    ("larger-than-a-body", larger_than_a_body, 2, "cover 2400 x 2400 x 100 mm (576 l), larger than any body"),
    ("header-larger-than-a-body", header_larger_than_a_body, 2, "cover 4000 x 4000 x 4000 mm (6.4e+04 l)"),
    ("slices-10mm", slices_10mm, 0, "voxel spacing 0.8 x 0.9 x 10 mm is coarser than 5 mm"),
    ("dicom-duplicate-slice", dicom_duplicate, 2, "1 duplicated position(s) -175 mm ("),
    ("dicom-missing-slice", dicom_missing, 2, "1 gap(s) where slices are missing, -177.5 to -172.5 mm"),
    ("dicom-uneven-spacing", dicom_uneven, 2, "uneven spacing, 3 mm from -177.5 to -174.5 mm"),
]
IDS = [case[0] for case in CASES]


@pytest.mark.parametrize("kind, make, status, fragment", CASES, ids=IDS)
def test_reader(kind, make, status, fragment, tmp_path: Path, request, caplog: pytest.LogCaptureFixture):
    path = make(tmp_path, request)
    if status == 0:
        with caplog.at_level(logging.WARNING):
            read_image(path)
        warnings = [r.getMessage() for r in caplog.records if fragment in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].startswith(str(path)) and "\n" not in warnings[0]
        return
    with pytest.raises(InputError) as err:
        read_image(path)
    message = str(err.value)
    assert fragment in message and message.startswith(str(path)) and "\n" not in message
    with pytest.raises(InputError, match="^" + re.escape(message) + "$"):
        LoadCTd(keys="image")({"image": str(path)})


@pytest.mark.parametrize("kind, make, status, fragment", CASES, ids=IDS)
def test_command_line(kind, make, status, fragment, tmp_path: Path, request):
    path = make(tmp_path, request)
    run = subprocess.run(
        [sys.executable, "-m", "bundle", "bench-preprocess", "--image", str(path), "--repeats", "1", "--threads", "1"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == status, run.stderr[-2000:]
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    if status == 0:
        assert fragment in run.stderr
        return
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, run.stderr[-2000:]
    assert errors[0].startswith(f"error: {path}: ") and fragment in errors[0]
    assert "Uncompress failed" not in run.stderr + run.stdout  # ITK's bare line for a damaged .zraw: said by ours


BACKGROUNDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "backgrounds"


def test_real_scans_pass_unchanged_on_the_fast_path(
    lidc_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """The four real chest CTs (5 mm slices included) pass every check without a warning, and their ``.zraw``
    checksums match SimpleITK's voxels: the stream is never inflated a second time."""
    import custom_components.compressed_data as compressed_data

    def no_second_inflate(*args, **kwargs):
        raise AssertionError("the checksum fast path missed an intact .zraw")

    monkeypatch.setattr(compressed_data, "_inflate", no_second_inflate)
    scans = sorted(lidc_dir.glob("*.mhd")) + sorted(BACKGROUNDS.glob("*/image.mhd"))
    with caplog.at_level(logging.WARNING):
        for scan in scans:
            image = read_image(scan).image
            np.testing.assert_array_equal(
                sitk.GetArrayViewFromImage(image), sitk.GetArrayFromImage(sitk.ReadImage(str(scan)))
            )
    assert len(scans) >= 2 and not caplog.records


# ------------------------------------------------------------------ the workflows: monai.bundle run of each config
#
# Each row: (kind, make(tmp) -> (command arguments, the file the message must name), message fragment). Every row
# runs `python -m monai.bundle run ...` in a subprocess and asserts exit status 2, exactly one `error:` line that
# names the file and holds the fragment, no traceback, and every file that was there before byte-identical.


def _model(tmp: Path, preset: str = "lean") -> Path:
    from custom_components.network import build_network

    torch.manual_seed(0)
    path = tmp / f"{preset}.pt"
    torch.save(build_network(preset).state_dict(), path)
    return path


def _scan(tmp: Path) -> Path:
    return write(tmp / "scan.mhd", chest_hu())


def _inference(tmp: Path, model: Path, input_path: Path, *extra: str) -> list[str]:
    return ["--config_file", str(REPO / "configs" / "inference.json"), "--input", str(input_path),
            "--output_dir", str(tmp / "out"), "--load_path", str(model), *extra]  # fmt: skip


def infer_missing_input(tmp: Path):
    return _inference(tmp, _model(tmp), tmp / "nowhere.mhd", "--network_preset", "lean"), tmp / "nowhere.mhd"


def infer_empty_folder(tmp: Path):
    (tmp / "empty").mkdir()
    return _inference(tmp, _model(tmp), tmp / "empty", "--network_preset", "lean"), tmp / "empty"


def infer_missing_model(tmp: Path):
    return _inference(tmp, tmp / "gone.pt", _scan(tmp), "--network_preset", "lean"), tmp / "gone.pt"


def infer_random_bytes_model(tmp: Path):
    model = tmp / "random.pt"
    model.write_bytes(np.random.default_rng(0).bytes(4096))
    return _inference(tmp, model, _scan(tmp), "--network_preset", "lean"), model


def infer_truncated_model(tmp: Path):
    model = _model(tmp)
    model.write_bytes(model.read_bytes()[:5000])
    return _inference(tmp, model, _scan(tmp), "--network_preset", "lean"), model


def infer_other_preset(tmp: Path):
    model = _model(tmp, "lean")
    return _inference(tmp, model, _scan(tmp), "--network_preset", "paper"), model


def infer_unwritable_output(tmp: Path):
    blocker = tmp / "out"
    blocker.write_text("a file where the output folder should be")
    return _inference(tmp, _model(tmp), _scan(tmp), "--network_preset", "lean"), blocker


def _training(tmp: Path, datalist: Path, *extra: str) -> list[str]:
    return ["training", "--config_file", f"['{REPO / 'configs' / 'train.json'}','{REPO / 'configs' / 'demo.json'}']",
            "--bundle_root", str(tmp), "--data_list_file_path", str(datalist), "--fold", "-1", *extra]  # fmt: skip


def train_missing_datalist(tmp: Path):
    return _training(tmp, tmp / "datalist.json"), tmp / "datalist.json"


def train_missing_image(tmp: Path):
    datalist = tmp / "datalist.json"
    datalist.write_text(json.dumps({"scans": [{"image": str(tmp / "gone.mhd"), "seriesuid": "1.2.3", "fold": 0}]}))
    return _training(tmp, datalist), datalist


def train_unwritable_checkpoints(tmp: Path):
    datalist = tmp / "datalist.json"
    scan = {"image": str(_scan(tmp)), "seriesuid": "1.2.3", "fold": 0, "nodules": [[0.0, 0.0, 0.0, 8.0]]}
    datalist.write_text(json.dumps({"scans": [scan]}))
    (tmp / "models").write_text("a file where the checkpoint folder should be")
    return _training(tmp, datalist), tmp / "models"


WORKFLOW_CASES = [
    ("inference-missing-input", infer_missing_input, "no such file or folder"),
    ("inference-empty-folder", infer_empty_folder, "no scan found"),
    ("inference-missing-model", infer_missing_model, "model file not found"),
    ("inference-random-bytes-model", infer_random_bytes_model, "not a readable model file"),
    ("inference-truncated-model", infer_truncated_model, "not a readable model file"),
    ("inference-other-preset", infer_other_preset, "do not fit the configured 'paper' network"),
    ("inference-unwritable-output", infer_unwritable_output, "cannot write detections there"),
    ("training-missing-datalist", train_missing_datalist, "file not found"),
    ("training-missing-image", train_missing_image, "not found"),
    ("training-unwritable-checkpoints", train_unwritable_checkpoints, "cannot write the model file there"),
]


@pytest.mark.parametrize("kind, make, fragment", WORKFLOW_CASES, ids=[c[0] for c in WORKFLOW_CASES])
def test_workflow_command_line(kind, make, fragment, tmp_path: Path):
    args, named = make(tmp_path)
    if not (tmp_path / "out").exists():  # an earlier run's output, which a refused run must leave as it was
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "1.2.3.csv").write_text("seriesuid,coordX,coordY,coordZ,probability\n")
    before = _files(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args], check=False, cwd=REPO, capture_output=True, text=True,
        timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 2, run.stdout[-1500:] + run.stderr[-2000:]
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr[-2000:]
    assert errors[0].startswith(f"error: {named}") and fragment in errors[0], errors[0]
    after = _files(tmp_path)
    assert {name: after.get(name) for name in before} == before, "a refused run changed an earlier file"


SETTING_CASES = [
    ("training", ["--epochs", "0"], "setting epochs = 0: expected a whole number >= 1 (set it with --epochs)"),
    ("training", ["--batch_size", "2.5"], "setting batch_size = 2.5: expected a whole number >= 1"),
    ("training", ["--learning_rate", "-0.01"], "setting learning_rate = -0.01: expected a number > 0"),
    ("training", ["--neg_iou", "0.4"], "settings neg_iou = 0.4 and pos_iou = 0.3: neg_iou must be below pos_iou"),
    ("training", ["--tile_size", "40"], "setting tile_size = 40: expected 0 (one pass) or a whole number >= 80"),
    ("inference", ["--score_threshold", "1.5"], "setting score_threshold = 1.5: expected a number in [0, 1]"),
    ("inference", ["--png_top", "-1"], "setting png_top = -1: expected a whole number >= 0"),
    ("inference", ["--max_detections", "0"], "setting max_detections = 0: expected a whole number >= 1"),
]


@pytest.mark.parametrize(
    "command, extra, message", SETTING_CASES, ids=[f"{c[0]}-{c[1][0][2:]}" for c in SETTING_CASES]
)
def test_setting_refused_before_any_scan_is_read(command, extra, message, tmp_path: Path):
    """A setting that cannot work ends the run with one line naming it, before any scan is read or any file written
    (before this check ``--epochs 0`` failed in Ignite after preprocessing every scan, with a traceback, and
    ``--png_top -1`` silently drew a PNG titled "no detections" for a scan with marks)."""
    scan = _scan(tmp_path)
    if command == "training":
        datalist = tmp_path / "datalist.json"
        entry = {"image": str(scan), "seriesuid": "1.2.3", "fold": 0, "nodules": [[0.0, 0.0, 0.0, 8.0]]}
        datalist.write_text(json.dumps({"scans": [entry]}))
        args = _training(tmp_path, datalist, *extra)
    else:
        args = _inference(tmp_path, _model(tmp_path), scan, "--network_preset", "lean", *extra)
    before = set(_files(tmp_path))
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args], check=False, cwd=REPO, capture_output=True, text=True,
        timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), run.stderr[-2000:]
    assert set(_files(tmp_path)) == before and not (tmp_path / "cache").exists()


# ------------------------------------------------------------ the data tools: python -m bundle froc, prepare-luna16, ...
#
# Each row: (kind, make(tmp) -> (command arguments, the file the message must name), message fragment). Before each
# run, ``tmp/earlier`` holds the outputs of a good run (a FROC report); every row asserts exit status 2, one `error:`
# line naming the file with the fragment, no traceback, and ``tmp/earlier`` byte-identical afterwards.


def _luna_tables(tmp: Path) -> dict[str, Path]:
    tables = {
        "annotations": "seriesuid,coordX,coordY,coordZ,diameter_mm\nA,0,0,0,10\n",
        "excluded": "seriesuid,coordX,coordY,coordZ,diameter_mm\n",
        "seriesuids": "A\nB\n",
        "submission": "seriesuid,coordX,coordY,coordZ,probability\nA,1,0,0,0.9\nB,0,0,0,0.4\n",
    }
    for name, text in tables.items():
        (tmp / f"{name}.csv").write_text(text)
    return {name: tmp / f"{name}.csv" for name in tables}


def _froc(tables: dict[str, Path], out: Path | None = None, **changed: Path) -> list[str]:
    args = ["froc"] + [f"--{k}={v}" for k, v in {**tables, **changed}.items()]
    return args + ([f"--out={out}"] if out is not None else [])


def _blocker(tmp: Path) -> Path:
    blocker = tmp / "blocker"
    blocker.write_text("a file where a folder should be")
    return blocker


def froc_unwritable_out(tmp: Path):
    return _froc(_luna_tables(tmp), _blocker(tmp)), tmp / "blocker"


def froc_out_under_a_file(tmp: Path):
    return _froc(_luna_tables(tmp), _blocker(tmp) / "report"), tmp / "blocker" / "report"


def froc_missing_submission(tmp: Path):
    return _froc(_luna_tables(tmp), tmp / "earlier", submission=tmp / "gone.csv"), tmp / "gone.csv"


def froc_duplicate_seriesuid(tmp: Path):
    (tmp / "dup.csv").write_text("A\nB\nA\n")
    return _froc(_luna_tables(tmp), tmp / "earlier", seriesuids=tmp / "dup.csv"), tmp / "dup.csv"


def froc_malformed_seriesuid(tmp: Path):
    (tmp / "odd.csv").write_text("A\nB C\n")
    return _froc(_luna_tables(tmp), tmp / "earlier", seriesuids=tmp / "odd.csv"), tmp / "odd.csv"


def froc_bad_coordinate(tmp: Path):
    (tmp / "bad.csv").write_text("seriesuid,coordX,coordY,coordZ,probability\nA,1,zero,0,0.9\n")
    return _froc(_luna_tables(tmp), tmp / "earlier", submission=tmp / "bad.csv"), tmp / "bad.csv"


def prepare_unwritable_out(tmp: Path):
    cohort = tmp / "cohort"
    (cohort / "subset0").mkdir(parents=True)
    write(cohort / "subset0" / "1.2.3.mhd", chest_hu((16, 16, 8)))
    _luna_tables(cohort)
    return ["prepare-luna16", f"--luna-root={cohort}", f"--out={_blocker(tmp)}/datalist.json"], tmp / "blocker"


def prepare_missing_root(tmp: Path):
    return ["prepare-luna16", f"--luna-root={tmp / 'nowhere'}", f"--out={tmp / 'earlier'}"], tmp / "nowhere"


def synth_unwritable_out(tmp: Path):
    return ["synth", f"--out={_blocker(tmp)}", "--scans=1"], tmp / "blocker"


def realism_unwritable_out(tmp: Path):
    scan = _scan(tmp)
    return ["realism", f"--cohort={scan}", f"--reference={scan}", f"--out={_blocker(tmp)}"], tmp / "blocker"


TOOL_CASES = [
    ("froc-unwritable-out", froc_unwritable_out, "cannot write the FROC report there (a file, not a folder)"),
    ("froc-out-under-a-file", froc_out_under_a_file, "cannot write the FROC report there (Not a directory)"),
    ("froc-missing-submission", froc_missing_submission, "file not found"),
    ("froc-duplicate-seriesuid", froc_duplicate_seriesuid, "row 3: seriesuid A is already listed at row 1"),
    ("froc-malformed-seriesuid", froc_malformed_seriesuid, "row 2: 'B C' is not a seriesuid"),
    ("froc-bad-coordinate", froc_bad_coordinate, "row 2: coordY is 'zero', not a finite number"),
    ("prepare-unwritable-out", prepare_unwritable_out, "cannot write the datalist there (a file, not a folder)"),
    ("prepare-missing-root", prepare_missing_root, "not a folder"),
    ("synth-unwritable-out", synth_unwritable_out, "cannot write the cohort there (a file, not a folder)"),
    ("realism-unwritable-out", realism_unwritable_out, "cannot write the realism report there (a file, not a folder)"),
]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind, make, fragment", TOOL_CASES, ids=[c[0] for c in TOOL_CASES])
def test_tool_command_line(kind, make, fragment, tmp_path: Path):
    earlier, good = tmp_path / "earlier", tmp_path / "good"
    good.mkdir()
    run = [sys.executable, "-m", "bundle"]
    subprocess.run([*run, *_froc(_luna_tables(good), earlier), "--bootstrap=0"], check=True, cwd=REPO, capture_output=True)
    before = _files(earlier)
    assert sorted(before) == ["froc.csv", "froc.json", "froc.png"]
    args, named = make(tmp_path)
    result = subprocess.run([*run, *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stdout[-1500:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == result.stderr.strip(), result.stderr[-2000:]
    assert errors[0].startswith(f"error: {named}") and fragment in errors[0], errors[0]
    assert _files(earlier) == before
    if (tmp_path / "blocker").exists():
        assert (tmp_path / "blocker").read_text() == "a file where a folder should be"
