"""``python -m bundle bench-preprocess``: time and memory of the preprocessing chain of ``configs/inference.json``.

The chain runs end to end, loading included (the .mhd/.zraw decompression is part of what a user waits for), on one
scan, ``repeats`` times after one warm-up run. Default scan: LIDC-IDRI-0002 (512 x 512 x 261 voxels of
0.682 x 0.682 x 1.25 mm) from ``../shared/data/lidc`` next to the repository.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bundle.timing import time_runs
from custom_components.errors import InputError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = (
    REPO.parent / "shared" / "data" / "lidc" / "1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919.mhd"
)


def run_benchmark(
    image: str | os.PathLike = DEFAULT_IMAGE,
    repeats: int = 5,
    config: str | os.PathLike = REPO / "configs" / "inference.json",
    threads: int | None = None,
) -> dict[str, Any]:
    """Time ``preprocessing`` of ``config`` on ``{"image": image}``; returns :func:`bundle.timing.time_runs`'s dict
    plus ``input_shape`` ``(I, J, K)``, ``output_shape`` ``(1, I, J, K)``, ``threads``, ``image``, ``cpu_median_s``
    (median CPU time of this process per run: less sensitive than wall time to other jobs on the machine) and
    ``load_average`` (1-minute system load at the end: above the core count, the wall times are inflated)."""
    from monai.bundle import ConfigParser

    from custom_components.errors import run_chain
    from custom_components.io import read_image

    image = Path(image)
    if not image.exists():
        raise InputError(f"{image}: file not found (give --image, a CT volume)")
    if threads:
        torch.set_num_threads(int(threads))
    parser = ConfigParser()
    parser.read_config(str(config))
    chain = parser.get_parsed_content("preprocessing")
    input_shape = tuple(read_image(image).image.GetSize())
    cpu_s: list[float] = []

    def run_once() -> dict:
        start = time.process_time()
        out = run_chain(chain, {"image": str(image)})
        cpu_s.append(time.process_time() - start)
        return out

    stats = time_runs(run_once, repeats=int(repeats), warmup=1)
    result = stats.pop("result")
    stats.update(
        image=str(image),
        input_shape=input_shape,
        output_shape=tuple(result["image"].shape),
        threads=torch.get_num_threads(),
        cpu_median_s=statistics.median(cpu_s[1:]),
        load_average=os.getloadavg()[0],
    )
    return stats


def bench_preprocess(
    image: str = str(DEFAULT_IMAGE), repeats: int = 5, threads: int | None = None, config: str | None = None
) -> None:
    """Print median/min/max seconds, peak RSS (MiB) and the input and output shapes of preprocessing ``image``.

    Args:
        image: CT volume (.mhd, NIfTI or DICOM folder); default LIDC-IDRI-0002 from ../shared/data/lidc.
        repeats: timed runs after one warm-up run.
        threads: torch threads (default: torch's, one per core).
        config: preprocessing config (default configs/inference.json).
    """
    stats = run_benchmark(image, repeats, config or REPO / "configs" / "inference.json", threads)
    runs = ", ".join(f"{t:.2f}" for t in stats["runs_s"])
    print(f"image        {stats['image']}")
    print(f"input shape  {stats['input_shape']} (I, J, K)")
    print(f"output shape {stats['output_shape']} image float32 [0, 1]")
    print(
        f"time         median {stats['median_s']:.2f} s, min {stats['min_s']:.2f} s, max {stats['max_s']:.2f} s "
        f"over {len(stats['runs_s'])} runs ({runs}); {stats['threads']} torch threads, {os.cpu_count()} CPUs"
    )
    print(f"cpu time     median {stats['cpu_median_s']:.2f} s per run (this process, all threads)")
    print(f"peak RSS     {stats['peak_rss_mb']:.0f} MiB")
    print(f"load average {stats['load_average']:.2f} (1 min; wall times are inflated when above {os.cpu_count()})")
