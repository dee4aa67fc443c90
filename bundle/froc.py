"""``python -m bundle froc``: score a submission CSV as LUNA16's evaluation script does."""

from __future__ import annotations

import sys
import warnings

from custom_components.atomic import writable_folder
from custom_components.errors import InputError
from custom_components.froc_report import format_table, write_report
from custom_components.luna16_tables import score_files


def froc(
    annotations: str,
    excluded: str,
    seriesuids: str,
    submission: str,
    out: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
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
    if out is not None:
        files = write_report(result, out)
        print("wrote " + ", ".join(str(path) for path in files.values()))
