"""Reading the datalist (``docs/conventions.md``) and choosing the scans of a cross-validation split."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from custom_components.errors import InputError

__all__ = ["load_datalist", "select_fold", "SPLITS"]

SPLITS = ("training", "validation", "all")
N_FOLDS = 5


def load_datalist(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a datalist JSON written by ``python -m bundle prepare-luna16``.

    Relative ``image`` paths are resolved against the datalist's folder and stored absolute. Raises
    :class:`InputError` naming the file (and the scan) for a missing or unparsable file, a missing ``scans`` list or
    ``image``/``fold`` entry, or an image that does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        datalist = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a JSON datalist ({err})") from err
    if not isinstance(datalist, dict) or not isinstance(datalist.get("scans"), list):
        raise InputError(f"{path}: no 'scans' list (expected the format of docs/conventions.md)")
    for index, scan in enumerate(datalist["scans"]):
        where = f"{path}: scan {index} ({scan.get('seriesuid', '?') if isinstance(scan, dict) else '?'})"
        if not isinstance(scan, dict) or "image" not in scan or "fold" not in scan:
            raise InputError(f"{where}: needs 'image' and 'fold'")
        image = Path(scan["image"])
        image = image if image.is_absolute() else (path.parent / image).resolve()
        if not image.exists():
            raise InputError(f"{where}: image {image} not found")
        scan["image"] = str(image)
        scan.setdefault("nodules", [])
        scan.setdefault("excluded", [])
    return datalist


def select_fold(datalist: dict[str, Any] | str | os.PathLike, fold: int, split: str) -> list[dict[str, Any]]:
    """The scans of a 5-fold cross-validation split.

    Args:
        datalist: a datalist dict, or the path of one (read with :func:`load_datalist`).
        fold: 0..4; ``-1`` means no hold-out: every split is all the scans (small demos).
        split: ``"training"`` (scans not in ``fold``), ``"validation"`` (scans in ``fold``) or ``"all"``.

    Returns:
        The selected scan entries (the datalist's own dicts), in datalist order.
    """
    if not isinstance(datalist, dict):
        datalist = load_datalist(datalist)
    if split not in SPLITS:
        raise InputError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if int(fold) != fold or not -1 <= fold < N_FOLDS:
        raise InputError(f"fold {fold!r}: expected 0..{N_FOLDS - 1}, or -1 for all scans")
    scans = datalist["scans"]
    if fold == -1 or split == "all":
        return list(scans)
    in_fold = split == "validation"
    return [scan for scan in scans if (int(scan["fold"]) == fold) == in_fold]
