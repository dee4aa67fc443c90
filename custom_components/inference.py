"""Whole-scan inference on scans given by path (``configs/inference.json``).

A scan goes through the preprocessing chain (1 mm, LPS orientation, lung crop, [0, 1]); the detector finds voxel
cubes in that volume; the preprocessed image's affine, which MONAI updated through the crop, orientation and
resampling, maps them back to LPS world millimetres of the original scan.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.engines import SupervisedEvaluator

from custom_components.detector import NoduleDetector
from custom_components.errors import InputError
from custom_components.geometry import nodules_voxel_to_world

IMAGE_SUFFIXES = (".mhd", ".mha", ".nii", ".nii.gz", ".nrrd")


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def _is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry ``DICM`` at byte 128, whatever their name."""
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def list_scans(input_path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict[str, str]]:
    """The scans under ``input_path`` as datalist entries ``{"image": path}``.

    ``input_path`` is an image file (MetaImage, NIfTI, NRRD), a DICOM series folder, a folder of such files and
    series (searched recursively), or a list of any of those.

    Raises:
        InputError: a path does not exist, or no scan is found under it.
    """
    if isinstance(input_path, (list, tuple)):
        return [scan for p in input_path for scan in list_scans(p)]
    root = Path(input_path)
    if not root.exists():
        raise InputError(f"{root}: no such file or folder")
    if root.is_file():
        if not (_is_image_file(root) or _is_dicom_file(root)):
            raise InputError(f"{root}: not a scan (expected {', '.join(IMAGE_SUFFIXES)} or a DICOM series folder)")
        return [{"image": str(root if _is_image_file(root) else root.parent)}]
    scans = []
    for folder, _, files in sorted(os.walk(root)):
        paths = [Path(folder) / f for f in sorted(files)]
        scans += [{"image": str(p)} for p in paths if _is_image_file(p)]
        if any(_is_dicom_file(p) for p in paths if not _is_image_file(p)):
            scans.append({"image": folder})
    if not scans:
        raise InputError(f"{root}: no scan found (looked for {', '.join(IMAGE_SUFFIXES)} files and DICOM series)")
    return scans


def seriesuid_of(image: Any, path: str) -> str:
    """The scan's identifier: the reader's ``seriesuid`` (DICOM SeriesInstanceUID, LUNA16 file stem) when known,
    else the file name without its image suffix."""
    uid = getattr(image, "meta", {}).get("seriesuid")
    if uid:
        return str(uid)
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


class ScanInference:
    """``iteration_update`` of the inference evaluator: one preprocessed scan per item.

    The data loader yields lists of preprocessed dicts (``collate_fn`` keeps them as a list); each has ``image`` a
    ``(1, I, J, K)`` MetaTensor whose affine maps voxels to LPS world mm. Returns, per scan::

        {"seriesuid", "image_path",
         "marks": (N, 4) x, y, z, probability (LPS world mm),
         "cubes": (N, 4) ci, cj, ck, d (voxels of the preprocessed image), "scores": (N,),
         "image": (I, J, K) the preprocessed volume (for the PNG)}

    Args:
        detector: the detector to run.
        use_inferer: sliding-window inference (memory-bounded) instead of one pass over the whole crop.
    """

    def __init__(self, detector: NoduleDetector, use_inferer: bool = False) -> None:
        self.detector = detector
        self.use_inferer = use_inferer

    def __call__(self, engine: SupervisedEvaluator, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for item in items:
            image = item["image"]
            path = str(image.meta.get("filename_or_obj", item.get("image_path", "")))
            result = self.detector(image[None].to(engine.state.device), use_inferer=self.use_inferer)[0]
            cubes = result[self.detector.cube_key].cpu().numpy()
            scores = result[self.detector.pred_score_key].cpu().numpy()
            affine = np.asarray(image.affine, dtype=np.float64)
            world = nodules_voxel_to_world(cubes, affine) if len(cubes) else np.zeros((0, 4))
            out.append(
                {
                    "seriesuid": seriesuid_of(image, path),
                    "image_path": path,
                    "marks": np.column_stack([world[:, :3], scores]),
                    "cubes": cubes,
                    "scores": scores,
                    "image": torch.as_tensor(image)[0].cpu().numpy(),
                }
            )
        return out
