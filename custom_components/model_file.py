"""The model file (``models/model.pt``): the weights, and the network definition they were trained with.

Training saves ``{"model": state_dict, "network_record": {"preset", "anchor_sizes"}}`` (``checkpoint.BestModelSaver``
with :class:`NetworkRecord` beside the network), so inference, evaluation, export and the Deploy app build the network
the weights belong to without being told (:func:`recorded_preset`). A file holding a bare state dict (or
``{"model": state_dict}``) still loads; its preset is then the configured one. :func:`check_model_file` refuses a
missing, unreadable or mismatched file with one clear message before any scan is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from custom_components.errors import InputError
from custom_components.network import PRESETS, build_network

__all__ = ["NetworkRecord", "read_model_file", "model_weights", "recorded_preset", "check_model_file"]

WEIGHTS_KEY = "model"
RECORD_KEY = "network_record"


class NetworkRecord:
    """What network the weights saved beside it belong to; Ignite's ``Checkpoint`` saves its :meth:`state_dict`.

    Args:
        preset: the network preset (``custom_components.network.PRESETS``).
        anchor_sizes: the regression anchors per head, mm.
    """

    def __init__(self, preset: str, anchor_sizes: Sequence[Sequence[float]]) -> None:
        self.preset = str(preset)
        self.anchor_sizes = [[float(s) for s in sizes] for sizes in anchor_sizes]

    def state_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "anchor_sizes": self.anchor_sizes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.preset, self.anchor_sizes = state["preset"], state["anchor_sizes"]


def read_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """The file's content as ``{"model": state_dict, "network_record": {...} or absent}``.

    Raises:
        InputError: the file is missing, is not a PyTorch file, or holds no network weights.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found (train one, see README.md, or give --load_path)")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a file it cannot read
        raise InputError(f"{path}: not a readable model file ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    if isinstance(content, dict) and isinstance(content.get(WEIGHTS_KEY), dict):
        return content
    if isinstance(content, dict) and content and all(isinstance(v, torch.Tensor) for v in content.values()):
        return {WEIGHTS_KEY: content}
    raise InputError(f"{path}: holds no network weights (expected a state dict or {{'{WEIGHTS_KEY}': state dict}})")


def model_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network's state dict from a model file (see :func:`read_model_file`)."""
    return read_model_file(path)[WEIGHTS_KEY]


def recorded_preset(path: str | os.PathLike, default: str) -> str:
    """The preset recorded in the model file at ``path``; ``default`` when the file does not exist (yet) or records
    none. A file that exists but cannot be read raises :class:`InputError`."""
    if not Path(path).is_file():
        return default
    return str(read_model_file(path).get(RECORD_KEY, {}).get("preset", default))


def check_model_file(path: str | os.PathLike, preset: str, anchor_sizes: Sequence[Sequence[float]]) -> None:
    """Refuse, before any scan is read, a model file that is missing, unreadable, or whose weights do not fit the
    configured network (another preset or other regression anchors); the message says what the file holds and how
    to select it."""
    content = read_model_file(path)
    record = content.get(RECORD_KEY)
    if record is not None and record.get("preset") != preset:
        raise InputError(
            f"{path}: trained as the '{record.get('preset')}' network, but the '{preset}' network is configured "
            f"(leave --network_preset out to use the recorded one, or give --network_preset {record.get('preset')})"
        )
    expected = build_network(preset, anchor_sizes=anchor_sizes).state_dict()
    weights = content[WEIGHTS_KEY]
    for key, value in expected.items():
        if key not in weights or tuple(weights[key].shape) != tuple(value.shape):
            fits = [
                name for name in PRESETS
                if _fits(weights, build_network(name, anchor_sizes=anchor_sizes).state_dict())
            ]
            hint = f"it fits the '{fits[0]}' network (--network_preset {fits[0]})" if fits else "it fits no preset"
            got = tuple(weights[key].shape) if key in weights else "missing"
            raise InputError(
                f"{path}: the weights do not fit the configured '{preset}' network ({key}: {got}, expected "
                f"{tuple(value.shape)}); {hint}"
            )


def _fits(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return all(k in weights and weights[k].shape == v.shape for k, v in expected.items())
