"""``python -m bundle prepare-luna16``: a LUNA16-style folder -> the datalist JSON the configs read."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path

from custom_components.atomic import writable_folder
from custom_components.errors import InputError
from custom_components.luna16 import build_datalist, merge_datalists, write_datalist


def prepare_luna16(
    luna_root: str | Sequence[str], out: str, annotations: str | None = None, excluded: str | None = None
) -> None:
    """Write ``<out>/datalist.json`` (or ``out`` itself when it ends in ``.json``) and print a summary.

    Args:
        luna_root: folder with ``subset0..9/<seriesuid>.mhd`` (any of them) and/or flat ``<seriesuid>.mhd`` files,
            each with its own tables; several, comma-separated (``--luna-root a,b``), give one datalist of all their
            scans (e.g. the synthetic and the hybrid cohorts of the demo).
        out: output folder, or the datalist's path when it ends in ``.json``.
        annotations: nodule table (default: ``annotations.csv`` in ``luna_root`` or its ``CSVFILES/``).
        excluded: irrelevant findings (default: ``annotations_excluded.csv`` found the same way).
    """
    out_path = Path(out)
    if out_path.suffix.lower() != ".json":
        out_path = out_path / "datalist.json"
    roots = luna_root.split(",") if isinstance(luna_root, str) else [str(r) for r in luna_root]
    if len(roots) > 1 and (annotations or excluded):
        raise InputError("--annotations/--excluded name one root's tables: give one --luna-root with them")
    writable_folder(out_path.parent, "the datalist")
    parts = [build_datalist(root, annotations=annotations, excluded=excluded) for root in roots]
    datalist = parts[0] if len(parts) == 1 else merge_datalists(parts)
    write_datalist(datalist, out_path)
    scans = datalist["scans"]
    per_fold: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
    for scan in scans:
        per_fold[scan["fold"]][0] += 1
        per_fold[scan["fold"]][1] += len(scan["nodules"])
    print(f"wrote {out_path}")
    print(
        f"{len(scans)} scans, {sum(len(s['nodules']) for s in scans)} nodules, "
        f"{sum(len(s['excluded']) for s in scans)} excluded findings (root {datalist['root']})"
    )
    for fold in sorted(per_fold):
        print(f"  fold {fold}: {per_fold[fold][0]} scans, {per_fold[fold][1]} nodules")
