"""Per-scan outputs of whole-scan inference: a LUNA16 CSV, a MONAI detection JSON, a 3D Slicer markups file and a
PNG of the top detections, plus :class:`DetectionWriter`, the Ignite handler that writes them for every scan.

Coordinates (``docs/conventions.md``):

- *marks* are ``(N, 4)`` rows ``(x, y, z, probability)`` in **world LPS mm** of the original scan (LUNA16's
  ``coordX, coordY, coordZ``); *diameters* ``(N,)`` are in mm. The CSV, JSON and markups files hold world LPS mm.
- *cubes* are ``(N, 4)`` rows ``(ci, cj, ck, d)`` in **voxel indices** of the preprocessed volume (1 mm voxels,
  ``LPS`` axcodes), so ``d`` in voxels is also the diameter in mm. Only the PNG, which draws that volume, uses them.

Every file is written atomically through :func:`custom_components.atomic.atomic_write`.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle
from monai.apps.utils import get_logger

from custom_components.atomic import atomic_write, writable_folder
from custom_components.errors import InputError
from custom_components.luna16_tables import write_submission

__all__ = [
    "MARKUPS_SCHEMA",
    "PRIMARY_COLOR",
    "OTHER_COLOR",
    "write_luna_csv",
    "write_detection_json",
    "write_slicer_markups",
    "radiological_slice",
    "display_position",
    "write_detection_png",
    "DetectionWriter",
]

# the schema id Slicer itself writes (it accepts any markups-schema-v1.x.y; "master" is kept for Slicer < 5.1)
MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
PRIMARY_COLOR = "#ff0000"  # the circle of the panel's own detection
OTHER_COLOR = "#00ffff"  # thinner circles of the other detections crossing the same slice
SCORE_COLOR = "#ffff00"  # score text: not the circle's red, so the circle stays findable by colour

logger = get_logger("nodule_detection")


def _marks(marks: Any, path: str | os.PathLike) -> np.ndarray:
    rows = np.asarray(marks, dtype=np.float64)
    if rows.size == 0:
        return np.zeros((0, 4))
    if rows.ndim != 2 or rows.shape[1] != 4:
        raise InputError(f"{path}: marks must be (N, 4) rows (x, y, z, probability), got shape {rows.shape}")
    return rows


def _diameters(diameters: Any, n: int, path: str | os.PathLike) -> np.ndarray:
    d = np.asarray(diameters, dtype=np.float64).reshape(-1)
    if d.shape != (n,):
        raise InputError(f"{path}: {n} marks need {n} diameters, got {d.size}")
    return d


def _by_score(scores: np.ndarray) -> np.ndarray:
    # stable, so equal scores keep the detector's order in every file
    return np.argsort(-scores, kind="stable")


def write_luna_csv(seriesuid: str, marks: np.ndarray, path: str | os.PathLike) -> Path:
    """Write one scan's LUNA16 submission CSV ``seriesuid,coordX,coordY,coordZ,probability`` (header, then one row
    per mark, highest probability first), through :func:`custom_components.froc_report.write_submission` so the
    per-scan files concatenate into a whole-cohort submission.

    Args:
        seriesuid: the scan's LUNA16 seriesuid.
        marks: ``(N, 4)`` rows ``(x, y, z, probability)``, world LPS mm.
        path: the CSV to write.
    """
    return write_submission({seriesuid: _marks(marks, path)}, path)


def write_detection_json(
    seriesuid: str,
    marks: np.ndarray,
    path: str | os.PathLike,
    image_path: str | os.PathLike | None = None,
    *,
    diameters: np.ndarray | Sequence[float],
) -> Path:
    """Write one scan's detections as the JSON of MONAI's LUNA16 RetinaNet bundle (``DetectionSaver``) and MONAI
    Label's detection writer, highest score first::

        {"seriesuid": ..., "image": <image_path or null>, "coordinate_system": "LPS", "box_mode": "cccwhd",
         "box": [[x, y, z, d, d, d], ...], "label": [0, ...], "label_scores": [p, ...]}

    A nodule is a sphere, so its box is the cube of side ``d`` centred on the mark (MONAI's ``CenterSizeMode``,
    ``cccwhd``), in world LPS mm; every box has label 0 (nodule).

    Args:
        seriesuid: the scan's seriesuid.
        marks: ``(N, 4)`` rows ``(x, y, z, probability)``, world LPS mm.
        path: the JSON to write.
        image_path: the scan the detections belong to (written as ``"image"``).
        diameters: ``(N,)`` diameter in mm of each mark, row for row (the marks carry no size).
    """
    rows = _marks(marks, path)
    d = _diameters(diameters, len(rows), path)
    order = _by_score(rows[:, 3])
    content = {
        "seriesuid": seriesuid,
        "image": None if image_path is None else str(image_path),
        "coordinate_system": "LPS",
        "box_mode": "cccwhd",
        "box": [[*(round(float(v), 3) for v in rows[i, :3]), *[round(float(d[i]), 3)] * 3] for i in order],
        "label": [0] * len(rows),
        "label_scores": [round(float(rows[i, 3]), 6) for i in order],
    }
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
    return Path(path)


def write_slicer_markups(
    seriesuid: str,
    marks: np.ndarray,
    path: str | os.PathLike,
    *,
    diameters: np.ndarray | Sequence[float],
) -> Path:
    """Write one scan's detections as a 3D Slicer markups file (``.mrk.json``, schema v1.0.3): one ``Fiducial``
    markup whose control points are the marks, highest score first, at their world LPS mm positions
    (``coordinateSystem`` ``"LPS"``, so Slicer converts to its RAS itself), labelled ``"N<rank> <score>"`` with the
    score and diameter in the description. Load with *Add Data* or ``slicer.util.loadMarkups(path)`` over the scan.

    Args:
        seriesuid: the scan's seriesuid (the markup's name).
        marks: ``(N, 4)`` rows ``(x, y, z, probability)``, world LPS mm.
        path: the file to write; Slicer recognises it by the ``.mrk.json`` suffix.
        diameters: ``(N,)`` diameter in mm of each mark, row for row.
    """
    rows = _marks(marks, path)
    d = _diameters(diameters, len(rows), path)
    points = [
        {
            "id": str(rank),
            "label": f"N{rank} {rows[i, 3]:.2f}",
            "description": f"noduleness {rows[i, 3]:.4f}, diameter {d[i]:.1f} mm",
            "associatedNodeID": "",
            "position": [round(float(v), 3) for v in rows[i, :3]],
            "selected": True,
            "locked": True,
            "visibility": True,
            "positionStatus": "defined",
        }
        for rank, i in enumerate(_by_score(rows[:, 3]), start=1)
    ]
    content = {
        "@schema": MARKUPS_SCHEMA,
        "markups": [
            {
                "type": "Fiducial",
                "name": f"detections {seriesuid}",
                "coordinateSystem": "LPS",
                "coordinateUnits": "mm",
                # detections are results, not edits: locked so a click in a slice view does not move them
                "locked": True,
                "fixedNumberOfControlPoints": False,
                "labelFormat": "N%d",
                "lastUsedControlPointNumber": len(points),
                "controlPoints": points,
                "measurements": [],
                "display": {"visibility": True, "pointLabelsVisibility": True, "color": [1.0, 0.5, 0.0]},
            }
        ],
    }
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
    return Path(path)


def radiological_slice(image: np.ndarray, k: int) -> np.ndarray:
    """The axial slice ``k`` of a preprocessed ``(I, J, K)`` volume as a 2-D ``(J, I)`` array to show with
    ``imshow(origin="upper")`` in radiological convention.

    The volume is LPS-oriented: ``i`` grows to the patient's Left, ``j`` to Posterior. Radiologically the patient's
    right is on the image's left and anterior is up, i.e. image columns grow to the patient's left (= ``+i``) and
    image rows grow downwards to posterior (= ``+j``). So rows are ``j`` and columns ``i``: a plain transpose of
    ``image[:, :, k]``, with no flip.
    """
    return np.asarray(image[:, :, k]).T


def display_position(ci: float, cj: float) -> tuple[float, float]:
    """Where voxel ``(ci, cj)`` of an axial slice lies on :func:`radiological_slice`'s image: ``(column, row)`` in
    the data coordinates of ``imshow(origin="upper")`` (voxel centres at integer indices). Larger ``x``/``i``
    (patient left) is further right, larger ``y``/``j`` (posterior) further down."""
    return float(ci), float(cj)


def _draw_panel(ax: Axes, image: np.ndarray, cubes: np.ndarray, scores: np.ndarray, index: int, rank: int) -> None:
    """One panel: the axial slice through detection ``index``, its circle and score, and the other detections'
    cross-sections with that slice."""
    ci, cj, ck, d = cubes[index]
    k = int(np.clip(round(ck), 0, image.shape[2] - 1))
    ax.imshow(radiological_slice(image, k), cmap="gray", vmin=0.0, vmax=1.0, origin="upper", interpolation="nearest")
    for other in range(len(cubes)):
        if other == index:
            continue
        oi, oj, ok, od = cubes[other]
        # a sphere of diameter od crosses slice k in a circle of radius sqrt(r^2 - dz^2): draw what lies on the slice
        r2 = (od / 2.0) ** 2 - (k - ok) ** 2
        if r2 > 0:
            col, row = display_position(oi, oj)
            ax.add_patch(Circle((col, row), np.sqrt(r2), fill=False, edgecolor=OTHER_COLOR, lw=0.8))
            ax.annotate(f"{scores[other]:.2f}", (col, row), xytext=(col + np.sqrt(r2) + 1, row), color=OTHER_COLOR,
                        fontsize=6, va="center")
    col, row = display_position(ci, cj)
    ax.add_patch(Circle((col, row), d / 2.0, fill=False, edgecolor=PRIMARY_COLOR, lw=1.5))
    ax.annotate(f"{scores[index]:.2f}", (col, row), xytext=(col + d / 2.0 + 2, row - d / 2.0 - 2), color=SCORE_COLOR,
                fontsize=9, fontweight="bold")
    ax.set_title(f"#{rank}  p={scores[index]:.3f}  d={d:.1f} mm  k={k}", fontsize=9)
    _orientation_labels(ax)


def _orientation_labels(ax: Axes) -> None:
    # the letters say which side is which, so a reader never has to guess the convention
    style = {"transform": ax.transAxes, "color": "orange", "fontsize": 8, "ha": "center", "va": "center"}
    for text, x, y in (("R", 0.03, 0.5), ("L", 0.97, 0.5), ("A", 0.5, 0.97), ("P", 0.5, 0.03)):
        ax.text(x, y, text, **style)
    ax.set_xticks([])
    ax.set_yticks([])


def write_detection_png(
    image: np.ndarray,
    cubes: np.ndarray,
    scores: np.ndarray,
    path: str | os.PathLike,
    top: int = 4,
    title: str | None = None,
) -> Path:
    """Draw the ``top`` highest-scoring detections, one panel each, on axial slices of the preprocessed volume.

    Panel ``n`` shows the axial slice ``k = round(ck)`` of the n-th best detection in radiological convention
    (patient's right on the image's left, anterior up: rows = ``j``, columns = ``i``, see
    :func:`radiological_slice`), a red circle of diameter ``d`` at ``(ci, cj)`` with the score beside it, and, thinner
    in cyan, the cross-sections of the other detections whose sphere crosses that slice. With no detection, a single
    panel of the middle axial slice says "no detections".

    Args:
        image: ``(I, J, K)`` (or ``(1, I, J, K)``) preprocessed volume, float in [0, 1], 1 mm voxels, LPS axcodes.
        cubes: ``(N, 4)`` detections ``(ci, cj, ck, d)`` in voxels of ``image``.
        scores: ``(N,)`` noduleness of each cube.
        path: the PNG to write.
        top: at most this many panels.
        title: figure title (e.g. the seriesuid).
    """
    volume = np.asarray(image, dtype=np.float32)
    if volume.ndim == 4 and volume.shape[0] == 1:  # channel-first MONAI image
        volume = volume[0]
    if volume.ndim != 3:
        raise InputError(f"{path}: image must be (I, J, K), got shape {volume.shape}")
    boxes = np.asarray(cubes, dtype=np.float64).reshape(-1, 4)
    probs = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(probs) != len(boxes):
        raise InputError(f"{path}: {len(boxes)} cubes but {len(probs)} scores")
    shown = _by_score(probs)[: max(int(top), 0)]

    panels = max(len(shown), 1)
    fig = Figure(figsize=(4.0 * panels, 4.4 if title else 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    if len(shown) == 0:
        k = volume.shape[2] // 2
        axes[0].imshow(radiological_slice(volume, k), cmap="gray", vmin=0.0, vmax=1.0, origin="upper",
                       interpolation="nearest")
        axes[0].set_title(f"no detections (k={k})", fontsize=9)
        _orientation_labels(axes[0])
    for rank, (ax, index) in enumerate(zip(axes, shown), start=1):
        _draw_panel(ax, volume, boxes, probs, int(index), rank)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    return Path(path)


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class DetectionWriter:
    """Ignite handler writing each scan's detections when a MONAI evaluator iteration completes.

    ``engine.state.output`` is a list of per-scan dicts, as :class:`custom_components.scan_detection.ScanInference`
    returns them::

        {"seriesuid": str, "image_path": str, "detections": ScanDetections, "image": (I, J, K) preprocessed volume}

    The CSV, JSON and markups files take the detections' world rows ``(x, y, z, d)`` (LPS mm) and scores; only the
    PNG, which draws the preprocessed volume, takes their voxel cubes.
    For every scan it writes ``<output_dir>/<seriesuid>.csv`` (:func:`write_luna_csv`), ``.json``
    (:func:`write_detection_json`), ``.mrk.json`` (:func:`write_slicer_markups`) and ``.png``
    (:func:`write_detection_png`), each switchable, and logs one line. A scan that could not be read
    (``{"image_path", "error"}``) is logged and listed in ``failed.csv``; the run then ends with an error naming how
    many failed, after every other scan is written (:meth:`report_failures`).

    Args:
        output_dir: the folder of the files (created when missing).
        csv, json, markups, png: which files to write.
        png_top: panels of the PNG (top detections shown).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        csv: bool = True,
        json: bool = True,
        markups: bool = True,
        png: bool = True,
        png_top: int = 4,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.csv = csv
        self.json = json
        self.markups = markups
        self.png = png
        self.png_top = int(png_top)
        self.failed: list[tuple[str, str]] = []
        self.written: dict[str, str] = {}  # seriesuid -> the scan whose files carry it, in this run

    def attach(self, engine: Engine) -> None:
        writable_folder(self.output_dir, "detections")
        engine.add_event_handler(Events.STARTED, lambda _: (self.failed.clear(), self.written.clear()))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.report_failures)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        for scan in [output] if isinstance(output, dict) else output:
            uid, path = str(scan.get("seriesuid", "")), str(scan["image_path"])
            if "error" not in scan and uid in self.written:
                # two scans of one run named alike (e.g. two image.mhd): the second must not overwrite the first
                scan = {"image_path": path, "error": f"{path}: its identifier {uid!r} is also {self.written[uid]}'s, "
                        "whose outputs it would overwrite; run the two apart or rename one"}
            if "error" in scan:
                self.failed.append((path, str(scan["error"])))
                logger.error(f"{scan['error']} (scan skipped)")
            else:
                self.write_scan(scan)
                self.written[uid] = path

    def report_failures(self, engine: Engine) -> None:
        """Write ``failed.csv`` (``image,error``, one row per scan that could not be read; only the header when none
        failed) and end the run with an :class:`InputError` when any scan failed, once every other one is written."""
        path = self.output_dir / "failed.csv"
        with atomic_write(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "error"])
            writer.writerows(self.failed)
        if self.failed:
            total = engine.state.iteration
            raise InputError(
                f"{len(self.failed)} of {total} scans could not be read (listed in {path}); first: {self.failed[0][1]}"
            )

    def write_scan(self, scan: dict[str, Any]) -> list[Path]:
        """Write the enabled files of one scan dict (see the class docstring); returns their paths."""
        uid = str(scan["seriesuid"])
        if not uid or uid in (".", "..") or "/" in uid or os.sep in uid:
            raise InputError(f"{self.output_dir}: seriesuid {uid!r} cannot name a file")
        detections = scan["detections"]
        marks, diameters = detections.marks, detections.world[:, 3]
        out = self.output_dir
        written: list[Path] = []
        if self.csv:
            written.append(write_luna_csv(uid, marks, out / f"{uid}.csv"))
        if self.json:
            written.append(
                write_detection_json(uid, marks, out / f"{uid}.json", scan.get("image_path"), diameters=diameters)
            )
        if self.markups:
            written.append(write_slicer_markups(uid, marks, out / f"{uid}.mrk.json", diameters=diameters))
        if self.png:
            written.append(
                write_detection_png(
                    _numpy(scan["image"]), detections.cubes, detections.scores, out / f"{uid}.png",
                    top=self.png_top, title=uid,
                )
            )
        best = f" (best p={marks[:, 3].max():.3f})" if len(marks) else ""
        files = ", ".join(path.name for path in written) or "nothing"
        logger.info(f"{uid}: {len(marks)} detections{best}; wrote {files} to {out}")
        return written
