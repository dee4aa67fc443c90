"""The realism report (``custom_components/realism.py``, ``python -m bundle realism``): each statistic on constructed
volumes whose answer is known (lung volume, dense fractions, tube calibres, noise std and NPS peak of filtered noise,
HU distribution shifts), and bad input through the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from custom_components.errors import InputError
from custom_components.realism import compare, noise_statistics, scan_statistics, vessel_diameters

REPO = Path(__file__).resolve().parents[1]
SPACING = (0.8, 0.8, 2.0)  # (i, j, k) mm
SHAPE = (240, 240, 50)  # (I, J, K): 192 x 192 x 100 mm
LUNG_AXES = (30.0, 40.0, 35.0)  # ellipsoid semi-axes (x, y, z) mm
LUNG_CENTRES = ((-40.0, 0.0), (40.0, 0.0))  # in-plane centres (x, y) mm, both at z = 50 mm
TUBES = ((-8.0, 0.0, 2.0), (0.0, 8.0, 4.0), (8.0, -4.0, 7.0))  # (dx, dy) from the left lung's centre, diameter mm


def _grid(supersample: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World mm of the voxel centres (x, y) in-plane, centred on the volume, and z; ``supersample`` sub-pixels per
    pixel side in-plane (for partial-volume rendering)."""
    n = supersample
    offsets = (np.arange(n) + 0.5) / n - 0.5
    x = ((np.arange(SHAPE[0])[:, None] + offsets[None]).ravel() - (SHAPE[0] - 1) / 2) * SPACING[0]
    y = ((np.arange(SHAPE[1])[:, None] + offsets[None]).ravel() - (SHAPE[1] - 1) / 2) * SPACING[1]
    z = np.arange(SHAPE[2]) * SPACING[2]
    return x, y, z


def _phantom(
    lung_hu: float = -850.0, tubes: bool = True, dense: tuple[float, float] = (0.0, 0.0), noise: float = 5.0, seed: int = 0
) -> np.ndarray:
    """A chest-like volume ``(I, J, K)`` in HU: air, an elliptic body of +40 HU, two ellipsoid lungs of ``lung_hu``;
    ``tubes``: vertical +40 HU tubes (the :data:`TUBES`) in the left lung, rendered with partial volume; ``dense``:
    fractions of lung voxels set at random to -450 HU and to -200 HU; white noise of ``noise`` HU."""
    rng = np.random.default_rng(seed)
    x, y, z = _grid()
    xx, yy = np.meshgrid(x, y, indexing="ij")
    body = (xx / 85.0) ** 2 + (yy / 70.0) ** 2 <= 1.0
    hu = np.where(body[..., None], 40.0, -1000.0) * np.ones(SHAPE)
    lung = np.zeros(SHAPE, dtype=bool)
    for cx, cy in LUNG_CENTRES:
        lung |= (
            ((xx - cx) / LUNG_AXES[0])[..., None] ** 2
            + ((yy - cy) / LUNG_AXES[1])[..., None] ** 2
            + ((z - 50.0) / LUNG_AXES[2])[None, None] ** 2
        ) <= 1.0
    hu[lung] = lung_hu
    if dense[0] or dense[1]:
        draw = rng.random(SHAPE)
        hu[lung & (draw < dense[0])] = -450.0
        hu[lung & (draw >= dense[0]) & (draw < dense[0] + dense[1])] = -200.0
    if tubes:
        s = 4
        xs, ys, _ = _grid(s)
        xxs, yys = np.meshgrid(xs, ys, indexing="ij")
        cx, cy = LUNG_CENTRES[0]
        fraction = np.zeros(SHAPE[:2])
        for dx, dy, d in TUBES:
            inside = (xxs - cx - dx) ** 2 + (yys - cy - dy) ** 2 <= (d / 2) ** 2
            fraction += inside.reshape(SHAPE[0], s, SHAPE[1], s).mean(axis=(1, 3))
        # a tube fills its partial-volume fraction of each lung voxel: HU = lung + fraction * (40 - lung)
        hu = np.where(lung, hu + fraction[..., None] * (40.0 - hu), hu)
    return hu + rng.normal(0.0, noise, SHAPE)


def _write(hu: np.ndarray, path: Path) -> Path:
    image = sitk.GetImageFromArray(np.rint(hu).astype(np.int16).T)  # (I, J, K) -> SimpleITK's (k, j, i)
    image.SetSpacing(SPACING)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _lung_volume_l() -> float:
    return 2 * 4 / 3 * math.pi * np.prod(LUNG_AXES) / 1e6


def test_lung_volume_and_tube_calibres(tmp_path: Path):
    stats = scan_statistics(_write(_phantom(), tmp_path / "phantom.mhd"))
    # the tubes lie inside the lung, so they are part of its volume; the 2.4 mm grid quantises the outline
    assert stats.lung_volume_l == pytest.approx(_lung_volume_l(), rel=0.03)
    d = stats.vessel_diameters_mm
    # every measured slice cuts the three tubes (they run through the central 80 % of the lungs' height), and nothing
    # else in the lung is above -500 HU: 3 cross-sections a slice, of the tubes' diameters within 0.5 mm (0.6
    # pixel): a section's area is a whole number of 0.64 mm² pixels, and -500 HU is 39 % of the way from lung to
    # blood, so edge pixels 39-50 % inside the tube count too
    assert d.size % 3 == 0 and d.size >= 3 * 10
    for quantile, (_, _, diameter) in zip((0.1, 0.5, 0.9), TUBES):
        assert np.quantile(d, quantile) == pytest.approx(diameter, abs=0.5)
    # vessel density: 3 sections per slice over the left and right lungs' mean section area
    row = stats.row()
    assert row["vessel_d_p50_mm"] == pytest.approx(4.0, abs=0.5)
    assert 0 < row["vessels_per_cm2"] < 3 / (2 * math.pi * 0.6 * 30 * 0.6 * 40 / 100)


def test_dense_fractions_and_histogram(tmp_path: Path):
    stats = scan_statistics(_write(_phantom(tubes=False, dense=(0.10, 0.05)), tmp_path / "dense.mhd"))
    # -450 HU voxels count above -500 only, -200 HU above both
    assert stats.fraction_above[-500.0] == pytest.approx(0.15, abs=0.01)
    assert stats.fraction_above[-300.0] == pytest.approx(0.05, abs=0.01)
    # the histogram counts every aerated-lung voxel of the 2.4 mm grid: 85 % of them in the -850 HU bin
    assert stats.hu_histogram.sum() == pytest.approx(_lung_volume_l() * 1e6 / (2.4 * 2.4 * 2.0), rel=0.03)
    assert np.median(stats.lung_hu) == pytest.approx(-850.0, abs=3.0)


def test_vessel_diameters_only_enclosed_by_lung():
    hu = np.full((100, 100), -850.0)
    lung = np.zeros((100, 100), dtype=bool)
    lung[10:90, 10:90] = True
    yy, xx = np.mgrid[:100, :100]
    hu[(yy - 50) ** 2 + (xx - 50) ** 2 <= 10**2] = 40.0  # a 20-pixel disc
    hu[40:60, 5:15] = 40.0  # pleura-attached: straddles the lung's edge, only its inside part counts
    section = lung & (hu < -400)
    from scipy import ndimage as ndi

    section = ndi.binary_fill_holes(section)
    d = vessel_diameters(hu, section, (0.5, 0.5))
    assert d.size == 1 and d[0] == pytest.approx(10.0, rel=0.03)


def _filtered_noise(f0: float, width: float, std: float, pixel: float, shape=(8, 256, 256), seed: int = 0) -> np.ndarray:
    """Slices of +40 HU with noise of power spectrum ``exp(-(f - f0)² / width²)`` (radial, cycles/mm), of ``std`` HU."""
    rng = np.random.default_rng(seed)
    white = rng.normal(size=shape)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(shape[1], pixel), np.fft.fftfreq(shape[2], pixel), indexing="ij"))
    gain = np.exp(-((f - f0) ** 2) / (2 * width**2))  # amplitude; the power is its square
    noise = np.real(np.fft.ifft2(np.fft.fft2(white) * gain))
    return 40.0 + noise / noise.std() * std


def test_noise_std_and_nps_peak_of_band_pass_noise():
    pixel = 0.7
    noise = noise_statistics(list(_filtered_noise(0.3, 0.05, 25.0, pixel)), (pixel, pixel))
    ring = 1 / (round(24 / pixel) * pixel)  # the NPS's frequency resolution
    assert noise.rois > 50
    assert noise.std_hu == pytest.approx(25.0, rel=0.05)
    assert noise.peak_cycles_mm == pytest.approx(0.3, abs=ring)
    assert noise.mean_cycles_mm == pytest.approx(0.3, abs=0.03)
    # the spectrum integrates to the variance (Parseval), up to the removed quadratic trend
    assert (noise.nps * 2 * math.pi * noise.frequencies * ring).sum() == pytest.approx(25.0**2, rel=0.15)


def test_blurred_white_noise_peaks_at_the_lowest_frequency():
    # the synthetic generator's noise model: white noise through a Gaussian PSF has no FBP ramp, its NPS falls
    # from the lowest frequency on
    pixel = 0.7
    noise = noise_statistics(list(_filtered_noise(0.0, 0.15, 15.0, pixel, seed=1)), (pixel, pixel))
    ring = 1 / (round(24 / pixel) * pixel)
    # the quadratic trend removed from each 24 mm ROI (with the anatomy) takes the noise power below about two rings
    # with it: about 15 % of this low-pass noise's variance, 8 % of its std
    assert noise.std_hu == pytest.approx(15.0 * 0.92, rel=0.04)
    assert noise.peak_cycles_mm <= 2 * ring + 1e-9
    assert noise.mean_cycles_mm < 0.2


def test_noise_ignores_edges_and_non_soft_tissue():
    pixel = 0.7
    slices = _filtered_noise(0.3, 0.05, 20.0, pixel, seed=2)
    slices[:, :, :128] -= 140.0  # half fat (-100 HU), half muscle: ROIs across the edge or in fat are not used
    noise = noise_statistics(list(slices), (pixel, pixel))
    assert noise.std_hu == pytest.approx(20.0, rel=0.05)
    assert noise_statistics([np.full((128, 128), -1000.0)], (pixel, pixel)).rois == 0


def test_distance_to_reference_is_the_hu_shift(tmp_path: Path):
    reference = [scan_statistics(_write(_phantom(seed=s), tmp_path / f"ref{s}.mhd"), "reference") for s in (1, 2)]
    same = scan_statistics(_write(_phantom(seed=3), tmp_path / "same.mhd"))
    shifted = scan_statistics(_write(_phantom(lung_hu=-800.0, seed=4), tmp_path / "shift.mhd"))
    summary = compare([same, shifted], reference)
    assert same.w1_to_reference_hu < 2.0
    # every parenchyma voxel moved by 50 HU; the tubes' voxels (a few %) moved less
    assert 44.0 < shifted.w1_to_reference_hu < 50.5
    assert reference[0].w1_to_reference_hu < 2.0  # leave-one-out: against the other reference scan
    assert summary["cohort"]["scans"] == 2 and summary["reference"]["scans"] == 2
    assert summary["cohort"]["w1_to_reference_hu"]["max"] == pytest.approx(shifted.w1_to_reference_hu, abs=0.1)


def _cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bundle", "realism", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)


def test_cli_writes_the_report(tmp_path: Path):
    _write(_phantom(seed=5), tmp_path / "cohort" / "subset0" / "a.mhd")
    _write(_phantom(lung_hu=-800.0, seed=6), tmp_path / "cohort" / "subset1" / "b.mhd")
    _write(_phantom(seed=7), tmp_path / "real" / "c.mhd")
    done = _cli("--cohort", str(tmp_path / "cohort"), "--reference", str(tmp_path / "real"), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "median of 2 scans" in done.stdout and "median of 1 scans" in done.stdout
    report = json.loads((tmp_path / "out" / "realism.json").read_text())
    assert [s["scan"] for s in report["scans"]] == ["a", "b", "c"]
    assert report["scans"][0]["lung_volume_l"] == pytest.approx(_lung_volume_l(), rel=0.03)
    assert report["scans"][2]["w1_to_reference_hu"] is None  # a lone reference scan has no other to compare with
    lines = (tmp_path / "out" / "realism.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("group,scan,")
    for png in ("realism_slices.png", "realism_curves.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _one_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def test_cli_bad_input(tmp_path: Path):
    real = _write(_phantom(seed=8), tmp_path / "real" / "c.mhd")
    missing = tmp_path / "nothing"
    assert _one_error(_cli("--cohort", str(missing), "--reference", str(real), "--out", str(tmp_path / "o"))) == (
        f"error: {missing}: no such file or folder"
    )
    no_lungs = np.full(SHAPE, -1000.0)
    no_lungs[60:180, 60:180] = 40.0  # a body with no air inside
    body = _write(no_lungs, tmp_path / "body" / "body.mhd")
    line = _one_error(_cli("--cohort", str(body), "--reference", str(real), "--out", str(tmp_path / "o")))
    assert line.startswith(f"error: {body}: no lungs found")
    broken = tmp_path / "broken" / "x.mhd"
    broken.parent.mkdir()
    broken.write_text("NDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\nElementDataFile = x.raw\n")
    line = _one_error(_cli("--cohort", str(broken), "--reference", str(real), "--out", str(tmp_path / "o")))
    assert line.startswith(f"error: {broken}")
    assert not (tmp_path / "o").exists()  # refused before measuring, and no empty report folder left behind
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    out = blocker / "sub" / "o"
    assert _one_error(_cli("--cohort", str(real), "--reference", str(real), "--out", str(out))) == (
        f"error: {out}: cannot write the realism report there ({blocker} is a file, not a folder)"
    )


def test_scan_statistics_rejects_a_volume_without_lungs(tmp_path: Path):
    with pytest.raises(InputError, match="no lungs found"):
        scan_statistics(_write(np.full(SHAPE, 40.0) - 1040.0 * (np.arange(SHAPE[0]) < 5)[:, None, None], tmp_path / "x.mhd"))
