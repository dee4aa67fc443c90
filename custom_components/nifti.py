"""NaN and infinite voxels of a float NIfTI file, which SimpleITK's NIfTI reader turns into 0 without a word.

ITK's ``NiftiImageIO`` replaces every NaN and infinity of a float NIfTI volume with 0 while reading, so a broken
block of a scan reaches the detector as water (0 HU) and :func:`custom_components.volume_checks.check_finite` on
SimpleITK's voxels cannot see it. :func:`check_nifti_finite` reads the file's own voxels with NiBabel, slab by slab
along ``k`` (a few MB at a time, not a second copy of the volume), and refuses them with the count and their
bounding box. It runs only for float NIfTI files whose voxels SimpleITK changed (a gzip checksum that does not match
SimpleITK's voxels) or that carry no checksum (``.nii``): an int16 CT (every LUNA16 scan) never pays for it.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from custom_components.volume_checks import refuse_non_finite

__all__ = ["check_nifti_finite"]

_SLAB_BYTES = 1 << 25  # voxels read at a time


def check_nifti_finite(path: str | os.PathLike) -> None:
    """Raise :class:`~custom_components.errors.InputError` if the float voxels stored in the NIfTI file ``path``
    hold NaN or infinities (the message gives their bounding box in voxel indices ``(i, j, k)``)."""
    proxy = nib.load(str(path)).dataobj
    if not np.issubdtype(proxy.dtype, np.floating) or len(proxy.shape) != 3:
        return
    size_i, size_j, size_k = proxy.shape
    step = max(1, _SLAB_BYTES // (size_i * size_j * proxy.dtype.itemsize))
    n_nan = n_inf = 0
    hit_i = np.zeros(size_i, dtype=bool)
    hit_j = np.zeros(size_j, dtype=bool)
    hit_k = np.zeros(size_k, dtype=bool)
    for k in range(0, size_k, step):
        slab = np.asarray(proxy[:, :, k : k + step])  # (I, J, step), NIfTI's storage order = SimpleITK's (i, j, k)
        bad = ~np.isfinite(slab)
        if not bad.any():
            continue
        nan = int(np.count_nonzero(np.isnan(slab)))
        n_nan += nan
        n_inf += int(np.count_nonzero(bad)) - nan
        hit_i |= bad.any(axis=(1, 2))
        hit_j |= bad.any(axis=(0, 2))
        hit_k[k : k + step] = bad.any(axis=(0, 1))
    if n_nan or n_inf:
        hits = [np.flatnonzero(h) for h in (hit_i, hit_j, hit_k)]
        refuse_non_finite(path, n_nan, n_inf, size_i * size_j * size_k, hits)
