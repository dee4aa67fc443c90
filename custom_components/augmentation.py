"""Simulated slice thickness: a training patch made to look as if its scan had thick slices.

Real archives hold slices of 0.6 to 5 mm. Preprocessing resamples every scan to 1 mm, but a 5 mm scan resampled to
1 mm is not a 1 mm scan: each of its slices averaged 5 mm of anatomy, and the 1 mm grid only interpolates between
them. A small nodule loses contrast and smears along the patient's z axis, a vessel running through the slice turns
into a blob. Training on thin-slice scans alone leaves the network blind to that (the demo model put 17 false marks
of noduleness >= 0.5 on one real 5 mm scan).

MONAI has no transform for this: ``RandGaussianSmooth`` blurs with a Gaussian (a thick slice is a box average, and is
then sampled only every slice interval), ``Spacing``/``Zoom`` resample without averaging over the slice profile, and
``RandSimulateLowResolution`` down- and up-samples all axes by one zoom, with no slice profile either. So this module
writes the one missing piece as a MONAI ``RandomizableTransform``: along one spatial axis, average over a slice of
random thickness ``t`` (a box of ``t`` mm), sample those thick slices every ``t`` mm from a random phase (contiguous
slices, as most archives reconstruct them), and interpolate linearly back to the original grid, as preprocessing does
with a real thick-slice scan. The three steps are linear along that axis only, so they are one ``(K, K)`` matrix
(:func:`thick_slice_matrix`) applied to every line along it: in-plane detail is untouched.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type

__all__ = ["RandSliceThicknessd", "thick_slice_matrix"]


def thick_slice_matrix(size: int, thickness: float, phase: float) -> np.ndarray:
    """The ``(size, size)`` float64 matrix that turns a line of ``size`` voxels (1 voxel = 1 unit, voxel ``n``
    covering ``[n - 1/2, n + 1/2)``) into what a reconstruction of slices ``thickness`` voxels thick, centred at
    ``phase + m * thickness`` for every whole ``m``, gives once interpolated linearly back onto the voxel centres.

    Row ``k`` holds the weights of output voxel ``k``: a thick slice centred at ``z`` is the mean of the line over
    ``[z - t/2, z + t/2]`` (each voxel weighted by its overlap with that interval, the line extended by repeating its
    end voxels), and voxel ``k`` is the linear interpolation between the two slices around it. Rows sum to 1, so a
    constant line stays constant. ``thickness`` >= 1; ``thickness = 1, phase = 0`` is the identity.
    """
    t = float(thickness)
    if t < 1.0:
        raise ValueError(f"thickness must be >= 1 voxel, got {thickness}")
    # slice centres covering [-t, size - 1 + t], so every voxel centre has one on each side
    first = int(np.floor((-t - phase) / t))
    last = int(np.ceil((size - 1 + t - phase) / t))
    centres = phase + t * np.arange(first, last + 1)
    # box weights of each slice over the voxels it overlaps (indices beyond the line repeat its end voxels)
    lo = int(np.floor(centres[0] - t / 2 - 0.5))
    hi = int(np.ceil(centres[-1] + t / 2 + 0.5))
    voxels = np.arange(lo, hi + 1)
    overlap = np.clip(
        np.minimum(voxels[None] + 0.5, centres[:, None] + t / 2) - np.maximum(voxels[None] - 0.5, centres[:, None] - t / 2),
        0.0,
        None,
    ) / t  # (slices, voxels)
    box = np.zeros((centres.size, size))
    np.add.at(box.T, np.clip(voxels, 0, size - 1), overlap.T)
    # linear interpolation of the slices at the voxel centres
    k = np.arange(size, dtype=np.float64)
    below = np.floor((k - centres[0]) / t).astype(int)
    weight = (k - centres[below]) / t
    interp = np.zeros((size, centres.size))
    interp[np.arange(size), below] = 1.0 - weight
    interp[np.arange(size), below + 1] += weight
    return interp @ box


class RandSliceThicknessd(RandomizableTransform, MapTransform):
    """With probability ``prob``, make ``data[key]`` ``(C, I, J, K)`` look reconstructed from slices of a random
    thickness along spatial ``axis`` (0, 1, 2 = I, J, K; K is the patient's z axis after preprocessing, which
    re-orients every scan to LPS).

    The thickness is drawn uniformly from ``thickness_mm`` and the slice phase uniformly within one slice; both are
    divided by ``spacing_mm`` (the voxel size along ``axis``, 1 mm after preprocessing; a training patch resized by a
    random scale has ``1 / scale`` mm voxels, which this ignores: the simulated thickness is then off by that scale,
    within the range anyway). All keys get the same draw. Shape, dtype and type (tensor or array) are kept. See the
    module docstring and :func:`thick_slice_matrix`.
    """

    backend = [torch.Tensor.__name__, np.ndarray.__name__]

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.3,
        thickness_mm: Sequence[float] = (1.0, 5.0),
        axis: int = 2,
        spacing_mm: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        low, high = float(thickness_mm[0]), float(thickness_mm[1])
        if not spacing_mm <= low <= high:
            raise ValueError(
                f"thickness_mm must be a range [low, high] with spacing_mm ({spacing_mm}) <= low <= high, "
                f"got {thickness_mm}"
            )
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be a spatial axis 0, 1 or 2, got {axis}")
        self.thickness_mm = (low, high)
        self.axis = int(axis)
        self.spacing_mm = float(spacing_mm)
        self.thickness = 1.0
        self.phase = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        self.thickness = float(self.R.uniform(*self.thickness_mm)) / self.spacing_mm
        self.phase = float(self.R.uniform(0.0, self.thickness))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            size = image.shape[self.axis + 1]
            matrix = torch.as_tensor(thick_slice_matrix(size, self.thickness, self.phase), dtype=image.dtype)
            lines = image.movedim(self.axis + 1, -1)
            out = (lines @ matrix.T).movedim(-1, self.axis + 1)
            d[key], *_ = convert_to_dst_type(out.contiguous(), d[key])
        return d
