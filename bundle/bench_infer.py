"""``python -m bundle bench-infer``: time and memory of whole-scan inference, the way ``configs/inference.json`` runs it.

One run = preprocessing (load included) + network over the cropped 1 mm volume, tile by tile as the config's
``tile_size`` says, + post-processing (per-tile threshold and candidate cap, decoding, NMS) + mapping to world mm, on
one scan. The network's share is timed around each call of the network (tiles included), post-processing is the rest
of the detector's time. Default scan: LIDC-IDRI-0002 (512 x 512 x 261) from
``../shared/data/lidc``. Without ``--model`` the network is untrained; its noduleness is then flat, so the score
threshold defaults to 0 to push the full candidate cap through NMS (the slowest post-processing path).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from bundle.bench_preprocess import DEFAULT_IMAGE, REPO
from bundle.timing import load_line, print_profile, time_runs
from custom_components.errors import InputError


def bench_infer(
    image: str = str(DEFAULT_IMAGE),
    model: str | None = None,
    preset: str = "lean",
    repeats: int = 3,
    score_threshold: float = 0.0,
    sliding_window: bool = False,
    device: str | None = None,
    amp: str | bool | None = None,
    tile_size: int | None = None,
    profile: int = 0,
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
        amp: mixed precision (``none``, ``bfloat16``, ``float16``; default: the config's, per device).
        tile_size: tile side (``0``: one pass over the whole crop; default: the config's, per device).
        profile: after the timed runs, profile one more run with ``torch.profiler`` and print its ``profile`` top
            operators by self CPU time.
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
    if amp is not None:
        parser.update({"amp": amp})
    if tile_size is not None:
        parser.update({"tile_size": int(tile_size) or None})
    preprocessing = parser.get_parsed_content("preprocessing")
    network = parser.get_parsed_content("network")
    if model:
        network.load_state_dict(model_weights(model))
    detector = parser.get_parsed_content("detector")
    parser.get_parsed_content("detector_ops")
    parts: dict[str, list[float]] = {"preprocess_s": [], "network_s": [], "postprocess_s": []}
    network_s = [0.0]
    run_network = detector._network

    def timed_network(images: torch.Tensor) -> list[torch.Tensor]:
        start = time.perf_counter()
        with torch.profiler.record_function("bench:network"):
            outputs = run_network(images)
        sync()
        network_s[0] += time.perf_counter() - start
        return outputs

    detector._network = timed_network
    counts: list[int] = []

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run_once() -> tuple:
        start = time.perf_counter()
        with torch.profiler.record_function("bench:preprocess"):
            data = run_chain(preprocessing, {"image": str(image)})
        mid = time.perf_counter()
        network_s[0] = 0.0
        with torch.profiler.record_function("bench:detector (network + post-processing)"):
            found = detect_scan(detector, data["image"], data["image"].affine, dev, use_inferer=sliding_window)
        sync()
        parts["preprocess_s"].append(mid - start)
        parts["network_s"].append(network_s[0])
        parts["postprocess_s"].append(time.perf_counter() - mid - network_s[0])
        counts.append(len(found.scores))
        return tuple(data["image"].shape)

    stats = time_runs(run_once, repeats=int(repeats), warmup=1)
    shape = stats.pop("result")
    gpu_peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    print(f"whole-scan inference of {image}")
    print(
        f"  network preset {preset!r}, device {dev}, {torch.get_num_threads()} threads, model {model or 'untrained'}, "
        f"amp {detector.amp!r}, tile_size {detector.tile_size}"
    )
    print(f"  preprocessed volume {shape}, detections per run {counts[-1]}")
    print(
        f"  total   median {stats['median_s']:.2f} s (min {stats['min_s']:.2f}, max {stats['max_s']:.2f}) over {repeats} runs"
    )
    for name, values in parts.items():
        print(f"  {name:<26} median {float(np.median(values[1:])):.2f} s")
    print(f"  peak RSS {stats['peak_rss_mb']:.0f} MiB" + (f", peak GPU memory {gpu_peak:.0f} MiB" if gpu_peak else ""))
    print(f"  {load_line()}")
    if profile:
        print_profile(run_once, int(profile))

