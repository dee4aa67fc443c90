"""The MONAI Deploy application (``bundle/deploy_app.py``) run by the real App SDK (monai-deploy-app-sdk 4.0.0 on
Holoscan) on the LIDC-IDRI-0001 DICOM series, its DICOM structured report, and its answers to bad input.

Runs in the MONAI Deploy environment (``requirements-deploy.txt``, built by ``.ci/venv.sh deploy ...``; see
``docs/monai_deploy.md``); elsewhere the module is skipped, unless ``BUNDLE_REQUIRE_ENV=deploy`` (set by CI), where
a missing piece fails.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def _require_deploy_environment() -> None:
    missing = [name for name in ("monai.deploy", "holoscan", "highdicom") if not _importable(name)]
    if not missing:
        return
    reason = f"not the MONAI Deploy environment (missing {', '.join(missing)})"
    if os.environ.get("BUNDLE_REQUIRE_ENV") == "deploy":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # "monai.deploy" when monai itself is absent
        return False


_require_deploy_environment()

import highdicom as hd  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402

from bundle.deploy_app import NoduleDetectionOperator, main  # noqa: E402
from custom_components.dicom_sr import NODULENESS  # noqa: E402
from custom_components.network import build_network  # noqa: E402
from tests.conftest import LIDC_0001_UID  # noqa: E402
from tests.test_deploy import export_untrained  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = (".csv", ".json", ".mrk.json", ".png", ".SR.dcm")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.ts`` (with ``model.pt`` beside it) of the untrained lean network, exported with its configs."""
    return export_untrained(tmp_path_factory.mktemp("models"))[0]


def _series_folder(patient: Path) -> Path:
    return next(p.parent for p in sorted(patient.rglob("*.dcm")))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def app_and_bundle_outputs(exported: Path, lidc_0001_dicom: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The application on the LIDC-IDRI-0001 DICOM folder, and ``python -m monai.bundle run --config_file
    configs/inference.json`` on the same series with the same weights (``model.pt`` of the exported network), in
    fp32: the detector runs a TorchScript network in its own dtype whatever ``amp`` says (see ``NoduleDetector``)."""
    root = tmp_path_factory.mktemp("deploy")
    status = main(["--input", str(lidc_0001_dicom), "--output", str(root / "app"), "--model", str(exported),
                   "--device", "cpu"])
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--input",
         str(lidc_0001_dicom), "--output_dir", str(root / "bundle"), "--load_path", str(exported.with_suffix(".pt")),
         "--network_preset", "lean", "--device", "$torch.device('cpu')", "--amp", "none"],
        cwd=REPO, check=True, stdout=subprocess.DEVNULL,
    )
    return {"status": status, "app": root / "app", "bundle": root / "bundle", "series": _series_folder(lidc_0001_dicom)}


def test_detection_operator_reads_the_embedded_config(exported: Path) -> None:
    """The operator's detector gets the TorchScript network and the embedded config's settings."""
    from monai.deploy.core import Fragment

    op = NoduleDetectionOperator(Fragment(), model_path=exported, scan_path="unused.mhd", device="cpu")
    config = json.loads((REPO / "configs" / "inference.json").read_text())
    assert isinstance(op.detector.network, torch.jit.ScriptModule)
    assert op.detector.score_thresh == config["score_threshold"]
    assert op.detector.max_detections == config["max_detections"]
    assert op.image_key == "image"


def test_app_on_lidc_dicom_writes_what_the_bundle_writes(app_and_bundle_outputs: dict) -> None:
    """Exit status 0; CSV, JSON, markups, PNG and SR named by the SeriesInstanceUID; the CSV, the JSON and the markups
    are byte for byte what ``configs/inference.json`` writes for the same series with the same weights (the app reads
    the series with the SDK's operators and runs the TorchScript network, the bundle reads it with ITK and runs the
    eager network: the same voxels, the same arithmetic)."""
    out, ref = app_and_bundle_outputs["app"], app_and_bundle_outputs["bundle"]
    assert app_and_bundle_outputs["status"] == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(LIDC_0001_UID + s for s in SUFFIXES)
    rows = _rows(out / f"{LIDC_0001_UID}.csv")
    assert len(rows) > 0 and {r["seriesuid"] for r in rows} == {LIDC_0001_UID}
    for suffix in (".csv", ".json", ".mrk.json"):
        assert (out / f"{LIDC_0001_UID}{suffix}").read_bytes() == (ref / f"{LIDC_0001_UID}{suffix}").read_bytes(), suffix


def test_structured_report_references_the_series_and_holds_the_csv_points(app_and_bundle_outputs: dict) -> None:
    """The SR opens with pydicom and highdicom as a Comprehensive 3D SR of the input series' patient and study,
    lists every instance of the series as evidence, and holds one nodule per CSV row, highest noduleness first: its
    centre a 3D point in the series' frame of reference equal to the CSV's world LPS mm to 0.01 mm, its diameter
    and noduleness those of the JSON."""
    out, series_folder = app_and_bundle_outputs["app"], app_and_bundle_outputs["series"]
    source = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series_folder.glob("*.dcm"))]
    dataset = pydicom.dcmread(out / f"{LIDC_0001_UID}.SR.dcm")
    assert dataset.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
    assert dataset.Modality == "SR" and dataset.StudyInstanceUID == source[0].StudyInstanceUID
    assert dataset.PatientID == source[0].PatientID and dataset.SeriesInstanceUID != LIDC_0001_UID
    evidence = dataset.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in evidence] == [LIDC_0001_UID]
    assert {r.ReferencedSOPInstanceUID for r in evidence[0].ReferencedSOPSequence} == {s.SOPInstanceUID for s in source}

    report = hd.sr.srread(out / f"{LIDC_0001_UID}.SR.dcm")
    groups = report.content.get_volumetric_roi_measurement_groups()
    rows = _rows(out / f"{LIDC_0001_UID}.csv")
    boxes = json.loads((out / f"{LIDC_0001_UID}.json").read_text())
    assert len(groups) == len(rows) == len(boxes["box"])
    points = []
    for rank, group in enumerate(groups, start=1):
        assert group.tracking_identifier == f"nodule {rank}"
        assert group.finding_type.value == "27925004"  # SCT Nodule
        surface = group.roi
        assert surface.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert surface.frame_of_reference_uid == source[0].FrameOfReferenceUID
        assert surface.source_series_for_segmentation.value == LIDC_0001_UID
        points.append(np.asarray(surface.graphic_data, dtype=np.float64).reshape(3))
        diameter = group.get_measurements(name=hd.sr.CodedConcept("81827009", "SCT", "Diameter"))[0]
        assert diameter.unit.value == "mm" and diameter.value == pytest.approx(boxes["box"][rank - 1][3], abs=1e-3)
        noduleness = group.get_measurements(name=NODULENESS)[0]
        assert noduleness.value == pytest.approx(float(rows[rank - 1]["probability"]), abs=1e-5)
    csv_points = np.array([[float(r[k]) for k in ("coordX", "coordY", "coordZ")] for r in rows])
    np.testing.assert_allclose(np.array(points), csv_points, atol=0.01)


def _copy_slices(series: Path, folder: Path, count: int, **changes: str) -> None:
    """The first ``count`` slices of ``series`` into ``folder``, with the given attributes changed (new SOP instance
    UIDs when the series changes, so that the copies are other instances)."""
    folder.mkdir(parents=True)
    for path in sorted(series.glob("*.dcm"))[:count]:
        ds = pydicom.dcmread(path)
        for name, value in changes.items():
            setattr(ds, name, value)
        if "SeriesInstanceUID" in changes:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / path.name)


def _bad_inputs(root: Path, series: Path) -> dict[str, Path]:
    (root / "empty").mkdir(parents=True)
    _copy_slices(series, root / "two_series" / "a", 8)
    _copy_slices(series, root / "two_series" / "b", 8, SeriesInstanceUID=pydicom.uid.generate_uid())
    _copy_slices(series, root / "not_ct", 8, Modality="MR")
    return {"empty": root / "empty", "two_series": root / "two_series", "not_ct": root / "not_ct"}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "{input}: no DICOM series found"),
        ("two_series", "{input}: holds 2 CT series ("),
        ("not_ct", "{input}: no CT series (found MR series " + LIDC_0001_UID + ")"),
        ("bare_model", "{model}: holds no metadata.json, inference.json; export it with monai.bundle ckpt_export"),
    ],
)
def test_bad_input_one_error_line_exit_2_nothing_written(
    case: str, message: str, exported: Path, lidc_0001_dicom: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """Each bad input ends with one ``error:`` line on stderr naming the input and the problem, exit status 2, and
    no output folder."""
    series = _series_folder(lidc_0001_dicom)
    model = exported
    if case == "bare_model":
        model = tmp_path / "bare.ts"
        torch.jit.save(torch.jit.script(build_network("lean")), str(model))
        folder = series
    else:
        folder = _bad_inputs(tmp_path / "inputs", series)[case]
    out = tmp_path / "out"
    capfd.readouterr()
    assert main(["--input", str(folder), "--output", str(out), "--model", str(model), "--device", "cpu"]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: " + message.format(input=folder, model=model)), err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_app_on_a_scan_file(exported: Path, tmp_path: Path) -> None:
    """A ``.mhd`` file goes through the whole embedded preprocessing: CSV, JSON, markups and PNG (no SR: no DICOM
    series to reference), named by the file stem."""
    subprocess.run([sys.executable, "-m", "bundle", "synth", str(tmp_path / "cohort"), "--scans", "1"], cwd=REPO,
                   check=True, stdout=subprocess.DEVNULL)
    scan = next((tmp_path / "cohort").glob("subset*/*.mhd"))
    assert main(["--input", str(scan), "--output", str(tmp_path / "out"), "--model", str(exported),
                 "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(scan.stem + s for s in SUFFIXES[:-1])
    assert len(_rows(tmp_path / "out" / f"{scan.stem}.csv")) > 0
    shutil.rmtree(tmp_path / "cohort")
