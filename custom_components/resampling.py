"""Resampling to the 1 mm grid, separable where the grid is axis-aligned (always, after ``Orientationd``).

Images are ``MetaTensor``s ``(C, I, J, K)`` whose ``meta["affine"]`` maps a voxel index to LPS world mm; resampling
records the same metadata as MONAI's, so the affine (and ``inverse``) stay right.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Spacing, SpatialResample, TraceableTransform

__all__ = ["SeparableSpacingd", "SeparableSpatialResample", "resample_axis_aligned"]


def _axis_aligned_plan(xform: np.ndarray, tol: float = 1e-6) -> list[tuple[int, float, float]] | None:
    """For an output->input voxel transform ``xform`` ``(4, 4)``, per output axis ``a`` the input axis it reads and
    ``(scale, offset)`` with ``input_coord = scale * a_index + offset``; ``None`` unless each output axis maps to one
    input axis (scaling, flips, axis permutations, translations; no rotation or shear)."""
    linear = xform[:3, :3]
    plan, used = [], set()
    for a in range(3):
        column = np.abs(linear[:, a])
        src = int(np.argmax(column))
        if src in used or column[src] == 0 or np.delete(column, src).max() > tol * column[src]:
            return None
        used.add(src)
        plan.append((src, float(linear[src, a]), float(xform[src, 3])))
    return plan


def _resample_axis(x: np.ndarray, axis: int, coords: np.ndarray, mode: str, padding_mode: str) -> np.ndarray:
    """Sample ``x`` along ``axis`` at continuous voxel coordinates ``coords`` (1D float64), as ``grid_sample`` does for
    voxel centres: linear or nearest (round half to even), ``"border"`` clamps, ``"zeros"`` reads 0 outside.

    NumPy on purpose: ``np.take`` is 20x faster than ``torch.index_select`` along the last axis, and single-threaded
    code does not slow down when other jobs share the cores, as torch's OpenMP loops do.
    """
    n = x.shape[axis]
    shape = [1] * x.ndim
    shape[axis] = -1
    if padding_mode == "border":
        coords = np.clip(coords, 0, n - 1)
    if mode == "nearest":
        index = np.rint(coords).astype(np.int64)
        out = np.take(x, np.clip(index, 0, n - 1), axis=axis)
        if padding_mode == "zeros":
            out *= ((index >= 0) & (index < n)).reshape(shape).astype(out.dtype)
        return out
    low = np.floor(coords).astype(np.int64)
    w_high = coords - low
    w_low = 1.0 - w_high
    if padding_mode == "zeros":
        w_low *= (low >= 0) & (low < n)
        w_high *= (low + 1 >= 0) & (low + 1 < n)
    out = np.take(x, np.clip(low, 0, n - 1), axis=axis).astype(np.float32, copy=False)
    out *= w_low.astype(np.float32).reshape(shape)
    high = np.take(x, np.clip(low + 1, 0, n - 1), axis=axis).astype(np.float32, copy=False)
    high *= w_high.astype(np.float32).reshape(shape)
    out += high
    return out


def resample_axis_aligned(
    img: torch.Tensor, xform: np.ndarray, spatial_size: Sequence[int], mode: str, padding_mode: str
) -> torch.Tensor | None:
    """Resample ``img`` ``(C, I, J, K)`` onto an output grid ``spatial_size`` whose voxel ``o`` reads the input at
    ``xform @ o`` (``(4, 4)``, output -> input voxel indices), one axis at a time; ``None`` if ``xform`` rotates.

    Trilinear interpolation is separable, so three 1D passes give ``grid_sample``'s result (same voxel-centre
    convention as MONAI's ``SpatialResample`` with ``align_corners=False``) without its dense ``(N, 3)`` sampling grid:
    about 10x faster on a CPU. The axis that shrinks most goes first so later passes handle fewer voxels.
    Returns float32.
    """
    plan = _axis_aligned_plan(xform)
    if plan is None:
        return None
    x = img.detach().cpu().numpy().transpose(0, *(src + 1 for src, _, _ in plan))  # output axis a at position a + 1
    order = sorted(range(3), key=lambda a: spatial_size[a] / x.shape[a + 1])
    for a in order:
        _, scale, offset = plan[a]
        x = _resample_axis(x, a + 1, np.arange(int(spatial_size[a])) * scale + offset, mode, padding_mode)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(img.device)


class SeparableSpatialResample(SpatialResample):
    """``monai.transforms.SpatialResample`` with a fast path: when the resampling only scales, flips, permutes or
    translates the axes (resampling an LPS-oriented image to 1 mm, a mask onto an image grid), mode is bilinear or
    nearest, padding border or zeros and ``align_corners=False``, it runs :func:`resample_axis_aligned` instead of
    ``grid_sample`` and records the same metadata (``affine``, applied operation, hence the same ``inverse``).
    Anything else (rotations, splines, lazy mode) goes to MONAI's implementation."""

    def __call__(
        self,
        img: torch.Tensor,
        dst_affine: torch.Tensor | None = None,
        spatial_size: Sequence[int] | torch.Tensor | int | None = None,
        mode: str | int | None = None,
        padding_mode: str | None = None,
        align_corners: bool | None = None,
        dtype: DtypeLike = None,
        lazy: bool | None = None,
    ) -> torch.Tensor:
        mode_ = mode if mode is not None else self.mode
        padding_mode_ = padding_mode if padding_mode is not None else self.padding_mode
        align_corners_ = align_corners if align_corners is not None else self.align_corners
        lazy_ = self.lazy if lazy is None else lazy
        fast = (
            not lazy_
            and isinstance(img, MetaTensor)
            and not img.pending_operations
            and img.ndim == 4
            and dst_affine is not None
            and spatial_size is not None
            and not isinstance(spatial_size, int)
            and mode_ in ("bilinear", "nearest")
            and padding_mode_ in ("border", "zeros")
            and not align_corners_
        )
        result = None
        if fast:
            src_affine = img.affine.to(torch.float64)
            xform = np.linalg.solve(src_affine.numpy(), np.asarray(dst_affine, dtype=np.float64))
            size = [int(s) for s in spatial_size]
            result = resample_axis_aligned(img.as_tensor(), xform, size, str(mode_), str(padding_mode_))
        if result is None:
            return super().__call__(img, dst_affine, spatial_size, mode, padding_mode, align_corners, dtype, lazy)
        meta_info = TraceableTransform.track_transform_meta(
            img,
            sp_size=size,
            affine=torch.as_tensor(xform),
            extra_info={
                "dtype": "float32",
                "mode": str(mode_),
                "padding_mode": str(padding_mode_),
                "align_corners": False,
                "src_affine": src_affine,
            },
            orig_size=img.shape[1:],
            transform_info=self.get_transform_info(),
            lazy=False,
        )
        return MetaTensor(result).copy_meta_from(meta_info)


class SeparableSpacingd(MapTransform, InvertibleTransform):
    """``monai.transforms.Spacingd`` (same output grid, affine and metadata, hence the same ``inverse``) whose
    resampling takes :class:`SeparableSpatialResample`'s fast path on axis-aligned grids: after ``Orientationd`` this
    is always the case, and resampling LIDC-IDRI-0002's lung crop (427 x 307 x 250 -> 291 x 210 x 312 voxels) drops
    from 1.1-2.3 s (``grid_sample``, 2 or 1 threads) to 0.2-0.4 s on 2 CPU cores.

    The output grid is MONAI's own: a lazy ``monai.transforms.Spacing`` computes it (pending affine and shape, no
    voxel touched), so the grid rules (rounding of the shape, the offset) stay MONAI's across versions.

    Args:
        keys: keys of the images to resample (``(C, I, J, K)`` MetaTensors, affine voxel -> LPS mm).
        pixdim: output voxel size in mm.
        mode, padding_mode, dtype: as ``Spacingd``'s (``dtype``: the computation's precision).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        pixdim: Sequence[float] | float,
        mode: str = "bilinear",
        padding_mode: str = "border",
        dtype: DtypeLike = np.float64,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.grid = Spacing(pixdim=pixdim, lazy=True)
        self.resampler = SeparableSpatialResample(mode=mode, padding_mode=padding_mode, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            planned = self.grid(d[key])  # a lazy copy: the target grid as a pending operation
            d[key] = self.resampler(
                d[key], dst_affine=planned.peek_pending_affine(), spatial_size=planned.peek_pending_shape()
            )
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resampler.inverse(d[key])
        return d
