"""Reports of a FROC evaluation (:class:`custom_components.froc.FROCResult`): a text table, JSON, the curve as CSV and
the FROC plot as PNG (the evaluator handler that writes them is :class:`custom_components.froc_metric.FROCReport`).
Every file is written atomically (``custom_components.atomic.atomic_write``). NumPy and Matplotlib only: the
``python -m bundle froc`` tool starts without importing MONAI or Ignite (5 of its 7 s of start-up before)."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from custom_components.atomic import atomic_write
from custom_components.froc import FP_RATE_LABELS, FROCResult

__all__ = [
    "format_table", "result_to_dict", "write_json", "write_curve_csv", "plot_froc", "write_report",
    "SLICE_BANDS_MM", "slice_bands", "format_band_table", "write_band_csv",
]

#: Edges of the slice-thickness bands results are reported in: thin (<= 1.5 mm, LUNA16's typical 0.6-1.25 mm), medium
#: (<= 3 mm: 2-2.5 mm, LIDC-IDRI's older scans) and thick (> 3 mm: the 5 mm of many clinical archives).
SLICE_BANDS_MM = (1.5, 3.0)


def _ci(low: float, high: float) -> str:
    return f"[{low:.4f}, {high:.4f}]"


def format_table(result: FROCResult) -> str:
    """A plain-text table: sensitivity at each FP/scan rate (with its CI when bootstrapped), CPM (FROC[luna]),
    FROC[new], and the counts of scans, nodules, hits, misses and false positives."""
    ci = result.ci
    rows = [("FP/scan", "sensitivity", f"{ci.confidence:.0%} CI" if ci else "")]
    for i, label in enumerate(FP_RATE_LABELS):
        bounds = _ci(ci.sensitivities_lower[i], ci.sensitivities_upper[i]) if ci else ""
        rows.append((label, f"{result.sensitivities[i]:.4f}", bounds))
    rows.append(("FROC[luna] (CPM)", f"{result.cpm:.4f}", _ci(ci.cpm_lower, ci.cpm_upper) if ci else ""))
    new_ci = _ci(ci.froc_new_lower, ci.froc_new_upper) if ci else ""
    rows.append(("FROC[new] (1,2,4)", f"{result.froc_new:.4f}", new_ci))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>11}  {c}".rstrip() for a, b, c in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(FP_RATE_LABELS) + 2, "-" * len(lines[0]))
    lines.append("")
    lines.append(
        f"scans {result.scans}, nodules {result.nodules}: hits {result.hits}, missed {result.missed}; "
        f"false positives {result.false_positives} ({result.false_positives / result.scans:.2f}/scan)"
    )
    lines.append(
        f"marks dropped: {result.excluded_marks} on excluded findings, {result.capped_marks} over the 100/scan cap, "
        f"{result.ignored_marks} of unlisted scans"
    )
    if ci:
        lines.append(f"bootstrap: {ci.resamples} resamples of the scans, seed {ci.seed}")
    return "\n".join(lines)


def _number(value: float) -> float | None:
    """JSON has no NaN/Infinity: undefined values (no nodules) are written as null."""
    return float(value) if math.isfinite(value) else None


def result_to_dict(result: FROCResult) -> dict[str, Any]:
    """A JSON-ready dict: scores, sensitivities keyed by FP/scan label, counts and, when bootstrapped, the CIs and
    the band (``fps``, ``mean``, ``lower``, ``upper`` lists on the 1/8..8 grid)."""
    out: dict[str, Any] = {
        "cpm": _number(result.cpm),
        "froc_new": _number(result.froc_new),
        "sensitivity": {label: _number(s) for label, s in zip(FP_RATE_LABELS, result.sensitivities)},
        "fp_rates": [float(r) for r in result.fp_rates],
        "counts": {
            "scans": result.scans,
            "nodules": result.nodules,
            "hits": result.hits,
            "missed": result.missed,
            "false_positives": result.false_positives,
            "hit_marks": result.hit_marks,
            "excluded_marks": result.excluded_marks,
            "capped_marks": result.capped_marks,
            "ignored_marks": result.ignored_marks,
        },
        "ci": None,
    }
    ci = result.ci
    if ci is not None:
        out["ci"] = {
            "resamples": ci.resamples,
            "seed": ci.seed,
            "confidence": ci.confidence,
            "sensitivity": {
                label: [_number(lo), _number(hi)]
                for label, lo, hi in zip(FP_RATE_LABELS, ci.sensitivities_lower, ci.sensitivities_upper)
            },
            "cpm": [_number(ci.cpm_lower), _number(ci.cpm_upper)],
            "froc_new": [_number(ci.froc_new_lower), _number(ci.froc_new_upper)],
            "band": {
                "fps": [round(float(v), 6) for v in ci.band_fps],
                "mean": [_number(round(float(v), 6)) for v in ci.band_mean],
                "lower": [_number(round(float(v), 6)) for v in ci.band_lower],
                "upper": [_number(round(float(v), 6)) for v in ci.band_upper],
            },
        }
    return out


def write_json(result: FROCResult, path: str | os.PathLike) -> Path:
    """Write :func:`result_to_dict` as JSON to ``path``."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(result_to_dict(result), f, indent=2)
        f.write("\n")
    return Path(path)


def write_curve_csv(result: FROCResult, path: str | os.PathLike) -> Path:
    """Write the FROC curve as CSV ``fps_per_scan,sensitivity,threshold``, one row per distinct probability
    (LUNA16's ``froc_<name>.txt``); the first row is ``0,0,inf``."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write("fps_per_scan,sensitivity,threshold\n")
        for fps, sens, thr in zip(result.curve_fps, result.curve_sensitivity, result.curve_thresholds):
            f.write(f"{fps:.9g},{sens:.9g},{thr:.9g}\n")
    return Path(path)


def plot_froc(result: FROCResult, path: str | os.PathLike, title: str = "FROC") -> Path:
    """Plot the FROC curve to a PNG: x = FP/scan on a log-2 axis from 1/8 to 8, y = sensitivity; the 7 operating
    points marked, the bootstrap CI band (when computed) shaded, CPM and FROC[new] in the legend."""
    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # the curve is piecewise linear in FP/scan (what np.interp scores), so sample it densely for the log axis
    xs = 2.0 ** np.linspace(-3.25, 3.25, 1301)
    ax.plot(xs, np.interp(xs, result.curve_fps, result.curve_sensitivity), color="tab:blue", lw=2, label="FROC curve")
    ci = result.ci
    if ci is not None:
        ax.fill_between(
            ci.band_fps, ci.band_lower, ci.band_upper, color="tab:blue", alpha=0.15, lw=0,
            label=f"{ci.confidence:.0%} CI ({ci.resamples} bootstrap resamples)",
        )
    cpm = f"CPM = {result.cpm:.4f}" + (f" [{ci.cpm_lower:.4f}, {ci.cpm_upper:.4f}]" if ci else "")
    new = f"FROC[new] = {result.froc_new:.4f}" + (f" [{ci.froc_new_lower:.4f}, {ci.froc_new_upper:.4f}]" if ci else "")
    ax.plot(result.fp_rates, result.sensitivities, "o", color="tab:red", ms=5, label=f"7 points: {cpm}")
    for rate, sens in zip(result.fp_rates, result.sensitivities):
        ax.annotate(f"{sens:.3f}", (rate, sens), textcoords="offset points", xytext=(0, -13), ha="center", fontsize=7)
    ax.plot([], [], " ", label=new)
    ax.set_xscale("log", base=2)
    ax.set_xlim(2.0**-3.25, 2.0**3.25)
    ax.set_xticks(result.fp_rates, labels=FP_RATE_LABELS)
    ax.minorticks_off()
    low = float(np.nanmin(result.sensitivities)) if np.isfinite(result.sensitivities).any() else 0.0
    # LUNA16 plots sensitivity from 0.5; go lower only when the curve does
    ax.set_ylim(min(0.5, max(0.0, math.floor(low * 10) / 10 - 0.1)), 1.0)
    ax.set_xlabel("average number of false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"{title}: {result.scans} scans, {result.nodules} nodules", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    return Path(path)


def write_report(result: FROCResult, out_dir: str | os.PathLike, title: str = "FROC") -> dict[str, Path]:
    """Write ``froc.json``, ``froc.csv`` (the curve) and ``froc.png`` into ``out_dir`` (created when missing)."""
    out = Path(out_dir)
    return {
        "json": write_json(result, out / "froc.json"),
        "csv": write_curve_csv(result, out / "froc.csv"),
        "png": plot_froc(result, out / "froc.png", title=title),
    }


def slice_bands(
    slice_mm: Mapping[str, float], edges: Sequence[float] = SLICE_BANDS_MM
) -> list[tuple[str, list[str]]]:
    """The scans of ``slice_mm`` (seriesuid -> slice spacing in mm) grouped by ``edges``: ``[(label, seriesuids), ...]``
    from the thinnest band up, empty bands left out; a scan on an edge belongs to the band below it."""
    bounds = [0.0, *sorted(float(e) for e in edges), math.inf]
    bands = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        label = f"<= {hi:g} mm" if lo == 0 else (f"> {lo:g} mm" if math.isinf(hi) else f"{lo:g}-{hi:g} mm")
        members = sorted(u for u, mm in slice_mm.items() if lo < mm <= hi)
        if members:
            bands.append((label, members))
    return bands


def _band_row(label: str, result: FROCResult) -> dict[str, Any]:
    ci = result.ci
    return {
        "band": label, "scans": result.scans, "nodules": result.nodules, "hits": result.hits,
        "false_positives": result.false_positives, "cpm": round(result.cpm, 6),
        "cpm_lower": round(ci.cpm_lower, 6) if ci else "", "cpm_upper": round(ci.cpm_upper, 6) if ci else "",
        "froc_new": round(result.froc_new, 6),
    }


def format_band_table(results: Sequence[tuple[str, FROCResult]]) -> str:
    """One line per slice-thickness band: scans, nodules, hits, FP/scan, CPM (with its CI when bootstrapped),
    FROC[new]."""
    lines = [f"{'slice band':<12} {'scans':>5} {'nodules':>7} {'hits':>5} {'FP/scan':>8}  {'CPM':>6}  {'CI':<16}  FROC[new]"]
    for label, r in results:
        ci = _ci(r.ci.cpm_lower, r.ci.cpm_upper) if r.ci else ""
        lines.append(f"{label:<12} {r.scans:>5} {r.nodules:>7} {r.hits:>5} {r.false_positives / r.scans:>8.2f}  "
                     f"{r.cpm:>6.4f}  {ci:<16}  {r.froc_new:.4f}")
    return "\n".join(lines)


def write_band_csv(results: Sequence[tuple[str, FROCResult]], path: str | os.PathLike) -> Path:
    """Write :func:`format_band_table`'s figures as CSV (``band,scans,nodules,hits,false_positives,cpm,cpm_lower,
    cpm_upper,froc_new``)."""
    rows = [_band_row(label, r) for label, r in results]
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(_band_row("", results[0][1])) if results else ["band"])
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)
