"""Global noise level (GNL) after Christianson et al., AJR 2015;205:W93-W99, made accurate for
correlated noise.

The published method takes the mode of the histogram of local standard deviations (square kernel
of ~6 mm) over soft tissue. That mode is biased low, and the bias depends on the noise texture:

* a kernel of n pixels gives the population variance (divisor n), and the mode of a chi
  distribution lies below its RMS: for white noise and n = 81 that is about -1.3 %;
* with correlated noise (every clinical reconstruction kernel, and more so iterative / deep
  learning reconstructions) the kernel holds far fewer independent samples: the local mean
  absorbs part of the noise and the distribution widens, so a 6 mm kernel reads 10-20 % low for a
  noise correlation length of ~1-2 pixels.

We therefore measure the noise texture in the same soft tissue (the autocorrelation of the
residual after removing a larger box mean, with that removal undone exactly by a small linear
solve), simulate noise with that texture, run the identical estimator on it, and divide by the
estimator's response. The correction is a property of the reconstruction kernel, so one factor
serves the whole series; it is reported so a physicist can see how large it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

log = logging.getLogger(__name__)

CHUNK = 16  # slices per block: keeps temporaries in cache and memory bounded for 300+ slices
NBINS = 400
RANGE_FACTOR = 4.0  # histogram spans 0 .. 4 x the series' typical local SD
SMOOTH_BINS = 2.0
ACF_STEP = 0.6  # stricter edge rejection where the noise texture is measured


@dataclass
class GNLResult:
    """Per-slice and series global noise level (HU) and how it was obtained."""

    per_slice: np.ndarray  # (frames,) HU, NaN where the slice had too little soft tissue
    valid_pixels: np.ndarray  # (frames,) kernel centres used
    value: float | None  # mean over slices with a value
    kernel_px: int
    correction: float  # multiplicative texture correction applied to every slice's mode
    correction_capped: bool = False
    acf: dict[str, float] = field(default_factory=dict)  # a few autocorrelation values, for the record
    step_limit: float = float("inf")  # HU; kernels next to a larger box-mean step were left out


def kernel_pixels(kernel_mm: float, spacing_mm: float) -> int:
    """Odd kernel side so the window is centred on its pixel."""
    k = max(3, int(round(kernel_mm / spacing_mm)))
    return k if k % 2 else k + 1


def local_mean_sd(img: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Box-filter local mean and SD (population, divisor k^2) over the last two axes.

    An offset is removed before squaring so float32 keeps its precision in air (-1000 HU).
    """
    size = (1, k, k) if img.ndim == 3 else (k, k)
    x = img.astype(np.float32, copy=True)
    x -= np.float32(50.0)
    m = ndi.uniform_filter(x, size=size, mode="reflect")
    x *= x
    m2 = ndi.uniform_filter(x, size=size, mode="reflect")
    var = m2
    var -= m * m
    np.maximum(var, 0, out=var)
    np.sqrt(var, out=var)
    m += np.float32(50.0)
    return m, var


def _step_contrast(mean: np.ndarray, k: int) -> np.ndarray:
    """Largest difference between the box means just left/right and just above/below each centre.

    The two boxes are adjacent to the centre kernel on either side, so any edge reaching into the
    kernel shows up as a large difference; on uniform noise it is a small, zero-mean number.
    """
    h = (k + 1) // 2
    out = np.full(mean.shape, np.inf, np.float32)
    dx = np.abs(mean[..., :, 2 * h:] - mean[..., :, :-2 * h])
    dy = np.abs(mean[..., 2 * h:, :] - mean[..., :-2 * h, :])
    core = out[..., h:-h, h:-h]
    np.maximum(dx[..., h:-h, :], dy[..., :, h:-h], out=core)
    return out


def tissue_centres(mean: np.ndarray, k: int, window: tuple[float, float], fov: np.ndarray | None = None,
                   step_limit: float = np.inf) -> np.ndarray:
    """Kernel centres in uniform soft tissue.

    The HU window is applied to the kernel mean, not to single pixels: at 20-40 HU noise a pixel
    window turns a 50 HU muscle into salt and pepper. Requiring the whole k x k neighbourhood to be
    inside keeps kernels off fat / bone boundaries, and ``step_limit`` (on ``_step_contrast``) drops
    kernels straddling soft-tissue edges inside the window (muscle 50 / viscera 35 / liver 60 HU),
    whose mean step would otherwise inflate the local SD.
    """
    inside = (mean >= window[0]) & (mean <= window[1])
    if fov is not None:
        inside &= fov
    if np.isfinite(step_limit):
        # the adjacent boxes see any boundary within a kernel width, fat and bone included
        inside &= _step_contrast(mean, k) <= step_limit
        return inside
    size = (1, k, k) if mean.ndim == 3 else (k, k)
    return ndi.minimum_filter(inside, size=size, mode="constant", cval=False)


def _mode(hist: np.ndarray, edges: np.ndarray) -> float:
    """Peak of a smoothed histogram, refined by a parabola through the top three bins."""
    h = ndi.gaussian_filter1d(hist.astype(np.float64), SMOOTH_BINS, mode="constant")
    i = int(np.argmax(h))
    width = edges[1] - edges[0]
    centre = edges[i] + width / 2
    if 0 < i < len(h) - 1:
        a, b, c = h[i - 1], h[i], h[i + 1]
        den = a - 2 * b + c
        if den < 0:
            centre += 0.5 * (a - c) / den * width
    return float(centre)


def _hist_edges(scale: float) -> np.ndarray:
    return np.linspace(0.0, RANGE_FACTOR * scale, NBINS + 1)


def _histograms(sd: np.ndarray, valid: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(frames, NBINS) histograms in one bincount: no per-slice Python work, no index gathering.

    Invalid and out-of-range pixels go to an extra overflow bin per slice that is dropped.
    """
    n = sd.shape[0]
    idx = sd * np.float32(NBINS / edges[-1])
    np.minimum(idx, np.float32(NBINS), out=idx)
    bins = idx.astype(np.int32)
    bins[~valid] = NBINS
    bins += (np.arange(n, dtype=np.int32) * (NBINS + 1))[:, None, None]
    counts = np.bincount(bins.ravel(), minlength=n * (NBINS + 1)).reshape(n, NBINS + 1)
    return counts[:, :NBINS]


def _crop(block: np.ndarray, above: float, pad: int) -> np.ndarray:
    """The block's bounding box of pixels above ``above`` (the patient), plus a margin: the filters
    then skip the air around the patient, a third to half of a typical slice."""
    obj = block > above
    rows = np.nonzero(obj.any(axis=(0, 2)))[0]
    cols = np.nonzero(obj.any(axis=(0, 1)))[0]
    if rows.size == 0:
        return block[:, :0, :0]
    r0, r1 = max(0, rows[0] - pad), min(block.shape[1], rows[-1] + pad + 1)
    c0, c1 = max(0, cols[0] - pad), min(block.shape[2], cols[-1] + pad + 1)
    return block[:, r0:r1, c0:c1]


def global_noise_level(pixels: np.ndarray, spacing_mm: float, window: tuple[float, float] = (0.0, 100.0),
                       kernel_mm: float = 6.0, min_pixels: int = 500, texture_correction: bool = True,
                       max_correction: float = 1.6, fov_below: float = -1500.0) -> GNLResult:
    """GNL of every slice of a (frames, rows, cols) HU volume, plus the series mean."""
    n = pixels.shape[0]
    k = kernel_pixels(kernel_mm, spacing_mm)

    # scale for the shared histogram bins: from a handful of slices, so every slice uses the same bins
    probe = np.unique(np.linspace(0, n - 1, min(n, 5)).round().astype(int))
    samples, steps = [], []
    for i in probe:
        m, sd = local_mean_sd(pixels[i], k)
        v = tissue_centres(m, k, window, pixels[i] > fov_below)
        samples.append(sd[v][::7])
        steps.append(_step_contrast(m, k)[v][::7])
    pooled = np.concatenate(samples) if samples else np.empty(0)
    if pooled.size < 50:
        return GNLResult(np.full(n, np.nan), np.zeros(n, int), None, k, 1.0)
    # edge rejection threshold: 3.5 robust SDs of the box-mean difference seen on uniform tissue
    step_limit = 3.5 * 1.4826 * float(np.median(np.concatenate(steps)))
    scale = float(np.median(pooled))
    if scale <= 0:
        scale = 1.0
    edges = _hist_edges(scale)

    hists = np.zeros((n, NBINS), np.int64)
    for s in range(0, n, CHUNK):
        block = _crop(pixels[s:s + CHUNK], window[0] - 300.0, 2 * k)
        if block.size == 0:
            continue
        m, sd = local_mean_sd(block, k)
        valid = tissue_centres(m, k, window, block > fov_below, step_limit)
        hists[s:s + CHUNK] = _histograms(sd, valid, edges)
    counts = hists.sum(axis=1)
    modes = np.full(n, np.nan)
    for i in range(n):
        if counts[i] >= min_pixels:
            modes[i] = _mode(hists[i], edges)

    factor, capped, acf = 1.0, False, {}
    if texture_correction and np.isfinite(modes).any():
        best = np.argsort(counts)[::-1][:4]
        rho = noise_autocorrelation(pixels, best, k, window, spacing_mm, fov_below, ACF_STEP * step_limit)
        factor = estimator_response(rho, k)
        if rho is not None:
            c = rho.shape[0] // 2
            acf = {"rho_row_1": float(rho[c, c + 1]), "rho_col_1": float(rho[c + 1, c]),
                   "rho_row_2": float(rho[c, c + 2]), "sum": float(rho.sum())}
        if factor > max_correction:
            log.warning("GNL texture correction %.2f capped at %.2f (anatomy in the soft-tissue mask?)",
                        factor, max_correction)
            factor, capped = max_correction, True
        factor = max(factor, 1.0) if rho is None else factor
    per_slice = modes * factor
    value = float(np.nanmean(per_slice)) if np.isfinite(per_slice).any() else None
    return GNLResult(per_slice, counts, value, k, float(factor), capped, acf, step_limit)


def noise_autocorrelation(pixels: np.ndarray, slices: np.ndarray, k: int, window: tuple[float, float],
                          spacing_mm: float, fov_below: float = -1500.0,
                          step_limit: float = np.inf) -> np.ndarray | None:
    """Normalised noise autocorrelation on a (2R+1)^2 lag grid, from uniform soft tissue.

    Residual e = x - box_K(x) removes anatomy slower than K pixels; the removal also distorts the
    covariance (C_e = C * h, h = (delta - a_K) * (delta - a_K)), which we invert exactly on the lag
    grid by a least-squares solve instead of pretending K is infinite.
    """
    r_lag = int(np.clip(round(4.0 / spacing_mm), 5, 9))
    big = 2 * k + 1
    num = None
    den = None
    for i in slices:
        x = pixels[int(i)].astype(np.float64)
        m, _ = local_mean_sd(pixels[int(i)], k)
        valid = tissue_centres(m, k, window, pixels[int(i)] > fov_below, step_limit)
        valid = ndi.minimum_filter(valid, size=big - k + 1, mode="constant", cval=False)
        if valid.sum() < 2000:
            continue
        e = x - ndi.uniform_filter(x, size=big, mode="reflect")
        rows, cols = np.nonzero(valid)
        r0, r1 = rows.min(), rows.max() + 1
        c0, c1 = cols.min(), cols.max() + 1
        w = valid[r0:r1, c0:c1].astype(np.float64)
        ew = e[r0:r1, c0:c1] * w
        shape = (r1 - r0 + r_lag, c1 - c0 + r_lag)
        fe = np.fft.rfft2(ew, shape)
        fw = np.fft.rfft2(w, shape)
        cee = np.fft.irfft2(fe * np.conj(fe), shape)
        cww = np.fft.irfft2(fw * np.conj(fw), shape)
        lags = np.arange(-r_lag, r_lag + 1)
        sub_e = cee[np.ix_(lags % shape[0], lags % shape[1])]
        sub_w = cww[np.ix_(lags % shape[0], lags % shape[1])]
        num = sub_e if num is None else num + sub_e
        den = sub_w if den is None else den + sub_w
    if num is None or den is None or np.any(den < 100):
        return None
    ce = num / den
    ce = 0.5 * (ce + ce[::-1, ::-1])
    # forward operator on the lag grid
    a = np.full((big, big), 1.0 / big**2)
    tri = np.convolve(np.full(big, 1.0 / big), np.full(big, 1.0 / big))
    h = -2.0 * np.pad(a, big // 2) + np.outer(tri, tri)
    hc = h.shape[0] // 2
    h[hc, hc] += 1.0
    size = 2 * r_lag + 1
    offs = np.stack(np.meshgrid(np.arange(size) - r_lag, np.arange(size) - r_lag, indexing="ij"), -1).reshape(-1, 2)
    diff = offs[:, None, :] - offs[None, :, :]
    op = h[diff[..., 0] + hc, diff[..., 1] + hc]
    try:
        c = np.linalg.solve(op, ce.reshape(-1))
    except np.linalg.LinAlgError:
        c, *_ = np.linalg.lstsq(op, ce.reshape(-1), rcond=None)
    c = c.reshape(size, size)
    if c[r_lag, r_lag] <= 0:
        return None
    return c / c[r_lag, r_lag]


def estimator_response(rho: np.ndarray | None, k: int, size: int = 512, seed: int = 20150601) -> float:
    """1 / (mode of the local-SD estimator on unit-variance noise with this autocorrelation)."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal((size, size))
    if rho is None:
        noise = white
    else:
        r = rho.shape[0] // 2
        acf = np.zeros((size, size))
        lags = np.arange(-r, r + 1) % size
        acf[np.ix_(lags, lags)] = rho
        nps = np.clip(np.fft.rfft2(acf).real, 0.0, None)
        nps /= nps.mean() if nps.mean() > 0 else 1.0
        noise = np.fft.irfft2(np.fft.rfft2(white) * np.sqrt(nps), (size, size))
    noise = noise.astype(np.float32)
    _, sd = local_mean_sd(noise + np.float32(50.0), k)
    inner = sd[k:-k, k:-k]
    truth = float(noise[k:-k, k:-k].std())
    edges = _hist_edges(float(np.median(inner)))
    hist = _histograms(inner[None], np.ones((1,) + inner.shape, bool), edges)[0]
    mode = _mode(hist, edges)
    return truth / mode if mode > 0 else 1.0
