"""Measuring helpers shared by the benchmark commands: median wall time over runs, the process's peak RSS, and a
``torch.profiler`` table of one run."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def time_runs(func: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Call ``func`` ``warmup`` times untimed, then ``repeats`` times timed.

    Returns ``{"median_s", "min_s", "max_s", "runs_s", "peak_rss_mb", "result"}``, ``result`` being the last return
    value. The peak RSS is the whole process's (imports included), the honest figure a user would see.
    """
    result = None
    for _ in range(warmup):
        result = func()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = func()
        runs.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(runs),
        "min_s": min(runs),
        "max_s": max(runs),
        "runs_s": runs,
        "peak_rss_mb": peak_rss_mb(),
        "result": result,
    }


def load_line() -> str:
    """The 1-minute load average against the core count, as the benchmarks print it."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    verdict = "above the core count: wall times are inflated" if load > cores else f"at most the {cores} cores"
    return f"load average {load:.1f} ({verdict})"


def print_profile(func: Callable[[], object], top: int) -> None:
    """Run ``func`` once under ``torch.profiler`` (CPU and, when present, CUDA) and print the ``top`` operators by
    self time (the operators of the whole run: network, decoding, NMS)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        func()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top))
