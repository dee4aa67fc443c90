"""Preprocessed scans cached on disk, one memory-mapped ``.npy`` per scan.

Training crops many small patches from every scan each epoch; preprocessing a LUNA16 scan takes seconds, cropping a
patch from a memory-mapped array microseconds. This is MONAI's ``PersistentDataset`` idea with one change that
matters for patch sampling: the volume is stored as a plain ``.npy`` (float16, [0, 1]) that is memory-mapped, so a
patch reads only its own bytes instead of unpickling the whole volume.

An entry's key hashes the datalist entry with :func:`definition_key` of the preprocessing chain, so an edited chain
(a parameter, a transform, a transform's code) never reads a stale volume. A cache entry is ``<key>.npy`` (the image, ``(I, J, K)``) plus ``<key>.json`` (geometry and annotations), both written
atomically; the JSON is written last, so an entry without JSON is incomplete and is rebuilt.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.data import Dataset
from tqdm import tqdm

from custom_components.atomic import atomic_write
from custom_components.scan_files import seriesuid_of

logger = logging.getLogger(__name__)


def _canonical(obj: Any, seen: set[int]) -> Any:
    """A JSON-able description of ``obj``'s type and state, recursing into containers and object attributes."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (enum.Enum, torch.dtype, np.dtype, type)):
        return str(obj)
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        array = obj.detach().cpu().numpy() if isinstance(obj, torch.Tensor) else obj
        return f"array{array.shape}{array.dtype}:{hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()}"
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [_canonical(x, seen) for x in obj]
        return sorted(items, key=str) if isinstance(obj, (set, frozenset)) else items
    if isinstance(obj, dict):
        return {str(k): _canonical(v, seen) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (np.random.RandomState, np.random.Generator, logging.Logger)):
        return type(obj).__name__  # state of no consequence to a deterministic chain's output
    if callable(obj) and not hasattr(obj, "__dict__"):
        return getattr(obj, "__qualname__", repr(obj))
    if id(obj) in seen:
        return "<cycle>"
    seen.add(id(obj))
    cls = type(obj)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "code": _class_code(cls),
        "state": _canonical(vars(obj), seen) if hasattr(obj, "__dict__") else repr(obj),
    }


@functools.lru_cache(maxsize=None)
def _class_code(cls: type) -> str:
    """Digest of the source of ``cls`` and its bases (so an edit to a transform's code changes the key)."""
    digest = hashlib.sha1()
    for base in cls.__mro__:
        if base is object:
            continue
        try:
            digest.update(inspect.getsource(base).encode())
        except (OSError, TypeError):  # compiled classes have no source: their module's version stands for it
            module = base.__module__.split(".")[0]
            digest.update(f"{base.__module__}.{base.__qualname__}@{getattr(sys.modules.get(module), '__version__', '')}".encode())
    return digest.hexdigest()


def definition_key(transform: Any) -> str:
    """A digest of what a preprocessing chain does: every transform's class, its source code and its parameters,
    recursively. Two chains with the same key produce the same volumes; any change gives another key."""
    text = json.dumps(_canonical(transform, set()), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass
class CachedScan:
    """One preprocessed scan.

    Attributes:
        image: ``(I, J, K)`` float16 memory-mapped array, 1 mm voxels, intensities in [0, 1].
        affine: ``(4, 4)`` voxel index -> LPS world mm of the original scan.
        nodules_voxel: ``(N, 4)`` rows ``(ci, cj, ck, d)`` in voxels of ``image``.
        excluded_voxel: ``(K, 4)`` the excluded findings likewise (``d < 0`` where the size is unknown).
        nodules: ``(N, 4)`` rows ``(x, y, z, d)`` in LPS world mm, as in the datalist.
        excluded: ``(K, 4)`` likewise.
        seriesuid: the scan's identifier.
    """

    image: np.ndarray
    affine: np.ndarray
    nodules_voxel: np.ndarray
    excluded_voxel: np.ndarray
    nodules: np.ndarray
    excluded: np.ndarray
    seriesuid: str


def _rows(value: Any) -> np.ndarray:
    """``(N, 4)`` float32 array from a list/tensor of rows, ``(0, 4)`` when empty or absent."""
    if value is None:
        return np.zeros((0, 4), dtype=np.float32)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32).reshape(-1, 4)


def as_datalist_entry(item: dict) -> dict:
    """A datalist entry with ``nodules`` rows ``(x, y, z, d)``: entries as MONAI Label's datastore gives them
    (``box``: ``(N, 6)`` centre + size ``cccwhd`` in LPS world mm, ``label``) become our convention, a nodule's
    diameter being the mean of the box's three sides; entries that already have ``nodules`` pass unchanged."""
    if "nodules" in item or "box" not in item:
        return item
    boxes = np.asarray(item["box"], dtype=np.float64).reshape(-1, 6)
    entry = {k: v for k, v in item.items() if k not in ("box", "label")}
    entry["nodules"] = np.column_stack([boxes[:, :3], boxes[:, 3:].mean(axis=1)]).tolist()
    return entry


class PreprocessedScans(Sequence[CachedScan]):
    """Datalist entries preprocessed once and served from a disk cache.

    Args:
        data: datalist entries (``image``, ``seriesuid``, ``nodules``, ``excluded``; see ``docs/conventions.md``), or
            MONAI Label's ``{"image", "box", "label"}`` entries (see :func:`as_datalist_entry`).
        transform: the preprocessing chain (``configs`` id ``preprocessing``) mapping an entry to ``image``
            ``(1, I, J, K)`` MetaTensor with an LPS affine, ``nodules_voxel`` and ``excluded_voxel``.
        cache_dir: where the ``.npy``/``.json`` pairs live.
        num_workers: processes used to preprocess the scans missing from the cache.
    """

    def __init__(
        self,
        data: Sequence[dict],
        transform: Callable[[dict], dict],
        cache_dir: str | Path,
        num_workers: int = 0,
    ) -> None:
        self.data = [as_datalist_entry(item) for item in data]
        self.transform = transform
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        definition = definition_key(transform)
        self.keys = [self._key(item, definition) for item in self.data]
        self._build_missing(num_workers)
        self._scans = [self._load(k) for k in self.keys]

    @staticmethod
    def _key(item: dict, cache_key: str) -> str:
        text = json.dumps(item, sort_keys=True, default=str) + "|" + cache_key
        return hashlib.sha1(text.encode()).hexdigest()

    def _build_missing(self, num_workers: int) -> None:
        missing = [i for i, k in enumerate(self.keys) if not (self.cache_dir / f"{k}.json").exists()]
        if not missing:
            return
        # batch_size=None hands each preprocessed dict through unbatched; workers preprocess scans in parallel.
        loader = torch.utils.data.DataLoader(
            Dataset([self.data[i] for i in missing], transform=self.transform), batch_size=None, num_workers=num_workers
        )
        for i, out in tqdm(zip(missing, loader), total=len(missing), desc="preprocessing", unit="scan"):
            self._store(self.keys[i], self.data[i], out)

    def _store(self, key: str, item: dict, out: dict) -> None:
        image = out["image"]
        affine = np.asarray(image.affine if hasattr(image, "affine") else image.meta["affine"], dtype=np.float64)
        array = np.asarray(image.detach().cpu().numpy()[0] if isinstance(image, torch.Tensor) else image[0])
        with atomic_write(self.cache_dir / f"{key}.npy", "wb") as f:
            np.save(f, array.astype(np.float16))
        meta = {
            "seriesuid": item.get("seriesuid") or seriesuid_of(image, str(item["image"])),
            "affine": affine.tolist(),
            "nodules_voxel": _rows(out.get("nodules_voxel")).tolist(),
            "excluded_voxel": _rows(out.get("excluded_voxel")).tolist(),
            "nodules": _rows(item.get("nodules")).tolist(),
            "excluded": _rows(item.get("excluded")).tolist(),
        }
        with atomic_write(self.cache_dir / f"{key}.json") as f:
            json.dump(meta, f)

    def _load(self, key: str) -> CachedScan:
        meta = json.loads((self.cache_dir / f"{key}.json").read_text())
        return CachedScan(
            image=np.load(self.cache_dir / f"{key}.npy", mmap_mode="r"),
            affine=np.asarray(meta["affine"], dtype=np.float64),
            nodules_voxel=_rows(meta["nodules_voxel"]),
            excluded_voxel=_rows(meta["excluded_voxel"]),
            nodules=_rows(meta["nodules"]),
            excluded=_rows(meta["excluded"]),
            seriesuid=meta["seriesuid"],
        )

    def __len__(self) -> int:
        return len(self._scans)

    def __getitem__(self, index: int) -> CachedScan:  # type: ignore[override]
        return self._scans[index]
