"""Whole-scan detection over cached preprocessed scans, for provisional testing and validation.

Detections come out of :class:`custom_components.detector.NoduleDetector` as voxel cubes of the preprocessed 1 mm
volume; :func:`scan_marks` maps them to LUNA16 marks ``(x, y, z, probability)`` in LPS world mm of the original scan.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from monai.engines import SupervisedEvaluator

from custom_components.cache import CachedScan, PreprocessedScans
from custom_components.detector import NoduleDetector
from custom_components.geometry import nodules_voxel_to_world


def detect_scan(
    detector: NoduleDetector, scan: CachedScan, device: torch.device | str, use_inferer: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Run the detector on one whole cached scan.

    Returns:
        ``cubes`` ``(N, 4)`` ``(ci, cj, ck, d)`` voxels of ``scan.image`` and ``scores`` ``(N,)`` noduleness,
        highest first.
    """
    image = torch.from_numpy(np.asarray(scan.image, dtype=np.float32))[None, None].to(device)
    result = detector(image, use_inferer=use_inferer)[0]
    return result[detector.cube_key].cpu().numpy(), result[detector.pred_score_key].cpu().numpy()


def scan_marks(detector: NoduleDetector, scan: CachedScan, device: torch.device | str, use_inferer: bool) -> np.ndarray:
    """LUNA16 marks of one cached scan: ``(N, 4)`` rows ``(x, y, z, probability)``, LPS world mm."""
    cubes, scores = detect_scan(detector, scan, device, use_inferer)
    world = nodules_voxel_to_world(cubes, scan.affine) if len(cubes) else np.zeros((0, 4))
    return np.column_stack([world[:, :3], scores]).astype(np.float64)


class ScanDetection:
    """``iteration_update`` of a MONAI ``SupervisedEvaluator`` whose data loader yields lists of scan indices.

    For each scan it returns the dict :class:`custom_components.metrics.FROCMetric` expects:
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
            out.append(
                {
                    "seriesuid": scan.seriesuid,
                    "marks": scan_marks(self.detector, scan, engine.state.device, self.use_inferer),
                    "nodules": scan.nodules,
                    "excluded": scan.excluded,
                }
            )
        return out
