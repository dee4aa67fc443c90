"""``python -m bundle froc``: score a submission CSV as LUNA16's evaluation script does."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from custom_components.atomic import writable_folder
from custom_components.errors import InputError
from custom_components.froc import FROCResult, froc_scores
from custom_components.froc_report import (
    SLICE_BANDS_MM,
    format_band_table,
    format_table,
    slice_bands,
    write_band_csv,
    write_report,
)
from custom_components.luna16_tables import read_reference, read_seriesuids, read_submission, score_files


def froc(
    annotations: str,
    excluded: str,
    seriesuids: str,
    submission: str,
    out: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    scans: str | None = None,
    slice_bands: Sequence[float] = SLICE_BANDS_MM,
) -> None:
    """Score ``submission`` (``seriesuid,coordX,coordY,coordZ,probability``, world LPS mm) against LUNA16's reference
    and print the table: sensitivity at 1/8..8 FP/scan, FROC[luna] (CPM), FROC[new], with bootstrap 95% CIs.

    Args:
        annotations: LUNA16's ``annotations.csv`` (``seriesuid,coordX,coordY,coordZ,diameter_mm``).
        excluded: ``annotations_excluded.csv`` (irrelevant findings; ``diameter_mm = -1`` when unknown).
        seriesuids: the scans evaluated: LUNA16's header-less ``seriesuids.csv`` (a ``seriesuid`` header is fine).
        submission: the CSV to score; rows of scans not in ``seriesuids`` are ignored with a warning.
        out: folder to write ``froc.json``, ``froc.csv`` (the curve) and ``froc.png`` into.
        bootstrap: resamples of the scans for the CIs (0: none).
        seed: seed of the resampling.
        scans: the scored scans' LUNA16-style folder (``subset*/<seriesuid>.mhd``): adds the results per slice-thickness
            band (each scan's z voxel size from its header), printed and written as ``froc_bands.csv``.
        slice_bands: edges of the bands, mm (default 1.5, 3: thin, medium, thick).
    """
    for name, value in (("bootstrap", bootstrap), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InputError(f"--{name} must be a whole number >= 0, got {value!r}")
    if out is not None:  # refuse before scoring, not after the bootstrap's work
        writable_folder(out, "the FROC report")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = score_files(submission, annotations, excluded, seriesuids, bootstrap=bootstrap, seed=seed)
    for warning in caught:
        print(f"warning: {submission}: {warning.message}", file=sys.stderr)
    print(format_table(result))
    bands = _by_slice_band(submission, annotations, excluded, seriesuids, scans, slice_bands, bootstrap, seed)
    if bands:
        print("\n" + format_band_table(bands))
    if out is not None:
        files = write_report(result, out)
        if bands:
            files["bands"] = write_band_csv(bands, Path(out) / "froc_bands.csv")
        print("wrote " + ", ".join(str(path) for path in files.values()))


def _by_slice_band(
    submission: str, annotations: str, excluded: str, seriesuids: str, scans: str | None,
    edges: Sequence[float], bootstrap: int, seed: int,
) -> list[tuple[str, FROCResult]]:
    """The FROC of each slice-thickness band of the evaluated scans (none without ``scans``)."""
    if scans is None:
        return []
    # reading scan headers needs the image readers, and with them MONAI (~5 s to import): only --scans pays for it
    from custom_components.luna16 import find_scans
    from custom_components.scan_files import slice_spacing_mm

    if isinstance(edges, (int, float)):
        edges = [edges]
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0 for e in edges):
        raise InputError(f"--slice_bands must be slice thicknesses in mm > 0, got {edges!r}")
    found = find_scans(scans)
    uids = read_seriesuids(seriesuids)
    absent = [u for u in uids if u not in found]
    if absent:
        raise InputError(f"{scans}: {len(absent)} evaluated scan(s) not found, e.g. {absent[0]}")
    thickness = {u: slice_spacing_mm(found[u][0]) for u in uids}
    reference, marks = read_reference(annotations, excluded, uids), read_submission(submission)
    return [
        (label, froc_scores({u: marks[u] for u in members if u in marks}, reference.nodules, reference.excluded,
                            members, bootstrap=bootstrap, seed=seed))
        for label, members in slice_bands(thickness, edges)
    ]
