"""World (LPS mm) <-> voxel index conversions for points and nodules.

Conventions (``docs/conventions.md``): an image's ``(4, 4)`` affine maps a voxel index ``(i, j, k)`` (MONAI/ITK array
order, voxel centres at integer indices) to LPS world mm: ``world = affine @ [i, j, k, 1]``. A nodule in world space
is a row ``(x, y, z, d)`` (centre in LPS mm, diameter in mm, as LUNA16's CSVs); in voxel space a row
``(ci, cj, ck, d)`` with the diameter in voxels.

Every function takes NumPy arrays or torch tensors and returns the same kind (tensors keep their device and floating
dtype; computations run in float64 so a round trip is exact to ~1e-9 mm).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

__all__ = ["world_to_voxel", "voxel_to_world", "nodules_world_to_voxel", "nodules_voxel_to_world", "voxel_size"]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _like(result: np.ndarray, template: ArrayT) -> ArrayT:
    """``result`` as the kind of ``template``: a tensor on its device (floating dtype kept, else float32)."""
    if isinstance(template, torch.Tensor):
        dtype = template.dtype if template.is_floating_point() else torch.float32
        return torch.as_tensor(result, dtype=dtype, device=template.device)
    dtype = template.dtype if np.issubdtype(np.asarray(template).dtype, np.floating) else np.float64
    return result.astype(dtype, copy=False)


def _points(points: np.ndarray, name: str) -> np.ndarray:
    if points.size == 0:
        return points.reshape(0, 3)
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"{name} must have shape (N, 3) or (N, 4), got {tuple(points.shape)}")
    return points


def voxel_size(affine: np.ndarray | torch.Tensor) -> np.ndarray:
    """Voxel size along ``i, j, k`` in mm, ``(3,)``: the lengths of the affine's first three columns."""
    return np.linalg.norm(_as_float64(affine)[:3, :3], axis=0)


def world_to_voxel(points_lps: ArrayT, affine: np.ndarray | torch.Tensor) -> ArrayT:
    """LPS world mm ``(N, 3)`` -> continuous voxel indices ``(i, j, k)`` ``(N, 3)`` of the image with ``affine``."""
    pts = _points(_as_float64(points_lps), "points_lps")[:, :3]
    aff = _as_float64(affine)
    ijk = np.linalg.solve(aff[:3, :3], (pts - aff[:3, 3]).T).T
    return _like(ijk, points_lps)


def voxel_to_world(points_ijk: ArrayT, affine: np.ndarray | torch.Tensor) -> ArrayT:
    """Continuous voxel indices ``(i, j, k)`` ``(N, 3)`` -> LPS world mm ``(N, 3)`` via ``affine``."""
    ijk = _points(_as_float64(points_ijk), "points_ijk")[:, :3]
    aff = _as_float64(affine)
    return _like(ijk @ aff[:3, :3].T + aff[:3, 3], points_ijk)


def _diameter_scale(affine: np.ndarray | torch.Tensor) -> float:
    """mm per voxel for diameters: the geometric mean voxel size (exactly the voxel size on an isotropic grid)."""
    return float(np.prod(voxel_size(affine)) ** (1.0 / 3.0))


def nodules_world_to_voxel(nodules: ArrayT, affine: np.ndarray | torch.Tensor) -> ArrayT:
    """World nodules ``(N, 4)`` rows ``(x, y, z, d)`` (LPS mm) -> voxel rows ``(ci, cj, ck, d_vox)`` ``(N, 4)``.

    ``d_vox = d / s`` with ``s`` the geometric mean voxel size (1 mm after preprocessing, so ``d_vox = d``).
    A negative diameter (LUNA16's ``-1`` = unknown size of an excluded finding) is kept unchanged.
    """
    rows = _as_float64(nodules).reshape(-1, 4)
    out = np.empty_like(rows)
    out[:, :3] = _as_float64(world_to_voxel(rows[:, :3], affine))
    out[:, 3] = np.where(rows[:, 3] < 0, rows[:, 3], rows[:, 3] / _diameter_scale(affine))
    return _like(out, nodules)


def nodules_voxel_to_world(nodules_voxel: ArrayT, affine: np.ndarray | torch.Tensor) -> ArrayT:
    """Voxel nodules ``(N, 4)`` rows ``(ci, cj, ck, d_vox)`` -> world rows ``(x, y, z, d)`` (LPS mm), the inverse of
    :func:`nodules_world_to_voxel` (negative diameters kept unchanged)."""
    rows = _as_float64(nodules_voxel).reshape(-1, 4)
    out = np.empty_like(rows)
    out[:, :3] = _as_float64(voxel_to_world(rows[:, :3], affine))
    out[:, 3] = np.where(rows[:, 3] < 0, rows[:, 3], rows[:, 3] * _diameter_scale(affine))
    return _like(out, nodules_voxel)
