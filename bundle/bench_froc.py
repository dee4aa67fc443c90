"""``python -m bundle bench-froc``: time scoring a LUNA16-sized submission (888 scans, up to 100 marks each)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from bundle.timing import time_runs
from custom_components.errors import InputError
from custom_components.froc import froc_scores
from custom_components.luna16_tables import (
    read_annotations,
    read_submission,
    score_files,
)

_LIDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc"


def _write_submission(
    path: Path, nodules: dict[str, np.ndarray], uids: list[str], marks_per_scan: int, rng: np.random.Generator
) -> int:
    """A made-up submission: per scan, a mark near most nodules (high probability) and the rest uniform in a
    360 x 360 x 300 mm box around the scan's nodules (low probability). Returns the number of marks written."""
    rows = []
    for uid in uids:
        scan = nodules.get(uid, np.zeros((0, 4)))
        found = scan[rng.random(len(scan)) < 0.9][:marks_per_scan]
        near = found[:, :3] + rng.normal(0.0, 0.15, (len(found), 1)) * found[:, 3:4]
        centre = scan[:, :3].mean(axis=0) if len(scan) else np.array([0.0, 0.0, -150.0])
        n_random = marks_per_scan - len(found)
        far = centre + rng.uniform(-1.0, 1.0, (n_random, 3)) * np.array([180.0, 180.0, 150.0])
        xyz = np.r_[near, far]
        prob = np.r_[rng.beta(5.0, 1.5, len(found)), rng.beta(1.0, 4.0, n_random)]
        rows += [f"{uid},{x:.3f},{y:.3f},{z:.3f},{p:.6f}" for (x, y, z), p in zip(xyz, prob)]
    path.write_text("seriesuid,coordX,coordY,coordZ,probability\n" + "\n".join(rows) + "\n")
    return len(rows)


def bench_froc(
    annotations: str = str(_LIDC / "annotations.csv"),
    excluded: str = str(_LIDC / "annotations_excluded.csv"),
    scans: int = 888,
    marks_per_scan: int = 100,
    repeats: int = 5,
    seed: int = 0,
) -> None:
    """Generate a submission over ``scans`` scans (the annotated series plus made-up uids, as LUNA16's 888) with
    ``marks_per_scan`` marks each, then print the median time of scoring it without bootstrap (reading the CSVs and
    scoring; and scoring alone, in memory), and, for information, of one scoring with 1000 bootstrap resamples."""
    for name, value, least in (("scans", scans, 1), ("marks_per_scan", marks_per_scan, 0), ("repeats", repeats, 1)):
        if not isinstance(value, int) or value < least:
            raise InputError(f"--{name} must be a whole number >= {least}, got {value!r}")
    for name, path in (("annotations", annotations), ("excluded", excluded)):
        if not Path(path).is_file():
            raise InputError(f"{path}: file not found (--{name})")
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="bench_froc_") as tmp:
        nodules, excluded_findings = read_annotations(annotations), read_annotations(excluded, excluded=True)
        uids = list(nodules)[:scans]
        uids += [f"1.3.6.1.4.1.0.bench.{i}" for i in range(scans - len(uids))]
        submission, uid_file = Path(tmp) / "submission.csv", Path(tmp) / "seriesuids.csv"
        uid_file.write_text("\n".join(uids) + "\n")
        n_marks = _write_submission(submission, nodules, uids, marks_per_scan, rng)

        files = time_runs(lambda: score_files(submission, annotations, excluded, uid_file), repeats=repeats)
        marks = read_submission(submission)
        memory = time_runs(lambda: froc_scores(marks, nodules, excluded_findings, uids), repeats=repeats)
        start = time.perf_counter()
        boot = froc_scores(marks, nodules, excluded_findings, uids, bootstrap=1000, seed=seed)
        boot_s = time.perf_counter() - start

    result = files["result"]
    print(f"submission: {len(uids)} scans, {n_marks} marks ({result.nodules} nodules, "
          f"{result.hits} hit, {result.false_positives} false positives); CPM {result.cpm:.4f}")
    print(f"score CSV files, no bootstrap:   median {files['median_s']:.3f} s "
          f"(min {files['min_s']:.3f}, max {files['max_s']:.3f}, {repeats} runs)  [goal < 2 s]")
    print(f"score in memory, no bootstrap:   median {memory['median_s']:.3f} s "
          f"(min {memory['min_s']:.3f}, max {memory['max_s']:.3f}, {repeats} runs)")
    print(f"score in memory, 1000 bootstrap: {boot_s:.3f} s (1 run; CPM 95% CI "
          f"[{boot.ci.cpm_lower:.4f}, {boot.ci.cpm_upper:.4f}])")
    print(f"peak RSS {memory['peak_rss_mb']:.0f} MiB")
