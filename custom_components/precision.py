"""Mixed precision (the ``amp`` config id): which autocast dtype a device gets, and the autocast context itself.

``amp`` is one value in the configs, read by training (:func:`custom_components.train_iteration.detection_iteration`),
provisional testing, validation and inference (:class:`custom_components.detector.NoduleDetector`):

- ``False`` / ``None`` / ``"none"``: full fp32;
- ``"bfloat16"`` / ``"float16"``: autocast to that dtype (fp16 only with a gradient scaler in training);
- ``True``: the device's own choice, :func:`default_amp`.

Only the network runs under autocast; decoding, NMS and the loss's target assignment read float32 head outputs.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path

import torch

__all__ = ["autocast", "autocast_dtype", "cpu_has_native_bf16", "default_amp", "needs_grad_scaler"]

#: ``/proc/cpuinfo`` flags of CPUs with bf16 dot-product instructions (x86: AVX512-BF16, AMX-BF16; Arm: BF16).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
#: ``torch.backends.cpu.get_cpu_capability()`` values under which PyTorch's kernels use AVX-512 (or better) code.
AVX512_CAPABILITIES = frozenset({"AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX", "AMX_BF16"})


def _cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags the Linux kernel reports (``flags`` on x86, ``Features`` on Arm); empty elsewhere."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether bf16 autocast on this CPU runs on bf16 instructions, i.e. is faster than fp32 rather than emulated.

    Two checks, both needed: the kernel's CPU flags list ``avx512_bf16`` or ``amx_bf16`` (x86) or ``bf16`` (Arm),
    and, on x86, PyTorch dispatches its AVX-512 kernels (``torch.backends.cpu.get_cpu_capability()``; it falls back
    to AVX2 code when ``ATEN_CPU_CAPABILITY`` says so or the build lacks them, and oneDNN then emulates bf16). A CPU
    without the flags (or a system without ``/proc/cpuinfo``) gets ``False``: autocast stays off.
    """
    flags = _cpu_flags(cpuinfo)
    if not flags & BF16_CPU_FLAGS:
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        return torch.backends.cpu.get_cpu_capability() in AVX512_CAPABILITIES
    return "bf16" in flags


def default_amp(device: torch.device | str) -> str:
    """The ``amp`` a device gets by default: ``"float16"`` on CUDA (with a gradient scaler in training, as MONAI's
    trainers do), ``"bfloat16"`` on a CPU with native bf16 (:func:`cpu_has_native_bf16`), else ``"none"``."""
    device = torch.device(device)
    if device.type == "cuda":
        return "float16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bfloat16"
    return "none"


def autocast_dtype(amp: bool | str | torch.dtype | None, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype ``amp`` selects on ``device``, or ``None`` for fp32.

    Raises:
        ValueError: ``amp`` is not one of the values of the module docstring, or ``True`` on a device without a
            mixed precision of its own (a CPU without native bf16: ask for ``"bfloat16"`` explicitly to emulate it).
    """
    if amp is None or amp is False:
        return None
    if isinstance(amp, torch.dtype):
        name = str(amp).removeprefix("torch.")
    elif amp is True:
        name = default_amp(device)
        if name == "none":
            raise ValueError(f"amp=True but {device} has no native mixed precision; use amp='bfloat16' to force it")
    elif isinstance(amp, str):
        name = amp.strip().lower().removeprefix("torch.")
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "false": "none", "": "none"}.get(name, name)
    else:
        raise ValueError(f"amp must be a bool, 'none', 'bfloat16' or 'float16', got {amp!r}")
    if name == "none":
        return None
    if name not in ("bfloat16", "float16"):
        raise ValueError(f"amp must be a bool, 'none', 'bfloat16' or 'float16', got {amp!r}")
    return getattr(torch, name)


def needs_grad_scaler(amp: bool | str | torch.dtype | None, device: torch.device | str) -> bool:
    """Whether training under ``amp`` needs a gradient scaler: fp16 only (bf16 has fp32's exponent range)."""
    return autocast_dtype(amp, device) == torch.float16


def autocast(amp: bool | str | torch.dtype | None, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` with the dtype ``amp`` selects; a no-op context when it selects fp32."""
    dtype = autocast_dtype(amp, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
