"""Imaging physics of one synthetic scan: reconstruction kernel, dose-dependent noise with a CT noise-power spectrum,
slice profile, streaks from bone and cardiac motion blur.

Filtered back-projection shapes a CT image in two ways, both modelled here in the in-plane frequency domain
(cycles/mm, per slice):

- the *kernel's modulation transfer function* ``H(f) = G(f; psf) * (1 + edge_gain * (1 - G(f; 1 mm)))``: a Gaussian
  blur (soft kernels blur more) times an unsharp-mask boost of the mid frequencies (sharp "lung" kernels enhance
  edges, which overshoot: a dark rim beside a vessel, a bright one inside the pleura);
- the *noise-power spectrum* ``NPS(f) ~ (|f| + f0) * H(f) ** 2``: quantum noise through the ramp filter and the
  kernel, so CT noise is band-pass (little power at the lowest frequencies, a peak that moves up with the kernel's
  sharpness, nothing above the kernel's cut-off), not white. Its amplitude follows the dose: the standard deviation
  is ``12 HU * kernel_gain / sqrt(dose * thickness / 1.25 mm)``, with ``kernel_gain`` the kernel's noise relative to
  the softest kernel's.

Along z each slice averages the object over its thickness (the rectangular slice profile of
:func:`~bundle.synthetic.raster.paint_capsules`'s sub-slices); the noise of overlapping slices (thickness
twice the spacing) is correlated accordingly: each slice's noise is the mean of ``thickness / spacing`` consecutive
independent noise planes, so neighbours share half of theirs (correlation 0.5) and slices that do not overlap are
independent.

MONAI's and scipy's filters act in the spatial domain on whole arrays; the kernel and the NPS are defined in the
frequency domain, so this module applies them with ``scipy.fft`` per chunk of slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

from bundle.synthetic.raster import ScanGrid

__all__ = ["Scanner", "kernel_mtf", "noise_spectrum", "reconstruct", "add_bone_streaks", "cardiac_blur", "radial_nps"]

EDGE_SIGMA_MM = 1.0  # width of the unsharp mask of edge-enhancing kernels
NPS_FLOOR = 0.02  # cycles/mm added to the ramp: real NPS does not quite vanish at zero frequency
REFERENCE_NOISE_HU = 12.0  # soft kernel, standard dose, 1.25 mm slices
SOFTEST = (0.65, 0.0)  # (psf_mm, edge_gain) of the softest kernel drawn, the reference of kernel_gain


def kernel_mtf(f: np.ndarray, psf_mm: float, edge_gain: float) -> np.ndarray:
    """Modulation transfer function of a reconstruction kernel at spatial frequencies ``f`` (cycles/mm)."""
    gauss = np.exp(-2.0 * np.pi**2 * psf_mm**2 * f**2)
    return gauss * (1.0 + edge_gain * (1.0 - np.exp(-2.0 * np.pi**2 * EDGE_SIGMA_MM**2 * f**2)))


def noise_spectrum(f: np.ndarray, psf_mm: float, edge_gain: float) -> np.ndarray:
    """Shape of the noise-power spectrum (unnormalised) at frequencies ``f`` (cycles/mm): ramp times kernel squared."""
    return (np.abs(f) + NPS_FLOOR) * kernel_mtf(f, psf_mm, edge_gain) ** 2


def _kernel_gain(psf_mm: float, edge_gain: float) -> float:
    """Noise standard deviation of a kernel relative to the softest one's (same dose), over 0-1 cycles/mm in 2D."""
    f = np.linspace(0.0, 1.0, 512)
    power = lambda p, g: np.sum(noise_spectrum(f, p, g) * f)  # noqa: E731 - radial integral, 2 pi f df
    return float(np.sqrt(power(psf_mm, edge_gain) / power(*SOFTEST)))


@dataclass(frozen=True)
class Scanner:
    """Acquisition and reconstruction of one scan.

    ``psf_mm`` and ``edge_gain``: the kernel (see :func:`kernel_mtf`); ``sharpness`` in [0, 1] the draw they came from
    (0 = soft tissue kernel, 1 = sharp lung kernel). ``dose`` relative to a standard-dose chest CT (0.2 = low-dose
    screening); ``noise_hu`` the resulting noise standard deviation. ``streak_hu`` the amplitude of the streaks from
    bone; ``cardiac_blur_mm`` the in-plane blur of heart motion at the heart's border.
    """

    sharpness: float
    psf_mm: float
    edge_gain: float
    dose: float
    noise_hu: float
    streak_hu: float
    cardiac_blur_mm: float

    @classmethod
    def draw(cls, rng: np.random.Generator, thickness_mm: float) -> Scanner:
        """A kernel (soft to sharp), a dose (log-uniform 0.2-2 of standard) and the artefacts of one scan."""
        sharpness = float(rng.uniform(0.0, 1.0))
        psf_mm = 0.65 - 0.35 * sharpness
        edge_gain = 1.2 * sharpness**1.5
        dose = float(np.exp(rng.uniform(np.log(0.2), np.log(2.0))))
        noise = REFERENCE_NOISE_HU * _kernel_gain(psf_mm, edge_gain) / np.sqrt(dose * thickness_mm / 1.25)
        return cls(
            sharpness=sharpness,
            psf_mm=psf_mm,
            edge_gain=edge_gain,
            dose=dose,
            noise_hu=float(np.clip(noise, 5.0, 120.0)),
            streak_hu=float(rng.uniform(2.0, 10.0)),
            cardiac_blur_mm=float(rng.uniform(0.5, 2.5)),
        )


def _frequencies(rows: int, cols: int, spacing_mm: float, full: bool = False) -> np.ndarray:
    """Radial in-plane frequency (cycles/mm) of each coefficient of ``rfft2`` (or with ``full``, of ``fft2``) over a
    ``(rows, cols)`` slice of square pixels of ``spacing_mm``."""
    fy = np.fft.fftfreq(rows, d=spacing_mm)[:, None]
    fx = (np.fft.fftfreq if full else np.fft.rfftfreq)(cols, d=spacing_mm)[None, :]
    return np.hypot(fy, fx)


def reconstruct(
    volume: np.ndarray, grid: ScanGrid, scanner: Scanner, rng: np.random.Generator, chunk: int = 16
) -> None:
    """Filter ``volume`` ``(K, J, I)`` (HU) with the kernel and add noise of the kernel's NPS, in place.

    Each slice is edge-padded to a size the FFT factors well (the grids' sizes may be prime) and filtered by the MTF;
    the noise is drawn directly as Fourier coefficients (complex Gaussian, the transform of white noise) shaped by
    ``sqrt(NPS)`` and scaled so that its standard deviation is ``scanner.noise_hu`` (Parseval over the two-sided
    grid). Along z, each slice's noise is the mean of ``m = round(thickness / spacing)`` consecutive independent
    planes (the slice profile). Works ``chunk`` slices at a time to bound memory on full-size scans.
    """
    n_k, n_j, n_i = volume.shape
    rows, cols = fft.next_fast_len(n_j, real=True), fft.next_fast_len(n_i, real=True)
    f = _frequencies(rows, cols, grid.spacing[0])
    mtf = kernel_mtf(f, scanner.psf_mm, scanner.edge_gain).astype(np.float32)
    variance = np.mean(
        noise_spectrum(_frequencies(rows, cols, grid.spacing[0], full=True), scanner.psf_mm, scanner.edge_gain)
    )
    # irfft2 divides by rows * cols; a unit white field's coefficients have E|X|^2 = rows * cols.
    amplitude = np.sqrt(noise_spectrum(f, scanner.psf_mm, scanner.edge_gain) / variance * rows * cols / 2.0)
    amplitude = (scanner.noise_hu * amplitude).astype(np.float32)
    m = max(1, int(round(grid.slice_thickness / grid.spacing[2])))
    planes = np.empty((min(chunk, n_k) + m - 1,) + f.shape + (2,), dtype=np.float32)
    for k0 in range(0, n_k, chunk):
        part = volume[k0 : k0 + chunk]
        count = len(part)
        # Noise planes are drawn in order, carrying the m - 1 shared with the previous chunk, so the result does not
        # depend on ``chunk``.
        if k0 == 0:
            rng.standard_normal(dtype=np.float32, out=planes[: count + m - 1])
        else:
            planes[: m - 1] = planes[chunk : chunk + m - 1]
            rng.standard_normal(dtype=np.float32, out=planes[m - 1 : count + m - 1])
        white = planes[: count + m - 1].view(np.complex64)[..., 0]
        noise = white[:count].copy()
        for shift in range(1, m):
            noise += white[shift : shift + count]
        noise *= amplitude / np.float32(np.sqrt(m))
        padded = np.pad(part, ((0, 0), (0, rows - n_j), (0, cols - n_i)), mode="edge")
        spectrum = fft.rfft2(padded, workers=1)
        spectrum *= mtf
        spectrum += noise
        part[...] = fft.irfft2(spectrum, s=(rows, cols), workers=1)[:, :n_j, :n_i]


def add_bone_streaks(
    volume: np.ndarray, grid: ScanGrid, centre: tuple[float, float], amplitude_hu: float, rng: np.random.Generator
) -> None:
    """Add mild streaks from bone to ``volume`` ``(K, J, I)`` in place.

    Photon starvation and beam hardening along the rays that cross the most bone leave thin bright and dark lines
    through the dense structures, mostly near-horizontal (shoulders, spine and ribs seen side to side). Modelled as
    six lines through ``centre`` (world ``x, y`` mm, the vertebral body) per key frame, with angles near horizontal and
    alternating signs, fading away from the centre; key frames every 15 mm along z are interpolated linearly, so
    streaks change slowly between neighbouring slices as on a real scan.
    """
    x = (grid.axis(0)[None, :] - centre[0]).astype(np.float32)
    y = (grid.axis(1)[:, None] - centre[1]).astype(np.float32)
    z = grid.axis(2)
    frames = np.arange(z[0], z[-1] + 15.0, 15.0)
    patterns = np.zeros((len(frames),) + volume.shape[1:], dtype=np.float32)
    for pattern in patterns:
        angles = rng.normal(0.0, 0.35, size=6) + rng.choice([0.0, np.pi / 2], p=[0.8, 0.2], size=6)
        offsets = rng.normal(0.0, 20.0, size=6)
        signs = np.where(np.arange(6) % 2 == 0, 1.0, -1.0) * rng.uniform(0.5, 1.0, size=6)
        for angle, offset, sign in zip(angles, offsets, signs):
            across = x * np.sin(angle) - y * np.cos(angle) - offset
            along = x * np.cos(angle) + y * np.sin(angle)
            pattern += (sign * amplitude_hu) * np.exp(-0.5 * (across / 1.0) ** 2 - np.abs(along) / 80.0)
    position = np.clip((z - frames[0]) / 15.0, 0.0, len(frames) - 1.000001)
    lo = np.floor(position).astype(int)
    weight = (position - lo).astype(np.float32)
    for k in range(volume.shape[0]):
        volume[k] += (1.0 - weight[k]) * patterns[lo[k]] + weight[k] * patterns[lo[k] + 1]


def radial_nps(noise: np.ndarray, spacing_mm: float, bins: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged noise-power spectrum of noise-only slices ``(K, J, I)`` on a square in-plane grid.

    Returns ``(frequency, power)``: bin centres (cycles/mm, up to Nyquist) and the mean ``|FFT|**2`` in each bin.
    """
    power = np.mean(np.abs(np.fft.rfft2(noise - noise.mean(axis=(1, 2), keepdims=True))) ** 2, axis=0)
    f = np.hypot(
        np.fft.fftfreq(noise.shape[1], d=spacing_mm)[:, None], np.fft.rfftfreq(noise.shape[2], d=spacing_mm)[None, :]
    )
    edges = np.linspace(0.0, 0.5 / spacing_mm, bins + 1)
    which = np.digitize(f.ravel(), edges) - 1
    keep = (which >= 0) & (which < bins)
    total = np.bincount(which[keep], weights=power.ravel()[keep], minlength=bins)
    counts = np.maximum(np.bincount(which[keep], minlength=bins), 1)
    return 0.5 * (edges[1:] + edges[:-1]), total / counts


def cardiac_blur(slice_hu: np.ndarray, weight: np.ndarray, blur_px: float) -> None:
    """Blend ``slice_hu`` ``(J, I)`` towards its Gaussian blur (``blur_px`` pixels) by ``weight`` in [0, 1], in place:
    the heart moves during the rotation, so its border and the lung beside it are smeared."""
    rows, cols = np.nonzero(weight > 0.01)
    if not len(rows):
        return
    pad = int(np.ceil(3 * blur_px))
    r0, r1 = max(rows.min() - pad, 0), rows.max() + pad + 1
    c0, c1 = max(cols.min() - pad, 0), cols.max() + pad + 1
    view = slice_hu[r0:r1, c0:c1]
    w = weight[r0:r1, c0:c1]
    view += w * (ndimage.gaussian_filter(view, blur_px, mode="nearest") - view)
