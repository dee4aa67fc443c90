"""``python -m bundle synth``: write a synthetic chest-CT cohort in LUNA16's own format (the bundle's default data)."""

from __future__ import annotations

import time


def synth(
    out: str, scans: int = 40, seed: int = 0, full_size: bool = False, adult: bool = False, workers: int | None = None
) -> None:
    """Write ``scans`` synthetic chest CTs with annotated nodules under ``out``, laid out as LUNA16.

    ``out/subset0..9/<seriesuid>.mhd`` + ``.raw`` (int16 HU, LPS world mm), ``out/annotations.csv``,
    ``out/annotations_excluded.csv`` (findings under 3 mm) and ``out/seriesuids.csv``. The same seed writes
    byte-identical files. See docs/synthetic_cohort.md.

    Args:
        out: cohort folder (created when missing).
        scans: number of scans.
        seed: cohort seed (>= 0).
        full_size: LUNA16-sized adult scans (512 x 512 in-plane) for benchmarks instead of the small CPU-demo chests.
        adult: the same as ``full_size`` (adult-sized chests), by the name the anatomy goes by.
        workers: processes writing scans in parallel (default: one per available CPU); the files do not depend on it.
    """
    from bundle.synthetic import generate_cohort
    from bundle.synthetic.parallel import check_workers
    from custom_components.atomic import writable_folder

    check_workers(workers)
    writable_folder(out, "the cohort")
    start = time.perf_counter()
    summary = generate_cohort(out, scans=scans, seed=seed, full_size=full_size or adult, workers=workers)
    seconds = time.perf_counter() - start
    print(
        f"wrote {summary['scans']} scans ({summary['nodules']} nodules, {summary['excluded']} excluded findings, "
        f"{summary['scans_without_nodules']} scans without nodules) to {summary['out']} in {seconds:.1f} s"
    )
