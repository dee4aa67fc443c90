"""``python -m bundle cross-validate`` and ``python -m bundle ensemble``: the paper's 5-fold cross-validation and its
ensemble, as sequences of the bundle's own ``training`` and ``evaluating`` workflows.

Each fold trains into ``models/fold<k>/`` and is evaluated into ``<out>/fold<k>/submission.csv``; the folds'
submissions are then scored together as one FROC over all scans, as the paper does (§3.1).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Sequence

from monai.bundle import run

from custom_components.datalist import load_datalist
from custom_components.ensemble import merge_marks
from custom_components.errors import InputError
from custom_components.froc import froc_scores
from custom_components.froc_report import format_table, write_report
from custom_components.luna16_tables import (
    combine_submissions,
    read_submission,
    write_submission,
)

TRAIN = "configs/train.json"
EVALUATE = "configs/evaluate.json"


def _configs(config_file: str | Sequence[str]) -> list[str]:
    files = ast.literal_eval(config_file) if isinstance(config_file, str) and config_file.startswith("[") else config_file
    files = [files] if isinstance(files, str) else list(files)
    for f in files:
        if not Path(f).is_file():
            raise InputError(f"{f}: no such config file")
    return files


def _folds(folds: str | int | Sequence[int]) -> list[int]:
    # fire turns "0,1,2" into a tuple and "3" into an int
    values = [int(f) for f in (folds if isinstance(folds, (list, tuple)) else str(folds).strip("[]()").split(",")) if str(f).strip()]
    if not values or any(f not in range(5) for f in values):
        raise InputError(f"--folds: expected fold numbers 0..4, got {folds!r}")
    return values


def _score(marks: dict, datalist_path: str, out: Path, title: str, bootstrap: int) -> None:
    """Score ``marks`` against the datalist's nodules over the scans the marks were made for, and write the report."""
    datalist = load_datalist(datalist_path)
    scans = {s["seriesuid"]: s for s in datalist["scans"]}
    uids = sorted(marks)
    result = froc_scores(
        marks,
        {u: scans[u].get("nodules", []) for u in uids},
        {u: scans[u].get("excluded", []) for u in uids},
        uids,
        bootstrap=bootstrap,
    )
    write_submission(marks, out / "submission.csv")
    write_report(result, out, title=title)
    print(f"{title}: {len(uids)} scans\n{format_table(result)}\nwrote {out}")


def cross_validate(
    config_file: str = f"['{TRAIN}']",
    datalist: str = "data/luna16/datalist.json",
    folds: str = "0,1,2,3,4",
    out: str = "eval/cv",
    train: bool = True,
    bootstrap: int = 1000,
    **overrides: Any,
) -> None:
    """Train (unless ``--train false``) and evaluate each fold, then score all folds' submissions as one FROC.

    Args:
        config_file: the training config(s), e.g. ``"['configs/train.json','configs/demo.json']"``;
            ``configs/evaluate.json`` is laid over them for evaluation.
        datalist: the datalist JSON (``python -m bundle prepare-luna16``).
        folds: the folds to run, e.g. ``0,1,2,3,4``.
        out: where ``fold<k>/`` and the combined report go.
        train: train each fold first (``false``: evaluate existing ``models/fold<k>/model.pt``).
        bootstrap: bootstrap resamples for the combined report's CIs.
        overrides: any config id, e.g. ``--epochs 100``.
    """
    configs = _configs(config_file)
    out_dir = Path(out)
    submissions = []
    for fold in _folds(folds):
        common = {"data_list_file_path": datalist, "fold": fold, "ckpt_dir": f"models/fold{fold}", **overrides}
        if train:
            run(run_id="training", config_file=configs, **common)
        run(
            run_id="evaluating",
            config_file=[*configs, EVALUATE],
            evaluation_dir=str(out_dir / f"fold{fold}"),
            output_dir=str(out_dir / f"fold{fold}"),
            bootstrap=0,
            **common,
        )
        submissions.append(out_dir / f"fold{fold}" / "submission.csv")
    _score(combine_submissions(submissions), datalist, out_dir, "FROC, cross-validation", bootstrap)


def ensemble(
    models: str,
    config_file: str = f"['{TRAIN}']",
    datalist: str = "data/luna16/datalist.json",
    fold: int = 0,
    out: str = "eval/ensemble",
    bootstrap: int = 1000,
    **overrides: Any,
) -> None:
    """Evaluate several trained models on one fold and score their averaged detections (the paper's ensemble).

    Args:
        models: comma-separated ``model.pt`` files of separately trained models.
        config_file, datalist, fold, out, bootstrap, overrides: as for ``cross-validate``.
    """
    paths = [m.strip() for m in str(models).strip("[]()").split(",") if m.strip()]
    if len(paths) < 2 or any(not Path(p).is_file() for p in paths):
        raise InputError(f"--models: expected two or more existing model files, got {models!r}")
    configs = _configs(config_file)
    out_dir = Path(out)
    marks = []
    for i, path in enumerate(paths):
        model_dir = out_dir / f"model{i}"
        run(
            run_id="evaluating",
            config_file=[*configs, EVALUATE],
            data_list_file_path=datalist,
            fold=fold,
            load_path=path,
            evaluation_dir=str(model_dir),
            output_dir=str(model_dir),
            bootstrap=0,
            **overrides,
        )
        marks.append(read_submission(model_dir / "submission.csv"))
    _score(merge_marks(marks), datalist, out_dir, f"FROC, ensemble of {len(paths)} models, fold {fold}", bootstrap)
