"""The bundle under MONAI Label's own bundle tasks (``monailabel.tasks.infer.bundle.BundleInferTask`` and
``monailabel.tasks.train.bundle.BundleTrainTask``), installed by ``requirements-monailabel.txt``.

MONAI Label imports two packages at module level that it never uses on the detection path and that cannot be
installed on the CPU-only CI machine: ``torchvision`` (PyPI has only CUDA builds for Linux, which fail to load with
the CPU build of torch; ``monailabel.transform.post`` imports ``make_grid``/``save_image`` for 2-D pathology
overlays) and ``itk`` (1.6 GB; ``monailabel.transform.writer`` uses it to write label *images*). When they are
missing, :func:`monailabel_tasks` puts stand-ins into ``sys.modules`` for the import only; everything that runs is
MONAI Label's real code. With real ``torchvision``/``itk`` installed, those are used.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from custom_components.geometry import nodules_voxel_to_world
from custom_components.io import affine_from_sitk
from custom_components.network import build_network

REPO = Path(__file__).resolve().parents[1]
#: MONAI Label decides the task type from the bundle's folder name: it must contain "detection"
BUNDLE_NAME = "lung_nodule_detection"


def _stand_in(name: str) -> dict[str, types.ModuleType]:
    """Modules to put in ``sys.modules`` for ``name`` when it cannot be imported (see the module docstring)."""
    try:
        importlib.import_module(name)
        return {}
    except Exception:  # noqa: BLE001 - a CUDA torchvision raises RuntimeError on a CPU torch, not ImportError
        pass
    module = types.ModuleType(name)
    modules = {name: module}
    if name == "torchvision":
        utils = types.ModuleType("torchvision.utils")

        def unavailable(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("torchvision is not installed (MONAI Label's 2-D overlays need it)")

        utils.make_grid = utils.save_image = unavailable
        module.utils = utils
        modules["torchvision.utils"] = utils
    return modules


@pytest.fixture(scope="module")
def monailabel_tasks() -> types.SimpleNamespace:
    """MONAI Label's ``BundleInferTask``, ``BundleTrainTask`` and ``CallBackTypes`` (skips when MONAI Label is not
    installed: ``pip install --no-deps -r requirements-monailabel.txt``)."""
    if importlib.util.find_spec("monailabel") is None:
        pytest.skip("monailabel is not installed (pip install --no-deps -r requirements-monailabel.txt)")
    stand_ins = {**_stand_in("itk"), **_stand_in("torchvision")}
    sys.modules.update(stand_ins)
    try:
        from monailabel.tasks.infer.basic_infer import CallBackTypes
        from monailabel.tasks.infer.bundle import BundleInferTask
        from monailabel.tasks.train.bundle import BundleTrainTask
    finally:
        # MONAI's own optional imports of itk/torchvision elsewhere must keep seeing them as absent
        for name in stand_ins:
            sys.modules.pop(name, None)
    return types.SimpleNamespace(
        BundleInferTask=BundleInferTask, BundleTrainTask=BundleTrainTask, CallBackTypes=CallBackTypes
    )


def _write_bundle(root: Path) -> Path:
    """A copy of the bundle as MONAI Label's ``--conf models`` folder holds it: ``<root>/lung_nodule_detection`` with
    ``configs/`` (lean network, the CPU preset) and ``models/model.pt``, an untrained network whose noduleness prior
    is raised to 0.5 so that it reports detections (the trained weights are not in the repository)."""
    bundle = root / BUNDLE_NAME
    shutil.copytree(REPO / "configs", bundle / "configs")
    for name in ("inference.json", "train.json"):
        path = bundle / "configs" / name
        config = json.loads(path.read_text())
        config["network_preset"] = "lean"
        path.write_text(json.dumps(config))
    torch.manual_seed(0)
    network = build_network("lean", prior=0.5)
    (bundle / "models").mkdir()
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


def _write_phantom(path: Path) -> sitk.Image:
    """A small chest phantom: soft tissue (40 HU) in air (-1000 HU) with two lungs (-850 HU, ~250 mL each).

    2 x 2 x 4 mm voxels, 100 x 80 x 36; the direction flips x (``i`` grows to the patient's right, -x in LPS), so the
    preprocessing must re-orient it, and the origin is away from 0 so that mixing voxel and world coordinates shows.
    """
    size, spacing = (100, 80, 36), (2.0, 2.0, 4.0)
    i, j, k = np.meshgrid(*(np.arange(n) for n in size), indexing="ij")
    x, y, z = i * spacing[0], j * spacing[1], k * spacing[2]  # mm from the first voxel, along i, j, k
    volume = np.full(size, -1000, dtype=np.int16)
    volume[((x - 100) / 95) ** 2 + ((y - 80) / 75) ** 2 <= 1] = 40
    for centre in (60.0, 140.0):
        volume[((x - centre) / 30) ** 2 + ((y - 80) / 40) ** 2 + ((z - 72) / 50) ** 2 <= 1] = -850
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.transpose(2, 1, 0)))  # SimpleITK wants (k, j, i)
    image.SetSpacing(spacing)
    image.SetOrigin((120.0, -150.0, -320.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))
    return image


def _world_extent(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest LPS mm ``(3,)`` over the centres of the scan's corner voxels."""
    affine = affine_from_sitk(image)
    corners = np.array([[a, b, c, 1.0] for a in (0, image.GetSize()[0] - 1) for b in (0, image.GetSize()[1] - 1)
                        for c in (0, image.GetSize()[2] - 1)])
    world = corners @ affine.T
    return world[:, :3].min(axis=0), world[:, :3].max(axis=0)


def test_bundle_infer_task_boxes_in_world_lps(monailabel_tasks: types.SimpleNamespace, tmp_path: Path) -> None:
    """``BundleInferTask`` takes the bundle as a detection bundle, runs ``preprocessing``, the ``detector`` with the
    checkpoint's weights (``use_inferer=True``, the sliding window of ``detector_ops``) and ``postprocessing``, and
    writes 3D Slicer ROI boxes: centre and size in LPS mm of the input scan (MONAI's LUNA16 RetinaNet contract)."""
    bundle = _write_bundle(tmp_path)
    image = _write_phantom(tmp_path / "phantom.mhd")
    task = monailabel_tasks.BundleInferTask(str(bundle), conf={})
    assert task.is_valid()
    assert task.type == "detection"
    assert task.labels == {"nodule": 0}

    seen: dict[str, Any] = {}

    def keep_post_transformed(data: dict) -> dict:
        seen.update(data)
        return data

    label_file, result = task(
        {"image": str(tmp_path / "phantom.mhd"), "device": "cpu"},
        callbacks={monailabel_tasks.CallBackTypes.POST_TRANSFORMS: keep_post_transformed},
    )

    boxes = np.asarray(result["box"], dtype=np.float64)
    assert boxes.ndim == 2 and boxes.shape[1] == 6 and len(boxes) > 0
    assert result["label"] == [0] * len(boxes)
    low, high = _world_extent(image)
    centres, sizes = boxes[:, :3], boxes[:, 3:]
    # up to 1 mm past the outermost voxel centres: half a voxel of the rounded 1 mm grid, half a voxel of select_detections
    assert np.all(centres >= low - 1.001) and np.all(centres <= high + 1.001), (low, high, centres)
    # nodule cubes: the three sides are the diameter (1 mm voxels after preprocessing)
    np.testing.assert_allclose(sizes, sizes[:, :1].repeat(3, axis=1), atol=1e-3)
    assert np.all(sizes > 0)

    # the boxes are the detector's cubes mapped by the preprocessed image's affine (voxel -> LPS mm), exactly
    cubes = seen["cube"].cpu().numpy()
    world = nodules_voxel_to_world(cubes, np.asarray(seen["image"].affine, dtype=np.float64))
    np.testing.assert_allclose(centres, world[:, :3], atol=1e-2)
    np.testing.assert_allclose(sizes[:, 0], world[:, 3], atol=1e-2)

    # MONAI Label's Slicer ROI file: the same centres and sizes, declared LPS
    try:
        markups = json.loads(Path(label_file).read_text())["markups"]
    finally:
        Path(label_file).unlink()
    assert len(markups) == len(boxes)
    assert {m["coordinateSystem"] for m in markups} == {"LPS"}
    np.testing.assert_allclose([m["center"] for m in markups], centres)
    np.testing.assert_allclose([m["size"] for m in markups], sizes)


class _Datastore:
    """The part of MONAI Label's ``Datastore`` that ``BundleTrainTask`` reads: ``datalist()``."""

    def __init__(self, items: list[dict[str, str]]) -> None:
        self.items = items

    def datalist(self) -> list[dict[str, str]]:
        return self.items


def test_bundle_train_task_overrides_resolve(monailabel_tasks: types.SimpleNamespace, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``BundleTrainTask`` accepts ``configs/train.json`` and every id it overrides exists there and takes the
    override: ``bundle_root``, ``device``, ``train#trainer#max_epochs``, ``train#dataset#data``,
    ``validate#dataset#data``, ``train#handlers`` (with its ``CheckpointLoader`` of ``models/model.pt``).

    The training run itself is replaced by capturing its overrides: a whole training is not a unit test."""
    bundle = _write_bundle(tmp_path)
    items = []
    for n in range(5):  # MONAI Label's detection labels: Slicer ROI markups, centre + size in LPS mm
        label = tmp_path / f"scan{n}.json"
        label.write_text(json.dumps({"markups": [{"center": [10.0 * n, 0.0, -100.0], "size": [8.0, 8.0, 8.0]}]}))
        items.append({"image": str(tmp_path / f"scan{n}.mhd"), "label": str(label)})
    task = monailabel_tasks.BundleTrainTask(str(bundle), conf={})
    assert task.is_valid()

    captured: dict[str, Any] = {}
    monkeypatch.setattr(task, "run_single_gpu", lambda request, overrides: captured.update(overrides))
    task({"model": BUNDLE_NAME, "max_epochs": 2, "val_split": 0.2, "device": "cpu"}, _Datastore(items))

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    for key in captured:
        assert key in parser, f"MONAI Label overrides {key!r}, which configs/train.json lacks"
    parser.update(captured)
    assert parser.get_parsed_content("bundle_root") == str(bundle)
    assert str(parser.get_parsed_content("device")) == "cpu"
    assert parser.get_parsed_content("train#trainer#max_epochs") == 2
    assert len(parser["train#dataset#data"]) == 4 and len(parser["validate#dataset#data"]) == 1
    assert parser["train#dataset#data"][0] == {"image": items[0]["image"], "box": [[0.0, 0.0, -100.0, 8.0, 8.0, 8.0]],
                                              "label": [0]}
    handlers = parser["train#handlers"]
    # MONAI Label reads every entry as a dict and puts its CheckpointLoader first
    assert all(isinstance(h, dict) for h in handlers)
    assert handlers[0]["_target_"] == "CheckpointLoader"
    assert handlers[0]["load_path"] == str(bundle / "models" / "model.pt")
    assert parser.get_parsed_content("network_def").strides == (2, 4)


def test_monai_label_box_entries_become_nodules() -> None:
    """MONAI Label's datastore gives detection training entries as ``box`` (cccwhd, LPS mm) + ``label``: the training
    dataset reads them as this bundle's ``nodules`` rows (x, y, z, d)."""
    from custom_components.cache import as_datalist_entry

    entry = as_datalist_entry({"image": "a.nii.gz", "box": [[10.0, -20.0, -100.0, 8.0, 9.0, 10.0]], "label": [0]})
    assert entry == {"image": "a.nii.gz", "nodules": [[10.0, -20.0, -100.0, 9.0]]}
    ours = {"image": "b.mhd", "nodules": [[1.0, 2.0, 3.0, 4.0]]}
    assert as_datalist_entry(ours) is ours
