"""LUNA16-style folders (and their tables, read by :mod:`custom_components.luna16_tables`) -> the bundle's datalist (``docs/conventions.md``).

LUNA16 ships its scans as ``subset0/`` .. ``subset9/`` folders of ``<seriesuid>.mhd`` + ``.raw``, and three tables:
``annotations.csv`` (the 1186 nodules), ``annotations_excluded.csv`` (irrelevant findings, ``diameter_mm = -1`` when
no size is known), both with header ``seriesuid,coordX,coordY,coordZ,diameter_mm`` in LPS world mm, and
``seriesuids.csv`` (one seriesuid a line, no header in LUNA16's own file). Rows in error messages are file lines,
the header being row 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from custom_components.atomic import atomic_write
from custom_components.datalist import N_FOLDS
from custom_components.errors import InputError
from custom_components.io import IMAGE_SUFFIXES
from custom_components.luna16_tables import read_annotations

__all__ = [
    "find_scans",
    "fold_of",
    "build_datalist",
    "merge_datalists",
    "write_datalist",
]

_DICOM_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # LUNA16 names its scans <seriesuid>.mhd
_SUBSET = re.compile(r"^subset([0-9])$")
_NUMBER_LIST = re.compile(r"\[\s+([-+0-9.eE,\s]+?)\s+\]")  # a JSON list of numbers only, spread over lines


def _scan_uid(path: Path) -> str | None:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            uid = name[: -len(suffix)]
            return uid if _DICOM_UID.match(uid) else None
    return None


def find_scans(luna_root: str | os.PathLike) -> dict[str, tuple[Path, int | None]]:
    """Scans under ``luna_root``: seriesuid -> (absolute path, LUNA16 subset or ``None``).

    Looks in ``subset0`` .. ``subset9`` folders (at any depth, e.g. ``subset3/subset3/`` as some unzip tools leave
    them), and directly in ``luna_root`` (a flat folder, subset unknown). A scan is a file named
    ``<seriesuid>`` + one of :data:`IMAGE_SUFFIXES`. Raises :class:`InputError` when ``luna_root`` is not a folder or
    a seriesuid appears twice.
    """
    root = Path(luna_root).resolve()
    if not root.is_dir():
        raise InputError(f"{luna_root}: not a folder (expected a LUNA16-style root with subset0..9/ or .mhd files)")
    candidates: list[tuple[Path, int | None]] = [(p, None) for p in sorted(root.iterdir()) if p.is_file()]
    for folder in sorted(p for p in root.rglob("subset*") if p.is_dir()):
        match = _SUBSET.match(folder.name)
        if match:
            candidates += [(p, int(match.group(1))) for p in sorted(folder.iterdir()) if p.is_file()]
    scans: dict[str, tuple[Path, int | None]] = {}
    for path, subset in candidates:
        uid = _scan_uid(path)
        if uid is None:
            continue
        if uid in scans:
            raise InputError(f"{path}: seriesuid {uid} also found at {scans[uid][0]}")
        scans[uid] = (path, subset)
    return scans


def fold_of(seriesuid: str, subset: int | None) -> int:
    """5-fold cross-validation fold: ``subset // 2`` for a LUNA16 subset 0..9, else a stable hash of the seriesuid
    (``int(sha1(seriesuid).hexdigest(), 16) % 5``, the same on every machine and Python run)."""
    if subset is not None:
        return int(subset) // 2
    return int(hashlib.sha1(seriesuid.encode("utf-8")).hexdigest(), 16) % N_FOLDS


def _default_table(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / "CSVFILES" / name, root / "evaluationScript" / "annotations" / name):
        if candidate.is_file():
            return candidate
    return None


def _split_by_disk(
    table: dict[str, np.ndarray], on_disk: dict[str, Any], source: Path, root: Path
) -> dict[str, list[list[float]]]:
    """Keep the series of ``table`` present on disk; warn (how many series and rows) about the others."""
    absent = [uid for uid in table if uid not in on_disk]
    if absent:
        rows = sum(len(table[uid]) for uid in absent)
        warnings.warn(
            f"{source}: {len(absent)} of {len(table)} series ({rows} rows) are not under {root} and are skipped",
            stacklevel=3,
        )
    return {uid: np.asarray(rows).tolist() for uid, rows in table.items() if uid in on_disk}


def build_datalist(
    luna_root: str | os.PathLike,
    annotations: str | os.PathLike | None = None,
    excluded: str | os.PathLike | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Build the datalist (``docs/conventions.md``) of the scans found under ``luna_root``.

    Args:
        luna_root: LUNA16-style root (``subset0..9/`` and/or flat ``<seriesuid>.mhd`` files); any subset of the
            scans may be present.
        annotations: nodule table; default ``annotations.csv`` in ``luna_root`` (or its ``CSVFILES/``). Without
            one, every scan gets ``nodules = []`` (a warning says so).
        excluded: irrelevant-findings table; default ``annotations_excluded.csv`` found the same way, else none.
        name: datalist name (default: the root folder's name).

    Returns:
        ``{"name", "root", "scans": [{"image", "seriesuid", "subset", "fold", "nodules", "excluded"}, ...]}``, scans
        sorted by seriesuid, nodule rows ``[x, y, z, d]`` in LPS mm exactly as in the tables. Series annotated but
        not on disk are skipped with a warning saying how many.

    Raises:
        InputError: no scan found, or a bad table (see :func:`read_annotations`).
    """
    root = Path(luna_root).resolve()
    scans = find_scans(root)
    if not scans:
        raise InputError(
            f"{luna_root}: no scans found (expected subset0..9/<seriesuid>.mhd or <seriesuid>.mhd/.nii.gz files)"
        )
    annotations_path = Path(annotations) if annotations is not None else _default_table(root, "annotations.csv")
    excluded_path = Path(excluded) if excluded is not None else _default_table(root, "annotations_excluded.csv")
    nodules: dict[str, list[list[float]]] = {}
    findings: dict[str, list[list[float]]] = {}
    if annotations_path is None:
        warnings.warn(f"{root}: no annotations.csv found; every scan gets an empty nodule list", stacklevel=2)
    else:
        nodules = _split_by_disk(read_annotations(annotations_path), scans, annotations_path, root)
    if excluded_path is not None:
        findings = _split_by_disk(
            read_annotations(excluded_path, excluded=True), scans, excluded_path, root
        )
    entries = [
        {
            "image": str(path),
            "seriesuid": uid,
            "subset": subset,
            "fold": fold_of(uid, subset),
            "nodules": nodules.get(uid, []),
            "excluded": findings.get(uid, []),
        }
        for uid, (path, subset) in sorted(scans.items())
    ]
    return {"name": name or root.name, "root": str(root), "scans": entries}


def merge_datalists(datalists: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One datalist of the scans of several (each scan keeps the fold its own root gave it). Raises
    :class:`InputError` when a seriesuid appears in two of them."""
    seen: dict[str, str] = {}
    scans = []
    for datalist in datalists:
        for scan in datalist["scans"]:
            if scan["seriesuid"] in seen:
                raise InputError(
                    f"{datalist['root']}: seriesuid {scan['seriesuid']} is also under {seen[scan['seriesuid']]}"
                )
            seen[scan["seriesuid"]] = datalist["root"]
            scans.append(scan)
    return {
        "name": "+".join(d["name"] for d in datalists),
        "root": ", ".join(d["root"] for d in datalists),
        "scans": sorted(scans, key=lambda s: s["seriesuid"]),
    }


def write_datalist(datalist: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``datalist`` as indented JSON, one nodule row a line, atomically
    (:func:`custom_components.atomic.atomic_write`)."""
    path = Path(path)
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]",
                            json.dumps(datalist, indent=2))
    with atomic_write(path) as f:
        f.write(text + "\n")
    return path
