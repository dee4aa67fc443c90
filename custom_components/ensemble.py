"""The paper's ensemble: several separately trained models, their detections averaged.

Marks of all models are clustered per scan (greedily, highest score first: a mark joins the first cluster whose
centre is closer than the larger of the two radii); a cluster becomes one mark at the score-weighted mean position,
whose probability is the mean over *all* models (a model that did not find it contributes 0), so agreement is
rewarded as in averaging probability maps.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def merge_marks(
    marks_per_model: Sequence[Mapping[str, np.ndarray]],
    diameters_per_model: Sequence[Mapping[str, np.ndarray]] | None = None,
    min_radius_mm: float = 3.0,
) -> dict[str, np.ndarray]:
    """Average several models' detections.

    Args:
        marks_per_model: per model, ``{seriesuid: (N, 4) (x, y, z, probability)}`` in LPS world mm.
        diameters_per_model: per model, ``{seriesuid: (N,)}`` diameters in mm of those marks (``None``: every mark
            counts as ``2 * min_radius_mm``).
        min_radius_mm: the smallest radius used to decide that two marks are the same finding.

    Returns:
        ``{seriesuid: (M, 4) (x, y, z, probability)}``, highest probability first.
    """
    n_models = len(marks_per_model)
    uids = sorted({uid for marks in marks_per_model for uid in marks})
    merged: dict[str, np.ndarray] = {}
    for uid in uids:
        rows, radii = [], []
        for m, marks in enumerate(marks_per_model):
            scan = np.asarray(marks.get(uid, np.zeros((0, 4))), dtype=np.float64).reshape(-1, 4)
            d = (
                np.asarray(diameters_per_model[m].get(uid, np.zeros(len(scan))), dtype=np.float64)
                if diameters_per_model is not None
                else np.zeros(len(scan))
            )
            rows.append(scan)
            radii.append(np.maximum(d / 2, min_radius_mm))
        points, radius = np.concatenate(rows), np.concatenate(radii)
        order = np.argsort(-points[:, 3], kind="stable")
        centres: list[np.ndarray] = []
        members: list[list[int]] = []
        for i in order:
            for c, centre in enumerate(centres):
                if np.linalg.norm(points[i, :3] - centre) < max(radius[i], radius[members[c][0]]):
                    members[c].append(i)
                    break
            else:
                centres.append(points[i, :3])
                members.append([i])
        out = []
        for group in members:
            w = points[group, 3]
            xyz = (points[group, :3] * w[:, None]).sum(0) / max(w.sum(), 1e-12)
            out.append([*xyz, w.sum() / n_models])
        result = np.asarray(out, dtype=np.float64).reshape(-1, 4)
        merged[uid] = result[np.argsort(-result[:, 3], kind="stable")]
    return merged
