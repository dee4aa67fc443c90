"""FROC scoring (custom_components.froc, froc_report, bundle froc / bench-froc) against hand-worked numbers, a
line-by-line port of LUNA16's noduleCADEvaluationLUNA16.py, and LUNA16's real annotation files when present."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from bundle.__main__ import main
from custom_components.errors import InputError
from custom_components.froc import (
    EXCLUDED,
    FP,
    FP_RATES,
    HIT,
    classify_marks,
    froc_scores,
    limit_marks,
)
from custom_components.froc_report import format_table, write_report
from custom_components.luna16_tables import (
    combine_submissions,
    read_annotations,
    read_seriesuids,
    read_submission,
    score_files,
)

REPO = Path(__file__).resolve().parents[1]
LIDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc"
needs_luna16 = pytest.mark.skipif(
    not (LIDC / "annotations.csv").is_file() or not (LIDC / "annotations_excluded.csv").is_file(),
    reason="LUNA16 annotation files not present",
)


def scores(marks, nodules, excluded=None, uids=None, **kwargs):
    return froc_scores(
        {k: np.asarray(v, float) for k, v in marks.items()},
        {k: np.asarray(v, float) for k, v in nodules.items()},
        None if excluded is None else {k: np.asarray(v, float) for k, v in excluded.items()},
        uids,
        **kwargs,
    )


# ------------------------------------------------------------------------------------------- hand-worked cases


def test_double_hit_counts_once_at_max_prob_and_is_not_a_fp():
    # scan A: nodule N1 (0,0,0) d=10 hit by marks at 0.9 and 0.6; N2 missed; one FP at 0.3. Scan B: nothing.
    # Scored: N1 at 0.9 (the 0.6 mark dropped), FP 0.3. 2 scans, 2 nodules.
    # Curve: (0,0)@inf, (0, 1/2)@0.9, (1/2, 1/2)@0.3. Had 0.6 been an FP there would be a point (1/2, 1/2)@0.6.
    r = scores(
        {"A": [[1, 0, 0, 0.9], [0, 2, 0, 0.6], [50, 0, 0, 0.3]]},
        {"A": [[0, 0, 0, 10], [100, 100, 100, 6]]},
        uids=["A", "B"],
    )
    np.testing.assert_array_equal(r.curve_fps, [0, 0, 0.5])
    np.testing.assert_array_equal(r.curve_sensitivity, [0, 0.5, 0.5])
    np.testing.assert_array_equal(r.curve_thresholds, [np.inf, 0.9, 0.3])
    np.testing.assert_array_equal(r.sensitivities, [0.5] * 7)
    assert (r.hits, r.missed, r.false_positives, r.hit_marks, r.scans) == (1, 1, 1, 2, 2)
    np.testing.assert_array_equal(classify_marks(np.array([[1, 0, 0], [0, 2, 0], [50, 0, 0]]), [[0, 0, 0, 10]]),
                                  [HIT, HIT, FP])


def test_mark_in_two_nodules_hits_both():
    # LUNA16 loops over nodules and matches every mark inside each: one mark inside two overlapping nodules
    # detects both (the script only prints "This is strange: CAD mark ... detected two nodules").
    r = scores({"A": [[0, 0, 0, 0.8]]}, {"A": [[1, 0, 0, 10], [-1, 0, 0, 10]]})
    assert (r.hits, r.false_positives) == (2, 0)
    np.testing.assert_array_equal(r.sensitivities, [1.0] * 7)


def test_marks_on_excluded_findings_are_dropped_but_a_nodule_hit_wins():
    # nodule (0,0,0) d=10; excluded E1 (2,0,0) d=20 overlaps it, E2 (50,50,50) d=8.
    #   (1,0,0) 0.7: inside the nodule (1 < 25) and E1 -> HIT (nodules are matched first)
    #   (8,0,0) 0.8: outside the nodule (64 >= 25), inside E1 (36 < 100) -> dropped
    #   (50,50,52) 0.95: inside E2 (4 < 16) -> dropped
    #   (-40,0,0) 0.5: FP
    # Curve (1 scan): (0,0)@inf, (0,1)@0.7, (1,1)@0.5 -> sensitivity 1 everywhere. Were the dropped marks FPs,
    # the curve would be (1,0)@0.95, (2,0)@0.8, (2,1)@0.7 and the sensitivity at 1/8..1 would be 0.
    marks = [[1, 0, 0, 0.7], [8, 0, 0, 0.8], [50, 50, 52, 0.95], [-40, 0, 0, 0.5]]
    excluded = [[2, 0, 0, 20], [50, 50, 50, 8]]
    r = scores({"A": marks}, {"A": [[0, 0, 0, 10]]}, {"A": excluded})
    np.testing.assert_array_equal(r.sensitivities, [1.0] * 7)
    assert (r.hits, r.false_positives, r.excluded_marks) == (1, 1, 2)
    np.testing.assert_array_equal(classify_marks(np.array(marks), [[0, 0, 0, 10]], excluded),
                                  [HIT, EXCLUDED, EXCLUDED, FP])


def test_excluded_unknown_diameter_counts_as_10mm():
    # excluded (0,0,0) d=-1 -> radius 5: (2,0,0) 4 < 25 and (4.9,0,0) 24.01 < 25 are inside (dropped);
    # (5,0,0) is on the surface (25 < 25 is false) -> FP. With d read as 1 mm, (2,0,0) would be an FP.
    marks = np.array([[2, 0, 0, 0.9], [4.9, 0, 0, 0.8], [5, 0, 0, 0.7]])
    np.testing.assert_array_equal(classify_marks(marks, None, [[0, 0, 0, -1]]), [EXCLUDED, EXCLUDED, FP])
    r = scores({"A": marks}, {}, {"A": [[0, 0, 0, -1]]}, uids=["A"])
    assert (r.excluded_marks, r.false_positives) == (2, 1)


def test_mark_on_the_sphere_surface_is_not_a_hit():
    # nodule (0,0,0) d=10: (3,4,0) is at distance 5 == radius (25 < 25 false) -> FP at 0.9; (0,0,4.999) hits at 0.4.
    # Curve (1 scan, 1 nodule): (0,0)@inf, (1,0)@0.9, (1,1)@0.4.
    # np.interp: 1/8, 1/4, 1/2 on the flat (0,0)-(1,0) -> 0; 1 is the top of the vertical step -> 1; 2, 4, 8 -> 1.
    # CPM = 4/7, FROC[new] = 1.
    r = scores({"A": [[3, 4, 0, 0.9], [0, 0, 4.999, 0.4]]}, {"A": [[0, 0, 0, 10]]})
    np.testing.assert_array_equal(r.sensitivities, [0, 0, 0, 1, 1, 1, 1])
    assert r.cpm == pytest.approx(4 / 7) and r.froc_new == 1.0
    assert (r.hits, r.false_positives) == (1, 1)


def test_cap_keeps_only_marks_strictly_above_the_101st_probability():
    # One scan, 150 marks: 90 far FPs at distinct probabilities 0.50..0.945, 20 tied at 0.3 (one of them on the
    # nodule), 40 far at 0.1. Sorted descending, the 101st-highest (index 100) lies in the 0.3 block (indices
    # 90..109), so only the 90 marks > 0.3 stay: 60 capped, the nodule's only mark is gone -> missed.
    far = np.c_[np.full(150, 200.0), np.arange(150.0) * 20, np.zeros(150)]
    probs = np.r_[0.5 + 0.005 * np.arange(90), np.full(20, 0.3), np.full(40, 0.1)]
    marks = np.c_[far, probs]
    marks[90, :3] = 0.0  # a 0.3 mark on the nodule
    kept = limit_marks(marks)
    assert len(kept) == 90 and (kept[:, 3] > 0.3).all()
    r = scores({"A": marks}, {"A": [[0, 0, 0, 10]]})
    assert (r.capped_marks, r.false_positives, r.hits, r.missed) == (60, 90, 0, 1)
    np.testing.assert_array_equal(r.sensitivities, [0.0] * 7)
    # 101 distinct probabilities: exactly the top 100 stay; 100 marks: untouched
    distinct = np.c_[np.zeros((101, 3)), np.arange(101.0)]
    np.testing.assert_array_equal(limit_marks(distinct)[:, 3], np.arange(1.0, 101.0))
    assert len(limit_marks(distinct[:100])) == 100


def test_scan_without_nodules_counts_in_the_fp_rate():
    # A: nodule hit at 0.9. B: no nodules, FPs at 0.8 and 0.4. C: nothing. 3 scans.
    # Curve: (0,0)@inf, (0,1)@0.9, (1/3,1)@0.8, (2/3,1)@0.4 -> sensitivity 1 at every rate.
    r = scores(
        {"A": [[0, 0, 0, 0.9]], "B": [[0, 0, 0, 0.8], [9, 9, 9, 0.4]]},
        {"A": [[0, 0, 0, 6]]},
        uids=["A", "B", "C"],
    )
    np.testing.assert_allclose(r.curve_fps, [0, 0, 1 / 3, 2 / 3])
    np.testing.assert_array_equal(r.sensitivities, [1.0] * 7)
    assert (r.scans, r.false_positives) == (3, 2)


def test_no_false_positives_gives_the_hit_fraction_everywhere():
    # 4 nodules in 2 scans, 3 hit (0.9, 0.5, 0.2), no FP: every curve point has 0 FP/scan, sensitivities
    # 0, 1/4, 2/4, 3/4; np.interp holds the last value (3/4) at every rate. CPM = FROC[new] = 0.75.
    r = scores(
        {"A": [[0, 0, 0, 0.9], [20, 0, 0, 0.5]], "B": [[0, 0, 0, 0.2]]},
        {"A": [[0, 0, 0, 8], [20, 0, 0, 8]], "B": [[0, 0, 0, 8], [50, 0, 0, 8]]},
    )
    np.testing.assert_array_equal(r.curve_fps, [0, 0, 0, 0])
    np.testing.assert_array_equal(r.sensitivities, [0.75] * 7)
    assert r.cpm == 0.75 and r.froc_new == 0.75 and r.false_positives == 0


def test_empty_submission_scores_zero():
    r = scores({}, {"A": [[0, 0, 0, 8]], "B": [[0, 0, 0, 8], [50, 0, 0, 8]]})
    np.testing.assert_array_equal(r.sensitivities, [0.0] * 7)
    assert (r.cpm, r.froc_new, r.hits, r.missed, r.nodules, r.scans) == (0.0, 0.0, 0, 3, 3, 2)


def test_interpolation_on_a_tied_threshold():
    # 2 scans, 4 nodules. A: N1 hit at 0.9, an FP at 0.5. B: N2 hit at 0.5 (tied with the FP), N3, N4 missed.
    # Curve: (0,0)@inf, (0, 1/4)@0.9, (1/2, 2/4)@0.5 (one FP in 2 scans, 2 hits of 4 nodules).
    # At 1/8: 0.25 + (0.5 - 0.25) * (0.125 / 0.5) = 0.3125; at 1/4: 0.25 + 0.25 * 0.5 = 0.375; from 1/2 on: 0.5.
    # CPM = (0.3125 + 0.375 + 5 * 0.5) / 7 = 3.1875 / 7 = 0.455357...; FROC[new] = 0.5.
    r = scores(
        {"A": [[0, 0, 0, 0.9], [80, 0, 0, 0.5]], "B": [[0, 0, 0, 0.5]]},
        {"A": [[0, 0, 0, 10]], "B": [[0, 0, 0, 10], [30, 0, 0, 10], [60, 0, 0, 10]]},
    )
    np.testing.assert_allclose(r.sensitivities, [0.3125, 0.375, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert r.cpm == pytest.approx(3.1875 / 7) and r.froc_new == pytest.approx(0.5)


def test_no_nodule_gives_nan_sensitivity():
    r = scores({"A": [[0, 0, 0, 0.5]]}, {}, uids=["A"])
    assert np.isnan(r.sensitivities).all() and np.isnan(r.cpm)


# ------------------------------------------------------------------------- LUNA16's script, ported line by line


def _luna16_roc_curve(labels, probs):
    """sklearn.metrics.roc_curve(labels, probs) with its default drop_intermediate=True."""
    order = np.argsort(probs, kind="mergesort")[::-1]
    probs, labels = probs[order], labels[order]
    idx = np.r_[np.where(np.diff(probs))[0], labels.size - 1]
    tps = np.cumsum(labels)[idx]
    fps = 1 + idx - tps
    if len(fps) > 2:
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps = fps[keep], tps[keep]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    with np.errstate(invalid="ignore", divide="ignore"):
        return fps / fps[-1], tps / tps[-1]


def _luna16(uids, marks, nodules, excluded, max_marks=100):
    """evaluateCAD + computeFROC of noduleCADEvaluationLUNA16.py, loops and all; returns the 7 sensitivities."""
    gt, prob, drop = [], [], []
    for uid in uids:
        cands = dict(enumerate(marks.get(uid, [])))
        if len(cands) > max_marks:
            probs = sorted((float(c[3]) for c in cands.values()), reverse=True)
            threshold = probs[max_marks]
            kept = {}
            for key, c in cands.items():
                if len(kept) >= max_marks:
                    break
                if float(c[3]) > threshold:
                    kept[key] = c
            cands = kept
        remaining = dict(cands)
        annots = [(n, "Included") for n in nodules.get(uid, [])] + [(e, "Excluded") for e in excluded.get(uid, [])]
        for annot, state in annots:
            x, y, z, d = (float(v) for v in annot)
            if d < 0.0:
                d = 10.0
            radius2 = (d / 2.0) ** 2
            matches = []
            for key, c in cands.items():
                dist = (x - float(c[0])) ** 2 + (y - float(c[1])) ** 2 + (z - float(c[2])) ** 2
                if dist < radius2:
                    if state == "Included":
                        matches.append(c)
                        remaining.pop(key, None)
                    elif key in remaining:
                        del remaining[key]
            if state == "Included":
                if matches:
                    gt.append(1.0), prob.append(max(float(c[3]) for c in matches)), drop.append(False)
                else:
                    gt.append(1.0), prob.append(-1e9), drop.append(True)
        for c in remaining.values():
            gt.append(0.0), prob.append(float(c[3])), drop.append(False)
    gt, prob, drop = np.array(gt), np.array(prob), np.array(drop)
    local_gt, local_prob = gt[~drop], prob[~drop]
    fpr, tpr = _luna16_roc_curve(local_gt, local_prob)
    if gt.sum() == len(gt):
        fps = np.zeros(len(fpr))
    else:
        fps = fpr * (len(local_prob) - local_gt.sum()) / len(uids)
    sens = tpr * local_gt.sum() / gt.sum()
    return np.interp(FP_RATES, fps, sens)


@pytest.mark.parametrize("seed", range(25))
def test_matches_a_port_of_the_luna16_script(seed):
    # small random worlds: marks near nodules and random ones, overlapping nodules, excluded findings (some with
    # d=-1), coarse probabilities (ties), scans with no FP and scans over the 100-mark cap
    rng = np.random.default_rng(seed)
    uids = [f"s{i}" for i in range(rng.integers(2, 7))]
    marks, nodules, excluded = {}, {}, {}
    for uid in uids[1:]:
        n = rng.integers(0, 5)
        nodules[uid] = np.c_[rng.uniform(0, 40, (n, 3)), rng.uniform(3, 20, n)]
        k = rng.integers(0, 4)
        excluded[uid] = np.c_[rng.uniform(0, 40, (k, 3)), np.where(rng.random(k) < 0.5, -1.0, rng.uniform(3, 15, k))]
        near = np.repeat(nodules[uid], rng.integers(0, 3, n), axis=0)
        jitter = rng.uniform(-0.4, 0.4, (len(near), 3)) * near[:, 3:]
        near = np.c_[near[:, :3] + jitter, rng.integers(6, 20, len(near)) / 20]
        m = rng.choice([0, 3, 30, 120])
        marks[uid] = np.r_[near, np.c_[rng.uniform(0, 40, (m, 3)), rng.integers(0, 20, m) / 20]]
    if sum(len(v) for v in nodules.values()) == 0:
        nodules[uids[-1]] = np.array([[20.0, 20.0, 20.0, 30.0]])
    r = froc_scores(marks, nodules, excluded, uids)
    expected = _luna16(uids, marks, nodules, excluded)
    if np.isnan(expected).any():  # the script gives NaN when nothing is hit; we give 0
        assert r.hits == 0 and (r.sensitivities == 0).all()
    else:
        np.testing.assert_allclose(r.sensitivities, expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------------ bootstrap


def _random_world(seed=0, n_scans=60, fp_per_scan=4):
    rng = np.random.default_rng(seed)
    uids = [f"scan{i}" for i in range(n_scans)]
    nodules = {u: np.c_[rng.uniform(-100, 100, (k, 3)), rng.uniform(4, 20, k)] for u, k in
               zip(uids, rng.integers(0, 4, n_scans))}
    marks = {}
    for u in uids:
        found = nodules[u][rng.random(len(nodules[u])) < 0.85]
        fp = rng.poisson(fp_per_scan)
        marks[u] = np.r_[np.c_[found[:, :3], rng.beta(4, 1.5, len(found))],
                         np.c_[rng.uniform(-150, 150, (fp, 3)), rng.beta(1, 3, fp)]]
    return uids, marks, nodules


def test_bootstrap_brackets_the_estimate_and_is_reproducible():
    uids, marks, nodules = _random_world()
    r = froc_scores(marks, nodules, None, uids, bootstrap=300, seed=7)
    ci = r.ci
    assert (ci.sensitivities_lower <= r.sensitivities).all() and (r.sensitivities <= ci.sensitivities_upper).all()
    assert ci.cpm_lower < r.cpm < ci.cpm_upper and ci.froc_new_lower < r.froc_new < ci.froc_new_upper
    assert (ci.band_lower <= ci.band_upper).all() and ci.band_fps[0] == 0.125 and ci.band_fps[-1] == 8.0
    again = froc_scores(marks, nodules, None, uids, bootstrap=300, seed=7).ci
    np.testing.assert_array_equal(again.band_lower, ci.band_lower)
    assert (again.cpm_lower, again.cpm_upper) == (ci.cpm_lower, ci.cpm_upper)
    other = froc_scores(marks, nodules, None, uids, bootstrap=300, seed=8).ci
    assert (other.cpm_lower, other.cpm_upper) != (ci.cpm_lower, ci.cpm_upper)


def test_bootstrap_equals_concatenating_the_drawn_scans():
    # the weighted computation (over only the entries needed to pass 8 FP/scan: here ~30 FP/scan, so it truncates)
    # against LUNA16's way: concatenate the drawn scans' marks and score them, with the same draws (numpy's
    # Generator, seed 3) and the FP/scan denominator kept at the number of scans
    uids, marks, nodules = _random_world(seed=1, n_scans=12, fp_per_scan=30)
    ci = froc_scores(marks, nodules, None, uids, bootstrap=20, seed=3).ci
    draws = np.random.default_rng(3).integers(len(uids), size=(20, len(uids)))
    sens = []
    for row in draws:
        new = [f"{uids[i]}#{j}" for j, i in enumerate(row)]
        sub = froc_scores({n: marks[uids[i]] for n, i in zip(new, row)},
                          {n: nodules[uids[i]] for n, i in zip(new, row)}, None, new)
        sens.append(sub.sensitivities)
    sens = np.array(sens)
    cpms = np.sort(sens.mean(axis=1))
    sens.sort(axis=0)
    # bounds as LUNA16's compute_mean_ci: sorted[floor(0.025 * 20)] = sorted[0], sorted[floor(0.975 * 20)] = sorted[19]
    np.testing.assert_allclose(ci.sensitivities_lower, sens[0], atol=1e-12)
    np.testing.assert_allclose(ci.sensitivities_upper, sens[19], atol=1e-12)
    assert (ci.cpm_lower, ci.cpm_upper) == pytest.approx((cpms[0], cpms[19]))
    assert 0 < ci.sensitivities_lower[0] < ci.sensitivities_upper[-1] < 1


# -------------------------------------------------------------------------------------------------- files & input


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def luna_like(tmp_path):
    """A tiny reference: scan A with a nodule and an excluded finding, scan B with none."""
    ann = _write(tmp_path / "annotations.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\nA,0,0,0,10\nA,30,0,0,6\n")
    exc = _write(tmp_path / "annotations_excluded.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\nA,-30,0,0,-1\n")
    uids = _write(tmp_path / "seriesuids.csv", "A\nB\n")
    sub = _write(
        tmp_path / "submission.csv",
        "seriesuid,coordX,coordY,coordZ,probability\nA,1,0,0,0.9\nA,-30,1,0,0.8\nA,100,0,0,0.7\nB,0,0,0,0.4\n",
    )
    return ann, exc, uids, sub


def test_score_files(luna_like):
    ann, exc, uids, sub = luna_like
    # A: nodule 1 hit at 0.9, nodule 2 missed, the 0.8 mark on the excluded finding dropped, FP 0.7; B: FP 0.4.
    # Curve: (0,0), (0,1/2)@0.9, (1/2,1/2)@0.7, (1,1/2)@0.4 -> 0.5 everywhere.
    r = score_files(sub, ann, exc, uids)
    np.testing.assert_array_equal(r.sensitivities, [0.5] * 7)
    assert (r.scans, r.hits, r.missed, r.false_positives, r.excluded_marks) == (2, 1, 1, 2, 1)
    assert "FROC[luna] (CPM)" in format_table(r)


def test_seriesuids_with_or_without_header(tmp_path):
    assert read_seriesuids(_write(tmp_path / "a.csv", "1.2.3\n\n4.5.6\n")) == ["1.2.3", "4.5.6"]
    assert read_seriesuids(_write(tmp_path / "b.csv", "seriesuid\n1.2.3\n")) == ["1.2.3"]
    with pytest.raises(InputError, match=r"row 3: seriesuid 1.2.3 is already listed at row 1"):
        read_seriesuids(_write(tmp_path / "c.csv", "1.2.3\n4\n1.2.3\n"))


def test_unknown_seriesuid_warns_and_is_ignored(luna_like, tmp_path):
    ann, exc, uids, sub = luna_like
    extra = _write(tmp_path / "extra.csv", sub.read_text() + "Z,0,0,0,0.99\nZ,1,0,0,0.98\nY,0,0,0,0.5\n")
    with pytest.warns(UserWarning, match=r"3 marks of 2 seriesuid\(s\) not in the evaluated list are ignored: Z, Y"):
        r = score_files(extra, ann, exc, uids)
    base = score_files(sub, ann, exc, uids)
    np.testing.assert_array_equal(r.sensitivities, base.sensitivities)
    assert (r.ignored_marks, r.false_positives) == (3, base.false_positives)


def test_non_numeric_probability_names_file_and_row(tmp_path):
    sub = _write(tmp_path / "s.csv", "seriesuid,coordX,coordY,coordZ,probability\nA,0,0,0,0.5\nA,1,2,3,high\n")
    with pytest.raises(InputError, match=r"s\.csv: row 3: probability is 'high', not a finite number"):
        read_submission(sub)
    nan = _write(tmp_path / "n.csv", "seriesuid,coordX,coordY,coordZ,probability\nA,0,nan,0,0.5\n")
    with pytest.raises(InputError, match=r"n\.csv: row 2: coordY is 'nan'"):
        read_submission(nan)


def test_missing_column_and_short_row(tmp_path):
    sub = _write(tmp_path / "s.csv", "seriesuid,coordX,coordY,coordZ\nA,0,0,0\n")
    with pytest.raises(InputError, match=r"s\.csv: missing column\(s\) probability"):
        read_submission(sub)
    short = _write(tmp_path / "t.csv", "seriesuid,coordX,coordY,coordZ,probability\nA,0,0,0\n")
    with pytest.raises(InputError, match=r"t\.csv: row 2 has 4 fields, the header has 5"):
        read_submission(short)
    bad_d = _write(tmp_path / "a.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\nA,0,0,0,-1\n")
    with pytest.raises(InputError, match=r"a\.csv: row 2: diameter_mm is -1, must be > 0"):
        read_annotations(bad_d)
    assert read_annotations(bad_d, excluded=True)["A"][0, 3] == -1


def test_columns_in_any_order_and_header_only(tmp_path):
    sub = _write(tmp_path / "s.csv", "probability,coordZ,coordY,coordX,seriesuid\n0.5,3,2,1,A\n")
    np.testing.assert_array_equal(read_submission(sub)["A"], [[1, 2, 3, 0.5]])
    assert read_submission(_write(tmp_path / "h.csv", "seriesuid,coordX,coordY,coordZ,probability\n")) == {}


def test_quoted_fields_and_blank_lines(tmp_path):
    quoted = _write(tmp_path / "q.csv", '"seriesuid","coordX","coordY","coordZ","probability"\n"A","1","2","3","0.5"\n')
    np.testing.assert_array_equal(read_submission(quoted)["A"], [[1, 2, 3, 0.5]])
    blank = _write(tmp_path / "b.csv", "seriesuid,coordX,coordY,coordZ,probability\n\nA,1,2,3,0.5\n\nA,1,2,3,?\n")
    with pytest.raises(InputError, match=r"b\.csv: row 5: probability is '\?'"):
        read_submission(blank)


def test_combine_submissions(tmp_path):
    head = "seriesuid,coordX,coordY,coordZ,probability\n"
    f0 = _write(tmp_path / "f0.csv", head + "A,0,0,0,0.5\nA,1,1,1,0.4\n")
    f1 = _write(tmp_path / "f1.csv", head + "B,0,0,0,0.3\n")
    combined = combine_submissions([f0, f1, {"C": np.zeros((0, 4))}])
    assert sorted(combined) == ["A", "B", "C"] and combined["A"].shape == (2, 4)
    with pytest.raises(InputError, match="seriesuid A is also in submission 0"):
        combine_submissions([f0, _write(tmp_path / "f2.csv", head + "A,5,5,5,0.1\n")])


def test_write_report(tmp_path):
    uids, marks, nodules = _random_world(seed=2, n_scans=20)
    r = froc_scores(marks, nodules, None, uids, bootstrap=50)
    files = write_report(r, tmp_path / "out")
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(files["json"].read_text())
    assert data["cpm"] == pytest.approx(r.cpm) and data["ci"]["resamples"] == 50
    curve = np.loadtxt(files["csv"], delimiter=",", skiprows=1)
    np.testing.assert_allclose(curve[:, 0], r.curve_fps, rtol=1e-8)


# ---------------------------------------------------------------------------------------------------------- CLI


def test_cli_writes_the_three_files(luna_like, tmp_path, capsys):
    ann, exc, uids, sub = luna_like
    out = tmp_path / "report"
    rc = main(["froc", "--annotations", str(ann), "--excluded", str(exc), "--seriesuids", str(uids),
               "--submission", str(sub), "--out", str(out), "--bootstrap", "100"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["froc.csv", "froc.json", "froc.png"]
    printed = capsys.readouterr().out
    assert "FROC[luna] (CPM)        0.5000" in printed and "95% CI" in printed


def test_cli_bad_input_is_one_error_line(luna_like, tmp_path):
    ann, exc, uids, _ = luna_like
    bad = _write(tmp_path / "bad.csv", "seriesuid,coordX,coordY,coordZ,probability\nA,0,0,0,x\n")
    proc = subprocess.run(
        [sys.executable, "-m", "bundle", "froc", "--annotations", str(ann), "--excluded", str(exc),
         "--seriesuids", str(uids), "--submission", str(bad)],
        cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {bad}: row 2: probability is 'x', not a finite number"]


def _banded_cohort(root: Path) -> tuple[Path, ...]:
    """Scans 1.1 (1 mm slices), 1.2 (2.5 mm) and 1.3 (5 mm), one nodule each, in ``root/subset0``; a submission that hits
    the first two nodules and misses the third."""
    import SimpleITK as sitk

    (root / "subset0").mkdir(parents=True)
    for uid, z in (("1.1", 1.0), ("1.2", 2.5), ("1.3", 5.0)):
        image = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.int16))
        image.SetSpacing((0.7, 0.7, z))
        sitk.WriteImage(image, str(root / "subset0" / f"{uid}.mhd"))
    ann = _write(root / "annotations.csv",
                 "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.1,0,0,0,10\n1.2,0,0,0,10\n1.3,0,0,0,10\n")
    exc = _write(root / "annotations_excluded.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    uids = _write(root / "seriesuids.csv", "1.1\n1.2\n1.3\n")
    sub = _write(root / "submission.csv",
                 "seriesuid,coordX,coordY,coordZ,probability\n1.1,1,0,0,0.9\n1.2,0,1,0,0.8\n1.3,50,0,0,0.7\n")
    return ann, exc, uids, sub


def test_cli_scores_each_slice_thickness_band(tmp_path):
    ann, exc, uids, sub = _banded_cohort(tmp_path / "cohort")
    out = tmp_path / "report"
    rc = main(["froc", "--annotations", str(ann), "--excluded", str(exc), "--seriesuids", str(uids),
               "--submission", str(sub), "--out", str(out), "--bootstrap", "0", "--scans", str(tmp_path / "cohort")])
    assert rc == 0
    with (out / "froc_bands.csv").open(newline="") as f:
        rows = {r["band"]: r for r in __import__("csv").DictReader(f)}
    assert list(rows) == ["<= 1.5 mm", "1.5-3 mm", "> 3 mm"]
    assert [(rows[b]["scans"], rows[b]["hits"], float(rows[b]["cpm"])) for b in rows] == [
        ("1", "1", 1.0), ("1", "1", 1.0), ("1", "0", 0.0)]
    # one band over all three: the overall figures
    rc = main(["froc", "--annotations", str(ann), "--excluded", str(exc), "--seriesuids", str(uids),
               "--submission", str(sub), "--out", str(out), "--bootstrap", "0", "--scans", str(tmp_path / "cohort"),
               "--slice_bands", "[10]"])
    with (out / "froc_bands.csv").open(newline="") as f:
        (row,) = list(__import__("csv").DictReader(f))
    assert (row["band"], row["scans"], row["hits"]) == ("<= 10 mm", "3", "2")
    assert float(row["cpm"]) == pytest.approx(json.loads((out / "froc.json").read_text())["cpm"])


def test_cli_bands_refuse_a_scan_folder_without_the_evaluated_scans(tmp_path):
    ann, exc, uids, sub = _banded_cohort(tmp_path / "cohort")
    (tmp_path / "cohort" / "subset0" / "1.3.mhd").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "bundle", "froc", "--annotations", str(ann), "--excluded", str(exc),
         "--seriesuids", str(uids), "--submission", str(sub), "--scans", str(tmp_path / "cohort")],
        cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'cohort'}: 1 evaluated scan(s) not found, e.g. 1.3"]


# ------------------------------------------------------------------------------------------------ real LUNA16 files


@needs_luna16
def test_perfect_submission_on_luna16_annotations():
    nodules = read_annotations(LIDC / "annotations.csv")
    excluded = read_annotations(LIDC / "annotations_excluded.csv", excluded=True)
    assert len(nodules) == 601 and sum(len(v) for v in nodules.values()) == 1186
    marks = {uid: np.c_[n[:, :3], np.ones(len(n))] for uid, n in nodules.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = froc_scores(marks, nodules, excluded, list(nodules))
    np.testing.assert_array_equal(r.sensitivities, [1.0] * 7)
    assert (r.cpm, r.froc_new, r.hits, r.false_positives, r.scans) == (1.0, 1.0, 1186, 0, 601)


@needs_luna16
def test_bench_froc_runs(capsys):
    from bundle.bench_froc import bench_froc

    bench_froc(scans=601, marks_per_scan=3, repeats=1)
    printed = capsys.readouterr().out
    assert "score CSV files, no bootstrap" in printed and "1000 bootstrap" in printed
