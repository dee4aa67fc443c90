"""The scans of a cohort made in parallel processes, each from its own seed, results in scan order.

Every scan of a cohort (synthetic or hybrid) is drawn from a generator seeded by ``(seed, index)``, so scans can be
made in any order and in any process and the cohort's files stay byte-identical; the annotation rows are gathered in
scan order. The work is NumPy/SciPy that runs on one core, so a 2-core machine writes a cohort in about half the time
with two processes.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from tqdm import tqdm

from custom_components.errors import InputError

__all__ = ["available_cpus", "check_workers", "map_scans"]

T = TypeVar("T")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which a container or ``taskset`` narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_workers(workers: object) -> None:
    """Refuse a ``--workers`` that is not ``None`` or a whole number >= 1 (:class:`InputError`)."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InputError(f"--workers: expected a whole number >= 1, got {workers!r}")


def map_scans(
    task: Callable[[int], T],
    indices: Sequence[int],
    workers: int | None = None,
    desc: str = "scans",
    progress: bool = True,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple = (),
) -> list[T]:
    """``[task(i) for i in indices]``, computed in up to ``workers`` processes (default: one per available CPU).

    Args:
        task: a picklable function of the scan index (a module-level function or a ``functools.partial`` of one).
        indices: the scan indices.
        workers: processes; 1 runs in this process.
        desc: label of the progress bar (one step per scan).
        progress: show the bar.
        initializer, initargs: run once in each worker process before its first task (and here when ``workers`` is
            1). The workers are forked, so ``initargs`` reach them without being pickled: the way to hand every
            worker large read-only arrays such as loaded background scans.

    An exception raised by a task is raised here (the first one in completion order) once the running tasks end;
    the tasks not started by then are cancelled.
    """
    indices = list(indices)
    workers = max(1, min(int(workers or available_cpus()), len(indices)))
    results: list[Any] = [None] * len(indices)
    with tqdm(total=len(indices), desc=desc, unit="scan", disable=not progress) as bar:
        if workers == 1:
            if initializer is not None:
                initializer(*initargs)
            for n, index in enumerate(indices):
                results[n] = task(index)
                bar.update()
            return results
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=initargs) as pool:
            futures = {pool.submit(task, index): n for n, index in enumerate(indices)}
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
            except BaseException:
                for future in futures:  # the ones not started yet; leaving the pool waits for the running ones
                    future.cancel()
                raise
    return results
