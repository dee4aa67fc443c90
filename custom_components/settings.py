"""Refuse a run (training or inference) whose settings cannot work, before any scan is read.

Without this, a bad value ends deep inside a library, after the cache of every scan was built: ``--epochs 0`` as
Ignite's ``ValueError: Argument max_epochs is invalid``, ``--batch_size 0`` as a ``DataLoader`` traceback,
``--learning_rate -1`` as SGD's, ``--tile_size 40`` as the tiling's ``ValueError``; and ``--png_top -1`` silently
drew a PNG titled "no detections" for a scan with marks. Each rule here gives one ``error:`` line naming the setting, its value and what it
must be (through :mod:`custom_components.cli_errors`).
"""

from __future__ import annotations

import math
from typing import Any

from custom_components.errors import InputError
from custom_components.network import SIZE_DIVISIBLE
from custom_components.tiling import DEFAULT_TILE_MARGIN

#: The smallest tile whose core survives its margins (:func:`custom_components.tiling.plan_tiles`).
MIN_TILE_SIZE = SIZE_DIVISIBLE + 2 * DEFAULT_TILE_MARGIN


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: setting -> (whole number only, lowest allowed, highest allowed, lowest excluded); ``None`` = no bound.
_RULES: dict[str, tuple[bool, float | None, float | None, bool]] = {
    "epochs": (True, 1, None, False),
    "round_epochs": (True, 1, None, False),
    "val_interval": (True, 1, None, False),
    "batch_size": (True, 1, None, False),
    "patches_per_epoch": (True, 1, None, False),
    "patch_size": (True, 16, None, False),
    "num_workers": (True, 0, None, False),
    "preprocess_workers": (True, 0, None, False),
    "jitter": (True, 0, None, False),
    "hard_negatives": (True, 0, None, False),
    "fp_per_scan": (True, 0, None, False),
    "gt_share": (False, 0, 1, True),
    "lr_patience": (True, 0, None, False),
    "learning_rate": (False, 0, None, True),
    "momentum": (False, 0, 1, False),
    "weight_decay": (False, 0, None, False),
    "pos_iou": (False, 0, 1, True),
    "neg_iou": (False, 0, 1, False),
    "fp_score_threshold": (False, 0, 1, False),
    "score_threshold": (False, 0, 1, False),
    "nms_threshold": (False, 0, 1, True),
    "max_detections": (True, 1, None, False),
    "png_top": (True, 0, None, False),
    "sliding_window_size": (True, SIZE_DIVISIBLE, None, False),
    "tile_size": (True, 0, None, False),
}
#: settings whose ``None`` means "not used" (``gt_share``: draw uniformly from all sampling anchors)
_MAY_BE_NONE = {"gt_share"}


def _expectation(whole: bool, low: float | None, high: float | None, low_excluded: bool) -> str:
    kind = "a whole number" if whole else "a number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_excluded else '['}{low}, {high}]"
    if low is not None:
        return f"{kind} {'>' if low_excluded else '>='} {low}"
    return kind


def check_settings(**settings: Any) -> None:
    """Raise :class:`InputError` for the first setting (in :data:`_RULES`' order) that breaks its rule, for a
    ``tile_size`` other than 0 (one pass) below :data:`MIN_TILE_SIZE`, or for ``neg_iou >= pos_iou`` (no anchor could
    be both below the negative and above the positive overlap).

    Args:
        settings: config id -> resolved value, e.g. ``epochs=@epochs``; every name must be a key of :data:`_RULES`.
    """
    unknown = sorted(set(settings) - set(_RULES))
    if unknown:
        raise TypeError(f"no rule for the settings {unknown}")
    for name, (whole, low, high, low_excluded) in _RULES.items():
        if name not in settings:
            continue
        value = settings[name]
        if value is None and name in _MAY_BE_NONE:
            continue
        ok = _whole(value) if whole else _real(value)
        if ok and low is not None:
            ok = value > low if low_excluded else value >= low
        if ok and high is not None:
            ok = value <= high
        if not ok:
            raise InputError(
                f"setting {name} = {value!r}: expected {_expectation(whole, low, high, low_excluded)} "
                f"(set it with --{name})"
            )
    tile_size = settings.get("tile_size", 0)
    if 0 < tile_size < MIN_TILE_SIZE:
        raise InputError(
            f"setting tile_size = {tile_size!r}: expected 0 (one pass) or a whole number >= {MIN_TILE_SIZE} (a tile's "
            f"core inside margins of {DEFAULT_TILE_MARGIN} voxels; set it with --tile_size)"
        )
    if "pos_iou" in settings and "neg_iou" in settings and settings["neg_iou"] >= settings["pos_iou"]:
        raise InputError(
            f"settings neg_iou = {settings['neg_iou']!r} and pos_iou = {settings['pos_iou']!r}: neg_iou must "
            "be below pos_iou (an anchor below neg_iou is a negative, one above pos_iou a positive)"
        )
