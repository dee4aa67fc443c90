"""Whole-scan inference: detections map back to the original scan's world mm; the inference config writes every
output file for a real scan; configs share one preprocessing chain; bad input paths give clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from custom_components.errors import InputError
from custom_components.scan_detection import ScanInference
from custom_components.scan_files import list_scans

ROOT = Path(__file__).resolve().parents[1]


def _phantom(path: Path, spacing, origin, direction, sphere_world) -> None:
    """A chest-like phantom: air outside a body (40 HU), two dark lungs (-850 HU) and a 12 mm sphere (300 HU) at
    ``sphere_world`` (LPS mm), written with the given anisotropic geometry."""
    size = (240, 200, 60)
    image = sitk.Image(size, sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1).reshape(-1, 3).astype(float)
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction).reshape(3, 3) @ np.diag(spacing)
    affine[:3, 3] = origin
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    centre = world.mean(axis=0)
    rel = world - centre
    body = (rel[:, 0] / 75) ** 2 + (rel[:, 1] / 60) ** 2 < 1
    lung_l = ((rel[:, 0] - 32) / 26) ** 2 + (rel[:, 1] / 40) ** 2 + (rel[:, 2] / 45) ** 2 < 1
    lung_r = ((rel[:, 0] + 32) / 26) ** 2 + (rel[:, 1] / 40) ** 2 + (rel[:, 2] / 45) ** 2 < 1
    sphere = np.linalg.norm(world - np.asarray(sphere_world), axis=1) < 6
    hu = np.full(len(idx), -1000.0)
    hu[body] = 40
    hu[lung_l | lung_r] = -850
    hu[sphere] = 300
    array = hu.reshape(size).transpose(2, 1, 0).astype(np.int16)  # SimpleITK arrays are (k, j, i)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path))


def test_a_detection_at_a_known_voxel_maps_back_to_the_right_world_mm(tmp_path):
    """Anisotropic spacing, a non-zero origin and flipped axes: preprocessing crops, re-orients and resamples; the
    detector's voxel cube at the sphere must come back at the sphere's world position."""
    from monai.bundle import ConfigParser

    direction = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    origin = (95.3, -142.7, 310.0)
    spacing = (0.71, 0.83, 2.5)
    # place the sphere in the left lung, in world mm
    probe = sitk.Image((240, 200, 60), sitk.sitkInt16)
    probe.SetSpacing(spacing)
    probe.SetOrigin(origin)
    probe.SetDirection(direction)
    centre = np.array(probe.TransformContinuousIndexToPhysicalPoint((119.5, 99.5, 29.5)))
    sphere = centre + np.array([-32.0, 4.0, 7.5])
    path = tmp_path / "phantom.mhd"
    _phantom(path, spacing, origin, direction, sphere)

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"network_preset": "lean", "device": "$torch.device('cpu')"})
    data = parser.get_parsed_content("preprocessing")({"image": str(path)})
    image = data["image"]
    # the sphere is the brightest blob of the preprocessed volume: its centroid in voxels of that volume
    vol = image[0].numpy()
    blob = np.argwhere(vol > 0.85)
    voxel = blob.mean(axis=0)

    class FixedDetector:
        """Stands in for the network: one detection at the given voxel cube (the mapping is under test)."""

        cube_key, pred_score_key = "cube", "label_scores"

        def __call__(self, images, use_inferer=False):
            return [{"cube": torch.tensor([[*voxel, 12.0]]), "label_scores": torch.tensor([0.9])}]

    engine = type("E", (), {"state": type("S", (), {"device": "cpu"})()})()
    (out,) = ScanInference(FixedDetector())(engine, [data])
    marks = out["detections"].marks
    np.testing.assert_allclose(marks[0, :3], sphere, atol=1.0)
    assert marks[0, 3] == pytest.approx(0.9)
    assert out["seriesuid"] == "phantom"


def test_list_scans_finds_files_and_dicom_series_and_refuses_bad_paths(tmp_path, lidc_0001_dicom):
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    scans = list_scans([tmp_path, lidc_0001_dicom])
    assert {"image": str(tmp_path / "a.nii.gz")} in scans
    dicom = [s for s in scans if Path(s["image"]).is_relative_to(lidc_0001_dicom)]
    assert len(dicom) == 1 and Path(dicom[0]["image"]).is_dir()
    with pytest.raises(InputError, match="no such file or folder"):
        list_scans(tmp_path / "missing.mhd")
    with pytest.raises(InputError, match="not a scan"):
        list_scans(tmp_path / "notes.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no scan found"):
        list_scans(empty)


def test_untrained_network_runs_on_a_real_scan_and_writes_every_output(lidc_dir, tmp_path):
    from custom_components.network import build_network

    torch.manual_seed(0)
    torch.save(build_network("lean").state_dict(), tmp_path / "model.pt")
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(ROOT / "configs" / "inference.json"),
        "--input", str(lidc_dir / f"{uid}.mhd"), "--output_dir", str(tmp_path / "out"),
        "--load_path", str(tmp_path / "model.pt"), "--network_preset", "lean", "--score_threshold", "0.0",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    for suffix in (".csv", ".json", ".mrk.json", ".png"):
        assert (out / f"{uid}{suffix}").is_file(), suffix
    detections = json.loads((out / f"{uid}.json").read_text())
    boxes = np.asarray(detections["box"])
    assert 0 < len(boxes) <= 100
    # every detection lies within 1 mm of the scan's outermost voxel centres (LPS mm, identity direction): half a
    # voxel of the rounded 1 mm grid of preprocessing, half a voxel of select_detections' rule
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(lidc_dir / f"{uid}.mhd"))
    reader.ReadImageInformation()
    lo = np.asarray(reader.GetOrigin())
    hi = lo + np.asarray(reader.GetSpacing()) * (np.asarray(reader.GetSize()) - 1)
    assert np.all(boxes[:, :3] >= lo - 1) and np.all(boxes[:, :3] <= hi + 1)
    markups = json.loads((out / f"{uid}.mrk.json").read_text())
    assert markups["markups"][0]["coordinateSystem"] == "LPS"


def test_a_folder_with_a_bad_scan_processes_the_good_ones_and_fails_loudly(tmp_path):
    """good, bad, good, and a good scan named like the first: both good scans get every output, the bad one and the
    namesake are listed in failed.csv (the namesake does not overwrite the first's files), the bad one is named on
    stderr's last line, the run exits 2 with no traceback, and a file an earlier run wrote for the bad scan is left as
    it was."""
    from custom_components.network import build_network

    torch.manual_seed(0)
    torch.save(build_network("lean", prior=0.5).state_dict(), tmp_path / "model.pt")
    scans = tmp_path / "scans"
    scans.mkdir()
    direction = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    for name in ("a_good", "c_good"):
        _phantom(scans / f"{name}.mhd", (1.5, 1.5, 2.5), (-180.0, -150.0, -75.0), direction, (-32.0, 4.0, 7.5))
    (scans / "same").mkdir()
    _phantom(scans / "same" / "a_good.mhd", (1.5, 1.5, 2.5), (-180.0, -150.0, -75.0), direction, (-32.0, 4.0, 7.5))
    bad = scans / "b_bad.mhd"
    bad.write_text((scans / "a_good.mhd").read_text().replace("a_good.raw", "gone.raw"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "b_bad.csv").write_text("written by an earlier run\n")
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(ROOT / "configs" / "inference.json"),
        "--input", str(scans), "--output_dir", str(out), "--load_path", str(tmp_path / "model.pt"),
        "--network_preset", "lean", "--png_top", "1",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 2 of 4 scans could not be read") and str(bad) in last, last
    for name in ("a_good", "c_good"):
        for suffix in (".csv", ".json", ".mrk.json", ".png"):
            assert (out / f"{name}{suffix}").is_file(), name + suffix
    rows = (out / "failed.csv").read_text().splitlines()
    assert rows[0] == "image,error" and len(rows) == 3 and rows[1].startswith(str(bad))
    # same/a_good.mhd is named like a_good.mhd: refused, not written over the first one's files
    assert rows[2].startswith(str(scans / "same" / "a_good.mhd")) and "also" in rows[2]
    assert (out / "b_bad.csv").read_text() == "written by an earlier run\n"
