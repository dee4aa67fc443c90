"""FROC scoring of nodule detections, rule for rule as LUNA16's ``noduleCADEvaluationLUNA16.py``.

Everything is in world LPS millimetres (see ``docs/conventions.md``):

- a *mark* (one detection) is a row ``(x, y, z, probability)``;
- a *nodule* (reference finding) and an *excluded* (irrelevant) finding are rows ``(x, y, z, d)``, ``d`` the
  diameter in mm; an excluded finding with ``d < 0`` (unknown size) counts as 10 mm.

The in-memory API works on per-scan dicts ``{seriesuid: (N, 4) array}`` so a trainer never writes a CSV:
:func:`froc_scores` gives a :class:`FROCResult`; :func:`classify_marks` says, per mark, whether it hits a nodule,
lies in an excluded finding or is a false positive (what provisional testing needs). :func:`score_files` reads
LUNA16's CSV files and scores them. The rules and our choices are written out in ``docs/froc.md``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from enum import IntEnum
from typing import Mapping, Sequence, Union

import numpy as np

from custom_components.errors import InputError

__all__ = [
    "FP_RATES",
    "FP_RATE_LABELS",
    "NEW_RATES",
    "MAX_MARKS",
    "UNKNOWN_EXCLUDED_DIAMETER_MM",
    "MarkClass",
    "HIT",
    "EXCLUDED",
    "FP",
    "ScanMatch",
    "FROCCI",
    "FROCResult",
    "as_rows",
    "limit_marks",
    "classify_marks",
    "match_marks",
    "froc_curve",
    "sensitivities_at",
    "froc_scores",
    "bootstrap_ci",
]

PathLike = Union[str, os.PathLike]

FP_RATES = np.array([0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
"""The 7 operating points of FROC[luna] (the CPM), false positives per scan."""
FP_RATE_LABELS = ("1/8", "1/4", "1/2", "1", "2", "4", "8")
NEW_RATES = np.array([1.0, 2.0, 4.0])
"""The operating points of FROC[new] (the paper's clinically motivated score), false positives per scan."""
MAX_MARKS = 100
"""LUNA16 keeps at most this many marks per scan (the most probable ones)."""
UNKNOWN_EXCLUDED_DIAMETER_MM = 10.0
"""Diameter given to an excluded finding whose size is unknown (``diameter_mm < 0`` in annotations_excluded.csv)."""

_NEW_INDEX = np.searchsorted(FP_RATES, NEW_RATES)
_BAND_GRID = 2.0 ** np.linspace(-3.0, 3.0, 601)  # log-spaced like the plot's x axis; holds the 7 rates exactly


class MarkClass(IntEnum):
    """What a mark is to the scoring (:func:`classify_marks`)."""

    FP = 0  #: hits no nodule and lies in no excluded finding: a false positive
    HIT = 1  #: inside at least one nodule (this wins over lying in an excluded finding too)
    EXCLUDED = 2  #: inside an excluded finding only: dropped, neither a hit nor a false positive


FP, HIT, EXCLUDED = MarkClass.FP, MarkClass.HIT, MarkClass.EXCLUDED


# --------------------------------------------------------------------------------------------------------- matching


def as_rows(array: object, what: str) -> np.ndarray:
    """``array`` (array-like, ``None``) as a float64 ``(N, 4)`` array of marks or findings; ``None`` or an empty
    array gives ``(0, 4)``. Raises :class:`InputError` naming ``what`` for another shape or a non-finite value."""
    if array is None:
        return np.zeros((0, 4))
    out = np.asarray(array, dtype=np.float64)
    if out.size == 0:
        return np.zeros((0, 4))
    if out.ndim != 2 or out.shape[1] != 4:
        raise InputError(f"{what}: expected an (N, 4) array, got shape {tuple(out.shape)}")
    if not np.isfinite(out).all():
        raise InputError(f"{what}: holds NaN or infinite values")
    return out


def _inside(points: np.ndarray, spheres: np.ndarray, unknown_diameter: float | None = None) -> np.ndarray:
    """``(N, M)`` bool: point ``i`` strictly inside sphere ``j``, i.e. squared distance < (d / 2)^2 (LUNA16's test).

    ``points`` is ``(N, >=3)`` world mm, ``spheres`` ``(M, 4)`` ``(x, y, z, d)``; with ``unknown_diameter`` a
    negative ``d`` is replaced by it.
    """
    diameter = spheres[:, 3]
    if unknown_diameter is not None:
        diameter = np.where(diameter < 0.0, unknown_diameter, diameter)
    # the same float64 arithmetic, in the same order, as the script's (x-x2)^2 + (y-y2)^2 + (z-z2)^2 < (d/2)^2
    diff = spheres[None, :, :3] - points[:, None, :3]
    dist2 = diff[..., 0] ** 2 + diff[..., 1] ** 2 + diff[..., 2] ** 2
    return dist2 < (diameter / 2.0) ** 2


def limit_marks(marks: np.ndarray, max_marks: int | None = MAX_MARKS) -> np.ndarray:
    """LUNA16's cap: when a scan has more than ``max_marks`` marks, keep only those whose probability is strictly
    above the ``(max_marks + 1)``-th highest (so ties at the cut all go and fewer may remain).

    ``marks`` is ``(N, 4)`` ``(x, y, z, probability)``; the kept rows keep their order. ``None`` or ``<= 0``: no cap.
    """
    if max_marks is None or max_marks <= 0 or len(marks) <= max_marks:
        return marks
    probs = marks[:, 3]
    cut = -np.partition(-probs, max_marks)[max_marks]
    return marks[probs > cut]


def classify_marks(marks: np.ndarray, nodules: np.ndarray | None, excluded: np.ndarray | None = None) -> np.ndarray:
    """Classify each mark of one scan as :data:`HIT`, :data:`EXCLUDED` or :data:`FP` (no cap applied).

    Args:
        marks: ``(N, >=3)`` mark centres ``(x, y, z, ...)``, world LPS mm (a probability column is ignored).
        nodules: ``(M, 4)`` ``(x, y, z, d)`` world mm, or ``None``.
        excluded: ``(K, 4)`` irrelevant findings ``(x, y, z, d)``, ``d < 0`` meaning 10 mm, or ``None``.

    Returns:
        ``(N,)`` int8 array of :class:`MarkClass` values. A mark inside a nodule is a HIT even when it also lies in
        an excluded finding (LUNA16 matches nodules first).
    """
    points = np.asarray(marks, dtype=np.float64)
    out = np.full(len(points), int(FP), dtype=np.int8)
    if len(points) == 0:
        return out
    if points.ndim != 2 or points.shape[1] < 3:
        raise InputError(f"marks: expected an (N, 3) or (N, 4) array, got shape {tuple(points.shape)}")
    nodules, excluded = as_rows(nodules, "nodules"), as_rows(excluded, "excluded")
    hit = _inside(points, nodules).any(axis=1)
    dropped = _inside(points, excluded, UNKNOWN_EXCLUDED_DIAMETER_MM).any(axis=1) & ~hit
    out[hit] = HIT
    out[dropped] = EXCLUDED
    return out


@dataclass(frozen=True)
class ScanMatch:
    """The outcome of matching one scan's marks (after the cap) against its reference.

    Attributes:
        nodule_probs: ``(M,)`` per nodule, the highest probability among the marks inside it; NaN when missed.
        fp_probs: ``(F,)`` probabilities of the false positives.
        hit_marks: marks inside at least one nodule (only the best per nodule scores; the rest are dropped).
        excluded_marks: marks inside an excluded finding and no nodule (dropped).
    """

    nodule_probs: np.ndarray
    fp_probs: np.ndarray
    hit_marks: int
    excluded_marks: int


def match_marks(marks: np.ndarray, nodules: np.ndarray | None, excluded: np.ndarray | None = None) -> ScanMatch:
    """Match one scan's marks ``(N, 4)`` ``(x, y, z, probability)`` to its nodules and excluded findings
    (``(M, 4)``/``(K, 4)`` ``(x, y, z, d)``, world mm), as LUNA16 does, with no cap (see :func:`limit_marks`).

    A mark inside two nodules counts for both (LUNA16 only prints "This is strange: CAD mark ... detected two
    nodules"); each nodule scores the highest probability among the marks inside it.
    """
    marks, nodules = as_rows(marks, "marks"), as_rows(nodules, "nodules")
    inside = _inside(marks, nodules)
    probs = marks[:, 3]
    hit = inside.any(axis=1)
    detected = inside.any(axis=0)
    best = np.where(inside, probs[:, None], -np.inf).max(axis=0, initial=-np.inf)
    dropped = ~hit & _inside(marks, as_rows(excluded, "excluded"), UNKNOWN_EXCLUDED_DIAMETER_MM).any(axis=1)
    return ScanMatch(
        nodule_probs=np.where(detected, best, np.nan),
        fp_probs=probs[~hit & ~dropped],
        hit_marks=int(hit.sum()),
        excluded_marks=int(dropped.sum()),
    )


# ------------------------------------------------------------------------------------------------------------ curve


def froc_curve(
    hit_probs: np.ndarray, fp_probs: np.ndarray, n_nodules: int, n_scans: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The FROC curve, LUNA16's ``computeFROC``: a ROC curve over the hits (label 1) and false positives (label 0)
    with a point at every distinct probability (sklearn's ``roc_curve``), rescaled to FP/scan and sensitivity.

    Args:
        hit_probs: ``(H,)`` one probability per detected nodule.
        fp_probs: ``(F,)`` one per false-positive mark.
        n_nodules: all reference nodules, missed ones included (the sensitivity's denominator).
        n_scans: scans evaluated (the FP rate's denominator).

    Returns:
        ``(fps, sens, thresholds)``, each ``(T + 1,)``: point ``t`` counts the marks with probability
        ``>= thresholds[t]``; the first point is ``(0, 0)`` at threshold ``inf``. ``fps`` and ``sens`` never
        decrease. ``sens`` is NaN when there is no nodule.
    """
    probs = np.concatenate([np.asarray(hit_probs, np.float64), np.asarray(fp_probs, np.float64)])
    labels = np.r_[np.ones(len(hit_probs)), np.zeros(len(fp_probs))]
    order = np.argsort(-probs, kind="stable")
    probs, labels = probs[order], labels[order]
    ends = np.r_[np.flatnonzero(np.diff(probs)), len(probs) - 1] if len(probs) else np.zeros(0, dtype=int)
    tps = np.cumsum(labels)[ends]
    fps = np.r_[0.0, ends + 1 - tps] / n_scans
    sens = np.r_[0.0, tps] / n_nodules if n_nodules > 0 else np.full(len(ends) + 1, np.nan)
    return fps, sens, np.r_[np.inf, probs[ends]]


def sensitivities_at(fps: np.ndarray, sens: np.ndarray, rates: np.ndarray = FP_RATES) -> np.ndarray:
    """Sensitivity at each FP/scan rate by linear interpolation on the curve (``np.interp``: held at the last
    value beyond its end; at a vertical step, the top of the step), as LUNA16."""
    return np.interp(rates, fps, sens)


# ----------------------------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class FROCCI:
    """Bootstrap confidence intervals (scans resampled with replacement, LUNA16's ``computeFROC_bootstrap``).

    Attributes:
        resamples, seed, confidence: how they were drawn (``confidence`` 0.95: the 2.5th and 97.5th percentiles,
            taken as LUNA16 does: the sorted values at ``floor(0.025 n)`` and ``floor(0.975 n)``).
        sensitivities_lower, sensitivities_upper: ``(7,)`` at :data:`FP_RATES`.
        cpm_lower, cpm_upper, froc_new_lower, froc_new_upper: bounds of FROC[luna] (CPM) and FROC[new].
        band_fps: ``(G,)`` FP/scan grid from 1/8 to 8 (log-spaced); ``band_mean``/``band_lower``/``band_upper``:
            ``(G,)`` mean and bounds of the resampled curves there.
    """

    resamples: int
    seed: int
    confidence: float
    sensitivities_lower: np.ndarray
    sensitivities_upper: np.ndarray
    cpm_lower: float
    cpm_upper: float
    froc_new_lower: float
    froc_new_upper: float
    band_fps: np.ndarray
    band_mean: np.ndarray
    band_lower: np.ndarray
    band_upper: np.ndarray


@dataclass(frozen=True)
class FROCResult:
    """A LUNA16 FROC evaluation.

    Attributes:
        fp_rates: ``(7,)`` :data:`FP_RATES`, FP/scan.
        sensitivities: ``(7,)`` sensitivity at each rate.
        cpm: FROC[luna], the mean of the 7 sensitivities (LUNA16's CPM).
        froc_new: FROC[new], the mean at 1, 2 and 4 FP/scan.
        scans, nodules: scans evaluated, reference nodules in them.
        hits, missed: nodules hit by at least one mark, nodules hit by none.
        false_positives: marks that hit no nodule and lie in no excluded finding.
        hit_marks: marks inside a nodule (one per nodule scores, the others are dropped).
        excluded_marks: marks dropped because they lie in an excluded finding only.
        capped_marks: marks dropped by the per-scan cap of 100.
        ignored_marks: marks of scans not in the evaluated list (ignored).
        curve_fps, curve_sensitivity, curve_thresholds: ``(T + 1,)`` the curve (see :func:`froc_curve`).
        ci: bootstrap confidence intervals, or ``None``.
    """

    fp_rates: np.ndarray
    sensitivities: np.ndarray
    cpm: float
    froc_new: float
    scans: int
    nodules: int
    hits: int
    missed: int
    false_positives: int
    hit_marks: int
    excluded_marks: int
    capped_marks: int
    ignored_marks: int
    curve_fps: np.ndarray
    curve_sensitivity: np.ndarray
    curve_thresholds: np.ndarray
    ci: FROCCI | None = None

    def scores(self) -> dict[str, float]:
        """``{"cpm", "froc_new", "sens_0.125", ..., "sens_8"}`` as plain floats (the metric's output)."""
        out = {"cpm": self.cpm, "froc_new": self.froc_new}
        out.update({f"sens_{rate:g}": float(s) for rate, s in zip(self.fp_rates, self.sensitivities)})
        return out


def _summary(sens: np.ndarray) -> tuple[float, float]:
    """(CPM, FROC[new]) from the ``(..., 7)`` sensitivities at :data:`FP_RATES`."""
    return sens.mean(axis=-1), sens[..., _NEW_INDEX].mean(axis=-1)


def froc_scores(
    marks: Mapping[str, np.ndarray],
    nodules: Mapping[str, np.ndarray],
    excluded: Mapping[str, np.ndarray] | None = None,
    seriesuids: Sequence[str] | None = None,
    *,
    max_marks: int | None = MAX_MARKS,
    bootstrap: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
) -> FROCResult:
    """Score detections as LUNA16 does.

    Args:
        marks: ``{seriesuid: (N, 4) (x, y, z, probability)}``, world LPS mm (array-likes; CPU tensors work).
        nodules: ``{seriesuid: (M, 4) (x, y, z, d)}`` reference nodules, world mm, ``d`` in mm.
        excluded: ``{seriesuid: (K, 4) (x, y, z, d)}`` irrelevant findings (``d < 0``: 10 mm), or ``None``.
        seriesuids: the scans evaluated (FP/scan is per these); a scan without nodules or marks still counts.
            ``None``: every seriesuid of ``marks`` and ``nodules``, sorted. Marks of scans not listed are ignored
            with one warning; nodules and excluded findings of scans not listed are ignored silently.
        max_marks: LUNA16's cap per scan (:func:`limit_marks`); ``None`` for none.
        bootstrap: number of bootstrap resamples of the scans for confidence intervals (LUNA16: 1000); 0 for none.
        seed: seed of the resampling.
        confidence: two-sided confidence level of the intervals.

    Returns:
        A :class:`FROCResult`. With no nodule at all the sensitivities (and CPM, FROC[new]) are NaN.
    """
    if seriesuids is None:
        uids = sorted(set(marks) | set(nodules))
    else:
        uids = list(seriesuids)
        seen: set[str] = set()
        for uid in uids:
            if uid in seen:
                raise InputError(f"seriesuids: {uid} is listed twice")
            seen.add(uid)
    if not uids:
        raise InputError("no scan to evaluate (empty list of seriesuids)")
    excluded = {} if excluded is None else excluded
    listed = set(uids)
    unknown = {uid: len(as_rows(m, f"marks of {uid}")) for uid, m in marks.items() if uid not in listed}
    unknown = {uid: n for uid, n in unknown.items() if n}
    if unknown:
        first = ", ".join(list(unknown)[:3]) + (", ..." if len(unknown) > 3 else "")
        warnings.warn(
            f"{sum(unknown.values())} marks of {len(unknown)} seriesuid(s) not in the evaluated list are ignored: "
            f"{first}",
            UserWarning,
            stacklevel=2,
        )

    matches: list[ScanMatch] = []
    capped = 0
    for uid in uids:
        scan_marks = as_rows(marks.get(uid), f"marks of {uid}")
        kept = limit_marks(scan_marks, max_marks)
        capped += len(scan_marks) - len(kept)
        scan_nodules = as_rows(nodules.get(uid), f"nodules of {uid}")
        matches.append(match_marks(kept, scan_nodules, as_rows(excluded.get(uid), f"excluded of {uid}")))

    all_nodule_probs = np.concatenate([m.nodule_probs for m in matches])
    hit_probs = all_nodule_probs[~np.isnan(all_nodule_probs)]
    fp_probs = np.concatenate([m.fp_probs for m in matches])
    fps, sens, thresholds = froc_curve(hit_probs, fp_probs, len(all_nodule_probs), len(uids))
    at_rates = sensitivities_at(fps, sens)
    cpm, froc_new = _summary(at_rates)
    return FROCResult(
        fp_rates=FP_RATES.copy(),
        sensitivities=at_rates,
        cpm=float(cpm),
        froc_new=float(froc_new),
        scans=len(uids),
        nodules=len(all_nodule_probs),
        hits=len(hit_probs),
        missed=len(all_nodule_probs) - len(hit_probs),
        false_positives=len(fp_probs),
        hit_marks=sum(m.hit_marks for m in matches),
        excluded_marks=sum(m.excluded_marks for m in matches),
        capped_marks=capped,
        ignored_marks=sum(unknown.values()),
        curve_fps=fps,
        curve_sensitivity=sens,
        curve_thresholds=thresholds,
        ci=bootstrap_ci(matches, resamples=bootstrap, seed=seed, confidence=confidence) if bootstrap > 0 else None,
    )


# -------------------------------------------------------------------------------------------------------- bootstrap


def _percentile_bounds(values: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """LUNA16's ``compute_mean_ci`` bounds along axis 0: sorted values at ``floor(p n)`` and ``floor((1 - p) n)``,
    ``p = (1 - confidence) / 2``."""
    ordered = np.sort(values, axis=0)
    n = len(ordered)
    tail = (1.0 - confidence) / 2.0
    low, high = int(np.floor(tail * n)), min(int(np.floor((1.0 - tail) * n)), n - 1)
    return ordered[low], ordered[high]


def bootstrap_ci(
    matches: Sequence[ScanMatch], resamples: int = 1000, seed: int = 0, confidence: float = 0.95, chunk: int = 32
) -> FROCCI:
    """Bootstrap the scans: draw ``len(matches)`` scans with replacement ``resamples`` times, recompute the curve
    over the drawn scans' hits, false positives and nodules (FP/scan still over the number of scans), and take the
    percentile bounds of the sensitivities at :data:`FP_RATES`, of CPM / FROC[new], and of a band on a grid.

    Equivalent to concatenating the drawn scans' entries as LUNA16 does, computed as weighted cumulative counts
    (weight = times a scan is drawn) over one global ordering by probability, ``chunk`` resamples at a time, and only
    over the most probable entries needed to pass 8 FP/scan (later curve points do not change the interpolation at
    <= 8 FP/scan). Resamples that draw no nodule have no sensitivity and are left out of the statistics.
    """
    n_scans = len(matches)
    scan_nodules = np.array([len(m.nodule_probs) for m in matches], dtype=np.float64)
    hit_probs = [m.nodule_probs[~np.isnan(m.nodule_probs)] for m in matches]
    probs = np.concatenate([np.concatenate([h, m.fp_probs]) for h, m in zip(hit_probs, matches)])
    labels = np.concatenate([np.r_[np.ones(len(h)), np.zeros(len(m.fp_probs))] for h, m in zip(hit_probs, matches)])
    owner = np.repeat(np.arange(n_scans), [len(h) + len(m.fp_probs) for h, m in zip(hit_probs, matches)])
    order = np.argsort(-probs, kind="stable")
    probs, labels, owner = probs[order], labels[order], owner[order]
    ends = np.r_[np.flatnonzero(np.diff(probs)), len(probs) - 1] if len(probs) else np.zeros(0, dtype=int)
    grid = np.r_[FP_RATES, _BAND_GRID]
    max_fp = FP_RATES[-1] * n_scans
    # first try: twice the entries the unresampled curve needs to pass 8 FP/scan, doubled until every resample passes
    first_prefix = int(np.searchsorted(np.cumsum(1.0 - labels), 2 * max_fp, side="right")) + 1

    draws = np.random.default_rng(seed).integers(n_scans, size=(resamples, n_scans))
    curves = np.empty((resamples, len(grid)))
    totals = np.empty(resamples)
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        offsets = np.arange(rows)[:, None] * n_scans
        counts = np.bincount((draws[start : start + rows] + offsets).ravel(), minlength=rows * n_scans)
        counts = counts.reshape(rows, n_scans).astype(np.float64)
        totals[start : start + rows] = counts @ scan_nodules
        prefix = min(first_prefix, len(probs))
        while True:
            # entries x resamples, so the cumulative sums run down contiguous columns
            weights = counts.T[owner[:prefix]]
            complete = ends[ends < prefix]  # groups of tied probabilities wholly inside the prefix
            tps = np.cumsum(weights * labels[:prefix, None], axis=0)[complete]
            fpc = np.cumsum(weights, axis=0)[complete] - tps
            if prefix == len(probs) or (len(complete) and (fpc[-1] > max_fp).all()):
                break
            prefix = min(2 * prefix, len(probs))
        fps = np.zeros((rows, len(complete) + 1))
        fps[:, 1:] = fpc.T / n_scans
        sens = np.zeros_like(fps)
        sens[:, 1:] = tps.T / np.maximum(totals[start : start + rows], 1.0)[:, None]
        for row in range(rows):
            curves[start + row] = np.interp(grid, fps[row], sens[row])

    curves = curves[totals > 0]
    if len(curves) == 0:
        nan7, nang = np.full(len(FP_RATES), np.nan), np.full(len(_BAND_GRID), np.nan)
        return FROCCI(resamples, seed, confidence, nan7, nan7, *(np.nan,) * 4, _BAND_GRID.copy(), nang, nang, nang)
    at_rates, band = curves[:, : len(FP_RATES)], curves[:, len(FP_RATES) :]
    cpm, froc_new = _summary(at_rates)
    sens_low, sens_high = _percentile_bounds(at_rates, confidence)
    cpm_low, cpm_high = _percentile_bounds(cpm, confidence)
    new_low, new_high = _percentile_bounds(froc_new, confidence)
    band_low, band_high = _percentile_bounds(band, confidence)
    return FROCCI(
        resamples=resamples,
        seed=seed,
        confidence=confidence,
        sensitivities_lower=sens_low,
        sensitivities_upper=sens_high,
        cpm_lower=float(cpm_low),
        cpm_upper=float(cpm_high),
        froc_new_lower=float(new_low),
        froc_new_upper=float(new_high),
        band_fps=_BAND_GRID.copy(),
        band_mean=band.mean(axis=0),
        band_lower=band_low,
        band_upper=band_high,
    )
