"""The one path from a preprocessed scan to its detections in LPS world millimetres.

Every caller goes through :func:`detect_scan`: whole-scan inference (``configs/inference.json``), validation and
evaluation (:class:`ScanDetection`), provisional testing (:mod:`custom_components.rounds`), the MONAI Deploy app and
the inference benchmark. The detector finds voxel cubes of the preprocessed 1 mm volume; the volume's affine, which
MONAI kept right through the crop, the reorientation and the resampling, maps them to the original scan's LPS mm.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Hashable, Mapping
from typing import Any, Sequence

import numpy as np
import torch
from monai.engines import SupervisedEvaluator
from monai.transforms import MapTransform

from custom_components.cache import PreprocessedScans
from custom_components.detector import NoduleDetector
from custom_components.geometry import nodules_voxel_to_world
from custom_components.scan_files import seriesuid_of

__all__ = ["ScanDetections", "detect_scan", "DetectionsToWorldd", "ScanDetection", "ScanInference"]


@dataclass
class ScanDetections:
    """One scan's detections, highest noduleness first, row for row in both frames.

    Attributes:
        world: ``(N, 4)`` float64 rows ``(x, y, z, d)``: centre in LPS world mm of the original scan, diameter in mm.
        scores: ``(N,)`` noduleness in [0, 1] (float32, as the detector gives it).
        cubes: ``(N, 4)`` rows ``(ci, cj, ck, d)`` in voxel indices of the preprocessed volume the detector saw
            (float32, as the detector gives them).
    """

    world: np.ndarray
    scores: np.ndarray
    cubes: np.ndarray

    @property
    def marks(self) -> np.ndarray:
        """LUNA16 marks: ``(N, 4)`` rows ``(x, y, z, probability)``, LPS world mm."""
        return np.column_stack([self.world[:, :3], self.scores]).astype(np.float64)


def detect_scan(
    detector: NoduleDetector,
    image: torch.Tensor | np.ndarray,
    affine: torch.Tensor | np.ndarray,
    device: torch.device | str,
    use_inferer: bool = False,
) -> ScanDetections:
    """Detect the nodules of one preprocessed scan.

    Args:
        detector: the detector (network, regression anchors, post-processing).
        image: the preprocessed volume, ``(I, J, K)`` or ``(1, I, J, K)``, 1 mm voxels in [0, 1] (a ``MetaTensor`` of
            the preprocessing chain or a cached memory-mapped array).
        affine: ``(4, 4)`` voxel index of ``image`` -> LPS world mm of the original scan.
        device: where the network runs.
        use_inferer: sliding-window inference (bounded memory) instead of one pass over the whole volume.
    """
    volume = torch.as_tensor(np.asarray(image, dtype=np.float32) if isinstance(image, np.ndarray) else image)
    volume = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
    volume = volume.reshape(1, 1, *volume.shape[-3:]).to(device=device, dtype=torch.float32)
    result = detector(volume, use_inferer=use_inferer)[0]
    cubes = result[detector.cube_key].cpu().numpy().reshape(-1, 4)
    scores = result[detector.pred_score_key].cpu().numpy()
    return ScanDetections(world=_to_world(cubes, affine), scores=scores, cubes=cubes)


def _to_world(cubes: np.ndarray, affine: torch.Tensor | np.ndarray) -> np.ndarray:
    """Voxel cubes ``(N, 4)`` of the preprocessed volume -> world rows ``(x, y, z, d)`` (LPS mm) via its affine."""
    affine = np.asarray(affine, dtype=np.float64)
    return nodules_voxel_to_world(cubes, affine) if len(cubes) else np.zeros((0, 4))


class DetectionsToWorldd(MapTransform):
    """``postprocessing`` of ``configs/inference.json`` for callers that run the ``detector`` themselves (MONAI
    Label's ``BundleInferTask``): the detector's voxel cubes (``cube_key``, ``(N, 4)``) of ``data[image_key]`` become
    ``box_key`` boxes ``(N, 6)`` in MONAI's ``cccwhd`` mode, centre in LPS world mm and the three sides the diameter in
    mm, mapped by the same function as :func:`detect_scan`'s world rows.

    Args:
        image_key: the preprocessed image whose affine maps its voxels to LPS world mm.
        cube_key: the detector's cubes.
        box_key: where the world boxes go.
    """

    def __init__(self, image_key: str = "image", cube_key: str = "cube", box_key: str = "box") -> None:
        super().__init__(keys=cube_key)
        self.image_key, self.cube_key, self.box_key = image_key, cube_key, box_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        cubes = torch.as_tensor(d[self.cube_key]).detach().cpu().numpy().astype(np.float64).reshape(-1, 4)
        world = _to_world(cubes, d[self.image_key].affine)
        d[self.box_key] = torch.as_tensor(np.column_stack([world[:, :3], np.repeat(world[:, 3:], 3, axis=1)]))
        return d


class ScanDetection:
    """``iteration_update`` of a MONAI ``SupervisedEvaluator`` whose data loader yields lists of scan indices.

    For each scan it returns the dict :class:`custom_components.froc_metric.FROCMetric` expects:
    ``{"seriesuid", "marks" (N, 4) x, y, z, probability, "nodules" (M, 4), "excluded" (K, 4)}``, world LPS mm.

    Args:
        detector: the detector sharing the evaluator's network.
        scans: the cached validation scans.
        use_inferer: sliding-window inference (memory-bounded) instead of one whole-volume pass.
    """

    def __init__(self, detector: NoduleDetector, scans: PreprocessedScans, use_inferer: bool = False) -> None:
        self.detector = detector
        self.scans = scans
        self.use_inferer = use_inferer

    def __call__(self, engine: SupervisedEvaluator, indices: Sequence[int] | torch.Tensor) -> list[dict[str, Any]]:
        out = []
        for index in torch.as_tensor(indices).reshape(-1).tolist():
            scan = self.scans[index]
            found = detect_scan(self.detector, scan.image, scan.affine, engine.state.device, self.use_inferer)
            out.append(
                {"seriesuid": scan.seriesuid, "marks": found.marks, "nodules": scan.nodules, "excluded": scan.excluded}
            )
        return out


class ScanInference:
    """``iteration_update`` of the inference evaluator: one preprocessed scan per item.

    The data loader yields lists of preprocessed dicts (``collate_fn`` keeps them as a list); each has ``image`` a
    ``(1, I, J, K)`` MetaTensor whose affine maps voxels to LPS world mm. Returns, per scan::

        {"seriesuid", "image_path", "detections": ScanDetections (world LPS mm and voxel cubes),
         "image": (I, J, K) the preprocessed volume (for the PNG)}

    or, for a scan :class:`custom_components.scan_files.ScanDataset` could not preprocess, its
    ``{"image_path", "error"}`` unchanged.

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
            if "error" in item:  # a scan the dataset could not preprocess: the writer reports it
                out.append(item)
                continue
            image = item["image"]
            path = str(image.meta.get("filename_or_obj", item.get("image_path", "")))
            found = detect_scan(self.detector, image, image.affine, engine.state.device, self.use_inferer)
            out.append(
                {
                    "seriesuid": seriesuid_of(image, path),
                    "image_path": path,
                    "detections": found,
                    "image": torch.as_tensor(image)[0].cpu().numpy(),
                }
            )
        return out
