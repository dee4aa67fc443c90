"""Per-scan output writers (custom_components.writers): LUNA16 CSV round trip, MONAI detection JSON, 3D Slicer markups
(checked against the v1.0.3 schema's constraints and Slicer's schema-id rule), the PNG's radiological orientation, and
the Ignite handler."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import jsonschema
import matplotlib.image
import numpy as np
import pytest
import torch
from ignite.engine import Engine

from custom_components.errors import InputError
from custom_components.luna16_tables import read_submission
from custom_components.scan_detection import ScanDetections
from custom_components.writers import (
    MARKUPS_SCHEMA,
    DetectionWriter,
    display_position,
    radiological_slice,
    write_detection_json,
    write_detection_png,
    write_luna_csv,
    write_slicer_markups,
)

UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
# marks (x, y, z, p) in world LPS mm, deliberately not sorted by probability
MARKS = np.array(
    [
        [-100.25, 67.5, -231.125, 0.40],
        [46.1234, -20.5, -110.0, 0.93],
        [-3.0, 12.75, -180.4567, 0.71],
    ]
)
DIAMETERS = np.array([6.0, 12.5, 4.2])
ORDER = [1, 2, 0]  # by probability, highest first

# The constraints of Slicer's markups-schema-v1.0.3.json that a Fiducial file touches (required fields, enums,
# types, array lengths), so the test needs no network.
SLICER_MARKUPS_SCHEMA = {
    "type": "object",
    "required": ["@schema", "markups"],
    "properties": {
        "@schema": {"type": "string"},
        "markups": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type"],
                "properties": {
                    "type": {"enum": ["Fiducial", "Line", "Angle", "Curve", "ClosedCurve", "Plane", "ROI"]},
                    "name": {"type": "string"},
                    "coordinateSystem": {"enum": ["LPS", "RAS"]},
                    "coordinateUnits": {"enum": ["mm", "um"]},
                    "locked": {"type": "boolean"},
                    "fixedNumberOfControlPoints": {"type": "boolean"},
                    "labelFormat": {"type": "string"},
                    "lastUsedControlPointNumber": {"type": "integer"},
                    "controlPoints": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "id": {"type": "string"},
                                "label": {"type": "string"},
                                "description": {"type": "string"},
                                "associatedNodeID": {"type": "string"},
                                "position": {
                                    "type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3
                                },
                                "selected": {"type": "boolean"},
                                "locked": {"type": "boolean"},
                                "visibility": {"type": "boolean"},
                                "positionStatus": {"enum": ["undefined", "preview", "defined"]},
                            },
                        },
                    },
                    "measurements": {"type": "array"},
                    "display": {"type": "object"},
                },
            },
        },
    },
}
# vtkMRMLMarkupsJsonStorageNode accepts a file only when its lower-cased @schema matches this
SLICER_ACCEPTED_SCHEMA = re.compile(r".*markups-schema-v1\.[0-9]+\.[0-9]+\.json#*$")


def test_csv_round_trip(tmp_path: Path) -> None:
    path = write_luna_csv(UID, MARKS, tmp_path / f"{UID}.csv")
    back = read_submission(path)
    assert list(back) == [UID]
    np.testing.assert_allclose(back[UID][:, :3], MARKS[ORDER, :3], atol=1e-3)
    np.testing.assert_allclose(back[UID][:, 3], MARKS[ORDER, 3], atol=1e-6)


def test_csv_without_marks_is_header_only(tmp_path: Path) -> None:
    path = write_luna_csv(UID, np.zeros((0, 4)), tmp_path / "empty.csv")
    assert path.read_text().strip() == "seriesuid,coordX,coordY,coordZ,probability"
    assert read_submission(path) == {}


def test_bad_marks_shape_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="x.csv: marks must be"):
        write_luna_csv(UID, np.zeros((2, 3)), tmp_path / "x.csv")
    with pytest.raises(InputError, match="3 marks need 3 diameters"):
        write_detection_json(UID, MARKS, tmp_path / "x.json", diameters=[1.0])


def test_detection_json(tmp_path: Path) -> None:
    path = write_detection_json(UID, MARKS, tmp_path / f"{UID}.json", image_path="/data/a.mhd", diameters=DIAMETERS)
    content = json.loads(path.read_text())
    assert content["seriesuid"] == UID
    assert content["image"] == "/data/a.mhd"
    assert content["coordinate_system"] == "LPS"
    assert content["box_mode"] == "cccwhd"
    assert content["label"] == [0, 0, 0]
    scores = content["label_scores"]
    assert scores == sorted(scores, reverse=True) == pytest.approx(MARKS[ORDER, 3])
    boxes = np.array(content["box"])
    assert boxes.shape == (3, 6)
    np.testing.assert_allclose(boxes[:, :3], MARKS[ORDER, :3], atol=1e-3)
    for side in range(3, 6):  # a nodule is a cube of side d
        np.testing.assert_allclose(boxes[:, side], DIAMETERS[ORDER], atol=1e-3)
    empty = json.loads(write_detection_json(UID, [], tmp_path / "e.json", diameters=[]).read_text())
    assert empty["box"] == empty["label"] == empty["label_scores"] == [] and empty["image"] is None


def test_slicer_markups(tmp_path: Path) -> None:
    path = write_slicer_markups(UID, MARKS, tmp_path / f"{UID}.mrk.json", diameters=DIAMETERS)
    assert path.name.endswith(".mrk.json")
    content = json.loads(path.read_text())
    jsonschema.validate(content, SLICER_MARKUPS_SCHEMA)
    assert content["@schema"] == MARKUPS_SCHEMA
    assert MARKUPS_SCHEMA.endswith("markups-schema-v1.0.3.json#")
    assert SLICER_ACCEPTED_SCHEMA.match(content["@schema"].lower())
    assert len(content["markups"]) == 1
    markup = content["markups"][0]
    assert markup["type"] == "Fiducial"
    assert markup["coordinateSystem"] == "LPS" and markup["coordinateUnits"] == "mm"
    points = markup["controlPoints"]
    assert len(points) == len(MARKS)
    np.testing.assert_allclose([p["position"] for p in points], MARKS[ORDER, :3], atol=1e-3)
    assert [p["label"] for p in points] == ["N1 0.93", "N2 0.71", "N3 0.40"]
    assert "12.5 mm" in points[0]["description"]
    assert all(p["positionStatus"] == "defined" for p in points)
    assert len({p["id"] for p in points}) == len(points)


def test_radiological_orientation_of_the_display_helpers() -> None:
    image = np.random.default_rng(0).random((7, 5, 3))
    view = radiological_slice(image, 2)
    assert view.shape == (5, 7)  # rows = j (anterior -> posterior), columns = i (patient right -> left)
    for i, j in [(0, 0), (6, 1), (3, 4)]:
        col, row = display_position(i, j)
        assert view[int(row), int(col)] == image[i, j, 2]
    # larger x (patient's left) further right, larger y (posterior) further down
    (c0, r0), (c1, r1) = display_position(10, 10), display_position(20, 30)
    assert c1 > c0 and r1 > r0


def _reddish(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)


def test_png_circle_is_drawn_on_the_sphere_in_radiological_orientation(tmp_path: Path) -> None:
    shape = (80, 60, 40)
    centre = np.array([60.0, 15.0, 22.0])  # patient's left (large i), anterior (small j)
    diameter = 12.0
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    image = np.full(shape, 0.5, dtype=np.float32)
    image[np.linalg.norm(grid - centre, axis=-1) <= diameter / 2 - 1] = 1.0
    cubes = np.array([[*centre, diameter]])

    path = write_detection_png(image, cubes, np.array([0.9]), tmp_path / "one.png", top=1)
    rgba = matplotlib.image.imread(path)
    assert rgba.shape[0] > 200 and rgba.shape[1] > 200
    rgb = rgba[..., :3]
    # the image area: rows/columns mostly made of the 0.5 grey background
    grey = (np.abs(rgb - 0.5) < 0.02).all(axis=-1)
    rows = np.flatnonzero(grey.sum(axis=1) > 0.8 * grey.sum(axis=1).max())
    cols = np.flatnonzero(grey.sum(axis=0) > 0.8 * grey.sum(axis=0).max())
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    assert (right - left) / (bottom - top) == pytest.approx(shape[0] / shape[1], rel=0.05)  # columns are i, rows j
    px = (right - left) / shape[0]  # pixels per voxel

    red_rows, red_cols = np.nonzero(_reddish(rgb))
    assert red_rows.size > 20
    # where the sphere centre must appear: column from i (left to right = patient right to left), row from j
    expect_col = left + (centre[0] + 0.5) * px
    expect_row = top + (centre[1] + 0.5) * px
    assert red_cols.mean() == pytest.approx(expect_col, abs=1.5 * px)
    assert red_rows.mean() == pytest.approx(expect_row, abs=1.5 * px)
    # a circle of diameter d: the red pixels lie about d/2 from the centre
    radius = np.hypot(red_cols - expect_col, red_rows - expect_row)
    assert np.median(radius) == pytest.approx(diameter / 2 * px, abs=1.5 * px)
    # the bright sphere lies inside the circle, at its centre
    white = (rgb > 0.95).all(axis=-1)
    white[:top] = white[bottom:] = False
    white[:, :left] = white[:, right:] = False
    w_rows, w_cols = np.nonzero(white)
    assert w_cols.mean() == pytest.approx(expect_col, abs=px) and w_rows.mean() == pytest.approx(expect_row, abs=px)


def test_png_panels_and_no_detections(tmp_path: Path) -> None:
    image = np.zeros((40, 40, 30), dtype=np.float32)
    cubes = np.array([[10, 10, 10, 5], [30, 30, 12, 8], [20, 20, 15, 6], [5, 35, 20, 4], [25, 5, 25, 3.0]])
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    one = matplotlib.image.imread(write_detection_png(image, cubes[:1], scores[:1], tmp_path / "a.png", top=4))
    four = matplotlib.image.imread(write_detection_png(image, cubes, scores, tmp_path / "b.png", top=4, title=UID))
    none = matplotlib.image.imread(write_detection_png(image, np.zeros((0, 4)), np.zeros(0), tmp_path / "c.png"))
    assert four.shape[1] == pytest.approx(4 * one.shape[1], rel=0.02)  # one panel per top detection
    assert none.shape[1] == one.shape[1] and none.shape[0] >= 200
    with pytest.raises(InputError, match="5 cubes but 2 scores"):
        write_detection_png(image, cubes, scores[:2], tmp_path / "d.png")


def _scan(uid: str, n: int, rng: np.random.Generator, tensors: bool = False) -> dict:
    cubes = np.column_stack([rng.uniform(5, 25, (n, 3)), rng.uniform(3, 10, n)])
    scores = np.sort(rng.random(n))[::-1]
    # world rows of a grid that is not 1 mm: the files must take the world diameter, never the voxel cube's side
    world = np.column_stack([cubes[:, :3] * 0.8 + [-150.0, -120.0, -300.0], cubes[:, 3] * 0.8])
    image = rng.random((30, 30, 30)).astype(np.float32)
    return {
        "seriesuid": uid,
        "image_path": f"/data/{uid}.mhd",
        "detections": ScanDetections(world=world, scores=scores, cubes=cubes),
        "image": torch.from_numpy(image) if tensors else image,
    }


def test_handler_writes_every_file_of_every_scan(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # MONAI's logger does not propagate to the root logger caplog listens on; hand it caplog's handler directly
    monai_logger = logging.getLogger("nodule_detection")
    monai_logger.addHandler(caplog.handler)
    rng = np.random.default_rng(1)
    batches = [[_scan("1.2.3", 3, rng), _scan("1.2.4", 0, rng)], [_scan("1.2.5", 2, rng, tensors=True)]]
    engine = Engine(lambda engine, batch: batch)
    out = tmp_path / "detections"
    DetectionWriter(out, png_top=2).attach(engine)
    try:
        engine.run(batches, max_epochs=1)
    finally:
        monai_logger.removeHandler(caplog.handler)

    names = sorted(p.name for p in out.iterdir())
    suffixes = (".csv", ".json", ".mrk.json", ".png")
    expected = sorted([f"{uid}{ext}" for uid in ("1.2.3", "1.2.4", "1.2.5") for ext in suffixes] + ["failed.csv"])
    assert names == expected  # and so no temporary file is left behind
    assert (out / "failed.csv").read_text().splitlines() == ["image,error"]  # every scan written, none failed
    for uid, n in (("1.2.3", 3), ("1.2.4", 0), ("1.2.5", 2)):
        assert len(read_submission(out / f"{uid}.csv").get(uid, [])) == n
        assert len(json.loads((out / f"{uid}.json").read_text())["box"]) == n
        assert len(json.loads((out / f"{uid}.mrk.json").read_text())["markups"][0]["controlPoints"]) == n
        assert matplotlib.image.imread(out / f"{uid}.png").shape[0] > 100
    scan = batches[0][0]
    boxes = np.array(json.loads((out / "1.2.3.json").read_text())["box"])
    np.testing.assert_allclose(boxes[:, 3], scan["detections"].world[:, 3], atol=1e-3)
    np.testing.assert_allclose(boxes[:, :3], scan["detections"].world[:, :3], atol=1e-3)
    lines = [r.getMessage() for r in caplog.records if r.name == "nodule_detection"]
    assert len(lines) == 3 and lines[0].startswith("1.2.3: 3 detections")


def test_handler_flags_and_bad_uid(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    writer = DetectionWriter(tmp_path, csv=True, json=False, markups=False, png=False)
    assert [p.name for p in writer.write_scan(_scan("9.9", 1, rng))] == ["9.9.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["9.9.csv"]
    with pytest.raises(InputError, match="cannot name a file"):
        writer.write_scan(_scan("../x", 1, rng))
