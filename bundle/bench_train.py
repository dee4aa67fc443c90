"""``python -m bundle bench-train``: training throughput (patches per second) and peak memory of a network preset.

One step = forward, the detection loss (target assignment, hard-negative mining), backward and an SGD step on a batch
of γ³ patches, each holding a bright 8 mm sphere as its nodule, exactly as ``train.json``'s trainer does it (data
loading excluded: patches are cropped from memory-mapped cached volumes, which costs microseconds). With ``--augment``
each step first passes every patch through ``configs/train.json``'s ``train#augmentation`` (flips, rotations and the
intensity, noise, kernel and slice-thickness transforms), as the demo's single-process data loader does before each
step, so the two runs give the augmentation's cost.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from bundle.timing import load_line, print_profile, time_runs


def _batch(batch_size: int, patch_size: int, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    images = 0.1 + 0.05 * torch.rand(batch_size, 1, patch_size, patch_size, patch_size, generator=generator)
    grid = torch.stack(torch.meshgrid(*[torch.arange(patch_size)] * 3, indexing="ij")).float()
    centre = (patch_size - 1) / 2
    images[:, 0, (grid - centre).pow(2).sum(0) < 16] = 0.8
    boxes = [torch.tensor([[centre, centre, centre, 8.0]]) for _ in range(batch_size)]
    return images.to(device), [b.to(device) for b in boxes]


def _augmentation(patch_size: int, seed: int = 0) -> Callable[[dict], dict]:
    """``train#augmentation`` of ``configs/train.json`` for γ = ``patch_size``, seeded."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "configs" / "train.json"))
    parser["patch_size"] = int(patch_size)
    augmentation = parser.get_parsed_content("train#augmentation")
    augmentation.set_random_state(seed)
    return augmentation


def bench_train(
    preset: str = "lean",
    patch_size: int = 64,
    batch_size: int = 4,
    steps: int = 10,
    device: str | None = None,
    amp: str | bool = "none",
    profile: int = 0,
    augment: bool = False,
) -> None:
    """Print patches per second (median over ``steps`` training steps after 2 warm-up steps) and peak memory.

    Args:
        preset: network preset (``lean`` or ``paper``).
        patch_size: γ.
        batch_size: patches per step.
        steps: timed steps.
        device: ``cpu`` or ``cuda`` (default: cuda when available).
        amp: mixed precision of the forward pass (``none``, ``bfloat16``, ``float16``, ``true`` for the device's own),
            as :func:`custom_components.train_iteration.detection_iteration` runs it (fp16 with a gradient scaler).
        profile: after the timed steps, profile one more step and print its ``profile`` top operators.
        augment: pass each patch through the training config's augmentation in every step (timed with it).
    """
    from custom_components.anchors import RegressionAnchors
    from custom_components.boxes import CubeCoder
    from custom_components.loss import DetectionLoss
    from custom_components.network import build_network
    from custom_components.precision import autocast, needs_grad_scaler
    from custom_components.train_iteration import TRAINING_MEMORY_FORMAT

    if not isinstance(augment, bool):  # fire passes ``--augment false`` as the (true) string "false"
        from custom_components.errors import InputError

        raise InputError(f"--augment is a switch (--augment / --noaugment), got {augment!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    network = build_network(preset).to(dev).train()
    loss_fn = DetectionLoss(RegressionAnchors(network.anchor_sizes, network.strides), CubeCoder())
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.9)
    images, boxes = _batch(int(batch_size), int(patch_size), dev)
    scaler = torch.amp.GradScaler(dev.type) if needs_grad_scaler(amp, dev) else None
    augmentation = _augmentation(int(patch_size)) if augment else None

    def augmented() -> tuple[torch.Tensor, list[torch.Tensor]]:
        from custom_components.boxes import cubes_to_standard
        from custom_components.sampling import standard_to_cubes

        out = [
            augmentation({"image": image.cpu(), "box": cubes_to_standard(box.cpu()), "ignore_box": torch.zeros(0, 6)})
            for image, box in zip(images, boxes)
        ]
        batch = torch.stack([torch.as_tensor(o["image"]).float() for o in out]).to(dev)
        return batch, [standard_to_cubes(torch.as_tensor(o["box"]), b[:, 3].cpu()).to(dev) for o, b in zip(out, boxes)]

    def step() -> float:
        inputs, targets = augmented() if augmentation is not None else (images, boxes)
        inputs = inputs.to(memory_format=TRAINING_MEMORY_FORMAT)
        optimizer.zero_grad(set_to_none=True)
        with autocast(amp, dev):
            outputs = network(inputs)
        loss = loss_fn([o.float() for o in outputs], targets)["loss"]
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    stats = time_runs(step, repeats=int(steps), warmup=2)
    alone = time_runs(augmented, repeats=max(int(steps), 20), warmup=1) if augmentation is not None else None
    rate = batch_size / stats["median_s"]
    gpu_peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    what = "with train#augmentation" if augment else "no augmentation"
    print(
        f"training throughput, preset {preset!r}, {patch_size}^3 patches, batch {batch_size}, {what}, device {dev}, "
        f"{torch.get_num_threads()} threads, amp {amp!r}"
    )
    print(f"  {rate:.1f} patches/s (median step {stats['median_s']:.3f} s, min {stats['min_s']:.3f}, max {stats['max_s']:.3f}, {steps} steps)")
    if alone is not None:
        share = alone["median_s"] / stats["median_s"]
        print(f"  the augmentation alone: median {alone['median_s'] * 1e3:.1f} ms per batch (min {alone['min_s'] * 1e3:.1f}), {100 * share:.0f} % of the median step")
    print(f"  peak RSS {stats['peak_rss_mb']:.0f} MiB" + (f", peak GPU memory {gpu_peak:.0f} MiB" if gpu_peak else ""))
    print(f"  {load_line()}")
    if profile:
        print_profile(step, int(profile))
