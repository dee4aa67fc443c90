"""``python -m bundle bench-infer``: time and memory of whole-scan inference, the way ``configs/inference.json`` runs it.

One run = preprocessing (load included) + network over the whole cropped 1 mm volume + post-processing (threshold,
candidate cap, NMS) + mapping to world mm, on one scan. Default scan: LIDC-IDRI-0002 (512 x 512 x 261) from
``../shared/data/lidc``. Without ``--model`` the network is untrained; its noduleness is then flat, so the score
threshold defaults to 0 to push the full candidate cap through NMS (the slowest post-processing path).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from bundle.bench_preprocess import DEFAULT_IMAGE, REPO
from bundle.timing import time_runs
from custom_components.errors import InputError


def bench_infer(
    image: str = str(DEFAULT_IMAGE),
    model: str | None = None,
    preset: str = "lean",
    repeats: int = 3,
    score_threshold: float = 0.0,
    sliding_window: bool = False,
    device: str | None = None,
) -> None:
    """Print the median, min and max seconds of whole-scan inference and its parts, and the peak RSS (MiB).

    Args:
        image: a CT volume (.mhd, NIfTI or DICOM folder).
        model: a ``model.pt`` state dict (default: untrained weights).
        preset: network preset (``lean`` or ``paper``).
        repeats: timed runs after one warm-up run.
        score_threshold: noduleness threshold of the detector.
        sliding_window: MONAI's sliding-window inferer instead of one pass over the whole crop.
        device: ``cpu`` or ``cuda`` (default: cuda when available).
    """
    from monai.bundle import ConfigParser

    from custom_components.errors import run_chain
    from custom_components.model_file import model_weights
    from custom_components.scan_detection import detect_scan

    if not Path(image).exists():
        raise InputError(f"{image}: file not found (give --image, a CT volume)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "inference.json"))
    parser.update({"network_preset": preset, "device": f"$torch.device('{dev}')", "score_threshold": score_threshold})
    preprocessing = parser.get_parsed_content("preprocessing")
    network = parser.get_parsed_content("network")
    if model:
        network.load_state_dict(model_weights(model))
    detector = parser.get_parsed_content("detector")
    parser.get_parsed_content("detector_ops")
    parts: dict[str, list[float]] = {"preprocess_s": [], "network_and_postprocess_s": []}
    counts: list[int] = []

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run_once() -> tuple:
        start = time.perf_counter()
        data = run_chain(preprocessing, {"image": str(image)})
        mid = time.perf_counter()
        found = detect_scan(detector, data["image"], data["image"].affine, dev, use_inferer=sliding_window)
        sync()
        parts["preprocess_s"].append(mid - start)
        parts["network_and_postprocess_s"].append(time.perf_counter() - mid)
        counts.append(len(found.scores))
        return tuple(data["image"].shape)

    stats = time_runs(run_once, repeats=int(repeats), warmup=1)
    shape = stats.pop("result")
    gpu_peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    print(f"whole-scan inference of {image}")
    print(f"  network preset {preset!r}, device {dev}, {torch.get_num_threads()} threads, model {model or 'untrained'}")
    print(f"  preprocessed volume {shape}, detections per run {counts[-1]}")
    print(
        f"  total   median {stats['median_s']:.2f} s (min {stats['min_s']:.2f}, max {stats['max_s']:.2f}) over {repeats} runs"
    )
    for name, values in parts.items():
        print(f"  {name:<26} median {float(np.median(values[1:])):.2f} s")
    print(f"  peak RSS {stats['peak_rss_mb']:.0f} MiB" + (f", peak GPU memory {gpu_peak:.0f} MiB" if gpu_peak else ""))
    print(f"  load average {os.getloadavg()[0]:.1f} (above the core count, wall times are inflated)")
