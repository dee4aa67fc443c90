"""LUNA16's tables, read and written by one set of rules: ``annotations.csv``, ``annotations_excluded.csv``,
``seriesuids.csv`` and submissions.

Rules, the same for every table: UTF-8 with or without a byte-order mark, LF or CRLF line ends, blank lines skipped,
columns found by their header names (any order, extra columns ignored, as LUNA16's script), a header-only table is
valid and empty, every number finite. Coordinates are world LPS mm (``docs/conventions.md``). Every error names the
file and the row (:class:`custom_components.errors.InputError`).
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np

from custom_components.atomic import atomic_write
from custom_components.errors import InputError
from custom_components.froc import MAX_MARKS, FROCResult, as_rows, froc_scores

__all__ = [
    "ANNOTATION_COLUMNS",
    "SUBMISSION_COLUMNS",
    "Reference",
    "read_annotations",
    "read_reference",
    "read_seriesuids",
    "read_submission",
    "write_submission",
    "score_files",
    "combine_submissions",
]

PathLike = Union[str, os.PathLike]
SUBMISSION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
#: a seriesuid: LUNA16 writes DICOM UIDs (digits and dots); other cohorts use file-name-safe identifiers
SERIESUID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")



def _read_rows(path: PathLike) -> list[list[str]]:
    """The rows of a CSV file as lists of fields; a blank line gives ``[]``."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError as err:
        raise InputError(f"{path}: file not found") from err
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a readable CSV file ({err})") from err
    if '"' not in text:  # LUNA16's files quote nothing: a plain split reads them twice as fast as the csv module
        return [line.split(",") if line else [] for line in text.splitlines()]
    try:
        return list(csv.reader(text.splitlines()))
    except csv.Error as err:
        raise InputError(f"{path}: not a readable CSV file ({err})") from err


def _read_table(path: PathLike, columns: Sequence[str]) -> tuple[list[str], np.ndarray, list[int]]:
    """Read a CSV whose header names ``columns`` (any order, extra columns ignored, as LUNA16's script).

    Returns the first column's strings, the other columns as a float64 ``(R, len(columns) - 1)`` array, and each
    row's line number in the file (the header is line 1; blank lines are skipped).
    """
    rows = _read_rows(path)
    if not rows:
        raise InputError(f"{path}: empty file, expected the header {','.join(columns)}")
    header = [name.strip() for name in rows[0]]
    missing = [name for name in columns if name not in header]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)}; the header is {','.join(header)!r}, "
            f"expected {','.join(columns)}"
        )
    index = [header.index(name) for name in columns]
    lines = [line for line, row in enumerate(rows, start=1) if row and line > 1]
    body = [rows[line - 1] for line in lines]
    if set(map(len, body)) - {len(header)}:
        line = next(line for line, row in zip(lines, body) if len(row) != len(header))
        raise InputError(f"{path}: row {line} has {len(rows[line - 1])} fields, the header has {len(header)}")
    fields = list(zip(*body)) if body else [()] * len(header)
    uids = [uid.strip() for uid in fields[index[0]]]
    values = np.empty((len(body), len(index) - 1))
    try:
        for j, i in enumerate(index[1:]):
            values[:, j] = np.fromiter(map(float, fields[i]), dtype=np.float64, count=len(body))
        finite = bool(np.isfinite(values).all())
    except ValueError:
        finite = False
    if not finite:
        for line, row in zip(lines, body):  # slow path, only to name the culprit
            for i, name in zip(index[1:], columns[1:]):
                try:
                    ok = math.isfinite(float(row[i]))
                except ValueError:
                    ok = False
                if not ok:
                    raise InputError(f"{path}: row {line}: {name} is {row[i]!r}, not a finite number")
    if not all(uids):
        raise InputError(f"{path}: row {lines[uids.index('')]}: empty seriesuid")
    return uids, values, lines


def _group(uids: Sequence[str], values: np.ndarray) -> dict[str, np.ndarray]:
    """Rows grouped by seriesuid, file order kept within each group."""
    groups: dict[str, list[int]] = {}
    for i, uid in enumerate(uids):
        groups.setdefault(uid, []).append(i)
    return {uid: values[rows] for uid, rows in groups.items()}


def read_submission(path: PathLike) -> dict[str, np.ndarray]:
    """Read a LUNA16 submission CSV ``seriesuid,coordX,coordY,coordZ,probability`` (world LPS mm).

    Returns ``{seriesuid: (N, 4) float64 array of (x, y, z, probability)}`` in file order; a header-only file gives
    ``{}``. Raises :class:`InputError` naming the file and row for a missing column or a non-numeric value.
    """
    uids, values, _ = _read_table(path, SUBMISSION_COLUMNS)
    return _group(uids, values)


def read_annotations(path: PathLike, excluded: bool = False) -> dict[str, np.ndarray]:
    """Read LUNA16's ``annotations.csv`` (or, with ``excluded=True``, ``annotations_excluded.csv``).

    Returns ``{seriesuid: (M, 4) float64 array of (x, y, z, diameter_mm)}``, world LPS mm. Nodules need a positive
    diameter; excluded findings may have ``diameter_mm = -1`` (unknown, scored as 10 mm).
    """
    uids, values, lines = _read_table(path, ANNOTATION_COLUMNS)
    if not excluded and len(values):
        bad = np.flatnonzero(values[:, 3] <= 0)
        if bad.size:
            raise InputError(f"{path}: row {lines[bad[0]]}: diameter_mm is {values[bad[0], 3]:g}, must be > 0")
    return _group(uids, values)


def read_seriesuids(path: PathLike) -> list[str]:
    """Read the list of evaluated scans: LUNA16's header-less ``seriesuids.csv`` (one uid a line, first column) or
    the same with a ``seriesuid`` header. Raises :class:`InputError` when empty or when a uid is listed twice."""
    rows = _read_rows(path)
    uids: list[str] = []
    lines: dict[str, int] = {}
    for line, row in enumerate(rows, start=1):
        uid = row[0].strip() if row else ""
        if not uid or (line == 1 and uid == "seriesuid"):
            continue
        if not SERIESUID_PATTERN.match(uid):
            raise InputError(f"{path}: row {line}: {uid!r} is not a seriesuid (letters, digits, '.', '_', '-')")
        if uid in lines:
            raise InputError(f"{path}: row {line}: seriesuid {uid} is already listed at row {lines[uid]}")
        lines[uid] = line
        uids.append(uid)
    if not uids:
        raise InputError(f"{path}: no seriesuid listed")
    return uids


@dataclass(frozen=True)
class Reference:
    """The reference standard of an evaluation: the scans evaluated, their nodules and excluded findings.

    ``nodules``/``excluded`` map a seriesuid to a ``(M, 4)`` array ``(x, y, z, d)`` in world LPS mm; a scan absent
    from them has none.
    """

    seriesuids: list[str]
    nodules: dict[str, np.ndarray]
    excluded: dict[str, np.ndarray]


def read_reference(
    annotations: PathLike, excluded: PathLike | None, seriesuids: PathLike | Sequence[str]
) -> Reference:
    """Read LUNA16's ``annotations.csv``, ``annotations_excluded.csv`` (or ``None``: no excluded findings) and the
    evaluated scans (a path to a list file, or a sequence of seriesuids)."""
    if isinstance(seriesuids, (str, os.PathLike)):
        uids = read_seriesuids(seriesuids)
    else:
        uids = list(seriesuids)
    return Reference(
        seriesuids=uids,
        nodules=read_annotations(annotations),
        excluded={} if excluded is None else read_annotations(excluded, excluded=True),
    )


def write_submission(marks: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write detections as a LUNA16 submission CSV ``seriesuid,coordX,coordY,coordZ,probability``.

    Args:
        marks: ``{seriesuid: (N, 4) (x, y, z, probability)}``, world LPS mm; rows are written highest probability
            first per scan.
        path: the CSV to write (atomically).
    """
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(",".join(SUBMISSION_COLUMNS) + "\n")
        for uid, rows in marks.items():
            rows = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
            for x, y, z, p in rows[np.argsort(-rows[:, 3], kind="stable")]:
                f.write(f"{uid},{x:.3f},{y:.3f},{z:.3f},{p:.6f}\n")
    return Path(path)



def score_files(
    submission: PathLike,
    annotations: PathLike,
    excluded: PathLike | None,
    seriesuids: PathLike | Sequence[str],
    *,
    max_marks: int | None = MAX_MARKS,
    bootstrap: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
) -> FROCResult:
    """Read a submission CSV and LUNA16's reference files and score them (see :func:`froc_scores`)."""
    reference = read_reference(annotations, excluded, seriesuids)
    return froc_scores(
        read_submission(submission),
        reference.nodules,
        reference.excluded,
        reference.seriesuids,
        max_marks=max_marks,
        bootstrap=bootstrap,
        seed=seed,
        confidence=confidence,
    )


def combine_submissions(submissions: Sequence[PathLike | Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Join the folds' submissions (CSV paths or ``{seriesuid: (N, 4) marks}`` dicts) into one, so a single FROC is
    computed over all scans, as the paper's 5-fold cross-validation does.

    Each scan must come from one fold only: a seriesuid present in two submissions raises :class:`InputError`.
    """
    combined: dict[str, np.ndarray] = {}
    source: dict[str, int] = {}
    for fold, sub in enumerate(submissions):
        name = str(sub) if isinstance(sub, (str, os.PathLike)) else f"submission {fold}"
        marks = read_submission(sub) if isinstance(sub, (str, os.PathLike)) else sub
        for uid, rows in marks.items():
            if uid in source:
                raise InputError(
                    f"{name}: seriesuid {uid} is also in submission {source[uid]}; a scan must be scored by one fold"
                )
            source[uid] = fold
            combined[uid] = as_rows(rows, f"{name}: marks of {uid}")
    return combined
