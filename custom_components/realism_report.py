"""The realism report's outputs: the printed table, ``realism.json``, ``realism.csv``, ``realism_slices.png`` (mid-lung
axial slices side by side, lung window) and ``realism_curves.png`` (lung HU histograms, vessel calibres, NPS).
Every file is written atomically (``custom_components.atomic.atomic_write``)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from custom_components.realism import HU_BINS, ScanStatistics
from custom_components.atomic import atomic_write

__all__ = ["COLUMNS", "format_table", "write_report"]

LUNG_WINDOW_HU = (-1350.0, 150.0)  # width 1500, level -600: the usual lung window

# (row key, printed header, format) of the table, in order
COLUMNS: list[tuple[str, str, str]] = [
    ("slice_mm", "slice", "{:.2f}"),
    ("lung_volume_l", "lung L", "{:.2f}"),
    ("lung_hu_median", "HU p50", "{:.0f}"),
    ("lung_hu_p05", "HU p5", "{:.0f}"),
    ("lung_hu_p95", "HU p95", "{:.0f}"),
    ("w1_to_reference_hu", "W1 HU", "{:.1f}"),
    ("above_-500_pct", ">-500%", "{:.2f}"),
    ("above_-300_pct", ">-300%", "{:.2f}"),
    ("vessel_d_p10_mm", "d p10", "{:.2f}"),
    ("vessel_d_p50_mm", "d p50", "{:.2f}"),
    ("vessel_d_p90_mm", "d p90", "{:.2f}"),
    ("vessels_per_cm2", "n/cm2", "{:.2f}"),
    ("noise_std_hu", "noise", "{:.1f}"),
    ("nps_peak_cycles_mm", "NPS pk", "{:.3f}"),
    ("nps_mean_cycles_mm", "NPS mn", "{:.3f}"),
]


def _fmt(value: Any, spec: str) -> str:
    return "nan" if isinstance(value, float) and not math.isfinite(value) else spec.format(value)


def format_table(cohort: Sequence[ScanStatistics], reference: Sequence[ScanStatistics], summary: dict) -> str:
    """The report as a fixed-width text table: one line per scan, then each group's median over its scans.

    Units: slice spacing mm, lung volume litres, lung HU quantiles and W1 (Wasserstein-1 distance of the lung HU
    distribution to the reference, HU), lung voxels above -500 / -300 HU in %, dense cross-section equivalent diameters
    (quantiles, mm) and count per cm² of lung section, noise std (HU, soft tissue), NPS peak and mean (cycles/mm).
    """
    name_width = max([len(s.name) for s in (*cohort, *reference)] + [16])
    head = f"{'group':<9} {'scan':<{name_width}} " + " ".join(f"{h:>7}" for _, h, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for scans in (cohort, reference):
        for scan in scans:
            row = scan.row()
            cells = " ".join(f"{_fmt(row[k], spec):>7}" for k, _, spec in COLUMNS)
            lines.append(f"{scan.group:<9} {scan.name:<{name_width}} {cells}")
    lines.append("-" * len(head))
    for group in ("cohort", "reference"):
        stats = summary.get(group, {})
        if not stats.get("scans"):
            continue
        cells = " ".join(f"{_fmt(stats[k]['median'], spec):>7}" for k, _, spec in COLUMNS)
        lines.append(f"{group:<9} {'median of ' + str(stats['scans']) + ' scans':<{name_width}} {cells}")
    if summary.get("pooled_w1_hu") is not None:
        lines.append(f"W1 of the pooled cohort's lung HU to the pooled reference: {summary['pooled_w1_hu']:.1f} HU")
    return "\n".join(lines)


def _scan_json(scan: ScanStatistics) -> dict[str, Any]:
    return scan.row() | {
        "path": scan.path,
        "spacing_mm": list(scan.spacing_mm),
        "lung_hu_histogram": scan.hu_histogram.tolist(),
        "nps_frequencies_cycles_mm": scan.noise.frequencies.round(4).tolist(),
        "nps_hu2_mm2": scan.noise.nps.round(3).tolist(),
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN: write ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _png(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    with atomic_write(path, "wb") as f:
        f.write(buffer.getvalue())


def _slices_figure(
    cohort: Sequence[ScanStatistics], reference: Sequence[ScanStatistics], columns: int = 6
) -> Figure:
    """Mid-lung axial slices, generated scans first, then the real ones (each group starts a new row of at most
    ``columns`` panels), all at the same mm scale (radiological view: patient's left on the right, anterior up), in
    the lung window. Each panel is centred on its slice's centre and spans the widest field of view of all scans."""
    columns = max(min(max(len(cohort), len(reference), 1), columns), 1)
    rows = [list(cohort[i : i + columns]) for i in range(0, len(cohort), columns)]
    rows += [list(reference[i : i + columns]) for i in range(0, len(reference), columns)]
    fig = Figure(figsize=(2.4 * columns, 2.7 * len(rows) + 0.4))
    extents = [max(s.slice_hu.shape[0] * s.pixel_mm[0], s.slice_hu.shape[1] * s.pixel_mm[1]) for s in (*cohort, *reference)]
    half = max(extents) / 2
    for r, scans in enumerate(rows):
        for c, scan in enumerate(scans):
            ax = fig.add_subplot(len(rows), columns, r * columns + c + 1)
            size_i, size_j = scan.slice_hu.shape
            width, height = size_i * scan.pixel_mm[0], size_j * scan.pixel_mm[1]
            # rows = j (anterior -> posterior), columns = i (patient's right -> left): radiological view
            ax.imshow(
                scan.slice_hu.T, cmap="gray", vmin=LUNG_WINDOW_HU[0], vmax=LUNG_WINDOW_HU[1],
                extent=(-width / 2, width / 2, height / 2, -height / 2), interpolation="bilinear",
            )  # fmt: skip
            ax.set_xlim(-half, half)
            ax.set_ylim(half, -half)
            ax.set_facecolor("black")
            ax.set_xticks([])
            ax.set_yticks([])
            group = "generated" if scan.group == "cohort" else "real"
            title = f"{group}: {scan.name}\n{scan.lung_volume_l:.2f} L, {scan.spacing_mm[2]:.2f} mm slices"
            ax.set_title(title, fontsize=7)
    fig.suptitle(f"mid-lung axial slices, {2 * half:.0f} mm across, lung window [-1350, 150] HU", fontsize=9)
    fig.tight_layout()
    return fig


def _curves_figure(cohort: Sequence[ScanStatistics], reference: Sequence[ScanStatistics]) -> Figure:
    """Lung HU histograms, cumulative vessel-calibre distributions and radial NPS, cohort (blue) vs reference (red)."""
    fig = Figure(figsize=(13, 3.8))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    centres = (HU_BINS[:-1] + HU_BINS[1:]) / 2
    for scans, colour in ((cohort, "tab:blue"), (reference, "tab:red")):
        for index, scan in enumerate(scans):
            label = ("generated" if scan.group == "cohort" else "real") if index == 0 else None
            density = scan.hu_histogram / max(scan.hu_histogram.sum(), 1) / np.diff(HU_BINS)
            axes[0].plot(centres, density, color=colour, lw=1, alpha=0.7, label=label)
            d = np.sort(scan.vessel_diameters_mm)
            if d.size:
                axes[1].plot(d, np.arange(1, d.size + 1) / d.size, color=colour, lw=1, alpha=0.7, label=label)
            if scan.noise.rois:
                nps = scan.noise.nps / scan.noise.nps.max()
                axes[2].plot(scan.noise.frequencies, nps, color=colour, lw=1, alpha=0.7, label=label)
    axes[0].set(xlabel="HU (aerated lung)", ylabel="density", title="lung HU histogram", yscale="log")
    axes[1].set(
        xlabel="equivalent diameter mm (HU > -500)", ylabel="fraction of cross-sections", title="vessel calibres",
        xscale="log",
    )
    axes[2].set(xlabel="cycles/mm", ylabel="NPS / its maximum", title="noise-power spectrum (soft tissue)")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_report(
    cohort: Sequence[ScanStatistics], reference: Sequence[ScanStatistics], summary: dict, out: str | os.PathLike
) -> list[Path]:
    """Write ``realism.json`` (every scan's row, histogram and NPS; the summary), ``realism.csv`` (one row per scan)
    and the two PNGs into ``out``; returns their paths."""
    out = Path(out)
    scans = [*cohort, *reference]
    paths = [out / "realism.json", out / "realism.csv", out / "realism_slices.png", out / "realism_curves.png"]
    document = {
        "lung_hu_bin_edges": HU_BINS.tolist(),
        "scans": [_scan_json(s) for s in scans],
        "summary": summary,
    }
    with atomic_write(paths[0], "w", encoding="utf-8") as f:
        json.dump(_clean(document), f, indent=1)
    rows = [s.row() | {"path": s.path} for s in scans]
    with atomic_write(paths[1], "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _png(_slices_figure(cohort, reference), paths[2])
    _png(_curves_figure(cohort, reference), paths[3])
    return paths
