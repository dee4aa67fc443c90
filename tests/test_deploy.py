"""MONAI Deploy: ``monai.bundle ckpt_export`` of the network with its configs, and ``python -m bundle.deploy_app`` on
the exported TorchScript file (LIDC-IDRI-0001's DICOM series when the real data is present)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ckpt_export

from bundle.deploy_app import NoduleDetectionOperator, main
from custom_components.io import affine_from_sitk, read_image
from custom_components.network import build_network

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """``model.ts`` exported as the docs say (``ckpt_export network_def --ckpt_file model.pt --meta_file
    configs/metadata.json --config_file configs/inference.json``, lean preset) from an untrained network whose
    noduleness prior is raised to 0.5 so that it reports detections; returns the file and the eager network."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    network = build_network("lean", prior=0.5)
    torch.save(network.state_dict(), folder / "model.pt")
    ckpt_export(
        net_id="network_def",
        filepath=str(folder / "model.ts"),
        ckpt_file=str(folder / "model.pt"),
        meta_file=str(REPO / "configs" / "metadata.json"),
        config_file=str(REPO / "configs" / "inference.json"),
        network_preset="lean",
    )
    return folder / "model.ts", network.eval()


def test_export_embeds_configs_and_scripts_the_network(exported: tuple[Path, torch.nn.Module]) -> None:
    """The TorchScript file holds the metadata and the inference config, keeps the attributes the detector reads,
    and computes what the eager network computes."""
    path, network = exported
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    metadata = json.loads(extra["metadata.json"])
    expected = json.loads((REPO / "configs" / "metadata.json").read_text())
    assert metadata["version"] == expected["version"]
    assert metadata["network_data_format"] == expected["network_data_format"]
    assert json.loads(extra["inference.json"]) == json.loads((REPO / "configs" / "inference.json").read_text())
    assert scripted.anchor_sizes == network.anchor_sizes and tuple(scripted.strides) == network.strides
    x = torch.rand(1, 1, 40, 36, 28)  # not a multiple of 16: the padding and cropping are scripted too
    with torch.no_grad():
        for got, want in zip(scripted(x), network(x)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_detection_operator_reads_the_embedded_config(exported: tuple[Path, torch.nn.Module]) -> None:
    """The operator's detector gets the TorchScript network and the config's settings."""
    op = NoduleDetectionOperator(exported[0], device="cpu")
    config = json.loads((REPO / "configs" / "inference.json").read_text())
    assert isinstance(op.detector.network, torch.jit.ScriptModule)
    assert op.detector.score_thresh == config["score_threshold"]
    assert op.detector.max_detections == config["max_detections"]
    assert op.image_key == "image"
    assert op.spec.inputs == ["scans"] and op.spec.outputs == ["detections"]


def test_app_rejects_a_file_without_embedded_configs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A plain ``torch.jit.save`` file lacks the configs: one ``error:`` line naming the file, exit status 2."""
    path = tmp_path / "bare.ts"
    torch.jit.save(torch.jit.script(build_network("lean")), str(path))
    assert main(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: holds no metadata.json, inference.json")


def test_app_on_lidc_dicom(exported: tuple[Path, torch.nn.Module], lidc_0001_dicom: Path, tmp_path: Path) -> None:
    """End to end on the LIDC-IDRI-0001 DICOM series: CSV, JSON, markups and PNG named by the SeriesInstanceUID, the
    same detections in each, every centre within the scan's world extent (LPS mm) up to the 1 mm grid's slack."""
    out = tmp_path / "out"
    assert main(["--input", str(lidc_0001_dicom), "--output", str(out), "--model", str(exported[0]),
                 "--device", "cpu"]) == 0

    loaded = read_image(lidc_0001_dicom)
    uid = loaded.seriesuid
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{uid}{s}" for s in (".csv", ".json", ".mrk.json", ".png"))
    size = np.array(loaded.image.GetSize())
    corners = np.array([[a, b, c, 1.0] for a in (0, size[0] - 1) for b in (0, size[1] - 1) for c in (0, size[2] - 1)])
    world = corners @ affine_from_sitk(loaded.image).T
    # A mark may lie up to 1 mm past the outermost voxel centres: the 1 mm grid of preprocessing overshoots them by up
    # to half a voxel (its shape is rounded) and select_detections keeps centres up to half a voxel past that grid.
    low, high = world[:, :3].min(axis=0) - 1.001, world[:, :3].max(axis=0) + 1.001

    with open(out / f"{uid}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["seriesuid"] for r in rows} == {uid}
    marks = np.array([[float(r[k]) for k in ("coordX", "coordY", "coordZ")] for r in rows])
    assert np.all(marks >= low) and np.all(marks <= high), (low, high)

    detections = json.loads((out / f"{uid}.json").read_text())
    assert detections["coordinate_system"] == "LPS" and detections["box_mode"] == "cccwhd"
    np.testing.assert_allclose(np.array(detections["box"])[:, :3], marks, atol=2e-3)

    points = json.loads((out / f"{uid}.mrk.json").read_text())["markups"][0]["controlPoints"]
    np.testing.assert_allclose([p["position"] for p in points], marks, atol=2e-3)
