"""Ground-truth nodules from LPS world mm to voxel rows of the preprocessed image (the network's targets)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from custom_components.geometry import nodules_world_to_voxel

__all__ = ["NodulesToVoxeld"]


class NodulesToVoxeld(MapTransform):
    """World-space nodules -> voxel rows of the (final) image.

    For each key (default ``"nodules"`` and ``"excluded"``), ``data[key]`` holds rows ``(x, y, z, d)`` in LPS mm (a
    list of lists, an array or a tensor; LUNA16's CSV values). Adds ``data[key + voxel_key_suffix]``: a float32 tensor
    ``(N, 4)`` of rows ``(ci, cj, ck, d)`` in voxel indices of ``data[image_key]`` (its current affine), ``d`` in
    voxels (= mm after resampling to 1 mm); ``(0, 4)`` when the list is empty. Negative diameters (excluded findings
    of unknown size, ``d = -1``) stay negative. A key absent from the data (a bare scan at inference) is skipped: no
    voxel rows are invented for findings nobody gave.

    Args:
        keys: keys of world-space nodule rows.
        image_key: key of the image whose grid the voxel rows refer to.
        voxel_key_suffix: suffix of the output keys.
    """

    def __init__(
        self,
        keys: KeysCollection = ("nodules", "excluded"),
        image_key: str = "image",
        voxel_key_suffix: str = "_voxel",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.voxel_key_suffix = voxel_key_suffix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        affine = np.asarray(d[self.image_key].affine, dtype=np.float64)
        for key in self.key_iterator(d):
            rows = torch.as_tensor(np.asarray(d[key], dtype=np.float64).reshape(-1, 4))
            d[f"{key}{self.voxel_key_suffix}"] = nodules_world_to_voxel(rows, affine).to(torch.float32)
        return d
