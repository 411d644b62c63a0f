"""Series pixels -> model tensors exactly as the manifest describes, as a public function so it can be checked.

The order is fixed and documented because models are sensitive to it: (1) each HU window maps the
stored values to [0, 1] (``clip(x, c - w/2, c + w/2)`` then ``(x - (c - w/2)) / w``) at native
resolution; (2) the central square is cropped when ``input.crop`` is ``center_square``; (3) each
windowed plane is resized to ``input.size`` with PIL's bilinear filter (antialiased when shrinking);
(4) neighbouring-slice context is gathered (edges repeat the first / last slice) and channels are
stacked in ``channel_order``; (5) ``input.normalisation`` is applied per channel.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image

from pipelines.base import SeriesInput
from pipelines.models import InputSpec

from .spec import ClassifierSpec, Window


def apply_window(pixels: np.ndarray, window: Window) -> np.ndarray:
    lo = window.center - window.width / 2.0
    return ((np.clip(pixels, lo, lo + window.width) - lo) / window.width).astype(np.float32)


def _autoscale(pixels: np.ndarray, photometric: str) -> np.ndarray:
    """No windows given (radiographs): robust min-max to [0, 1], MONOCHROME1 inverted so bone is bright."""
    lo, hi = np.percentile(pixels, [0.5, 99.5], axis=(-2, -1), keepdims=True)
    out = np.clip((pixels - lo) / np.maximum(hi - lo, 1e-6), 0, 1).astype(np.float32)
    return 1.0 - out if photometric == "MONOCHROME1" else out


def _square(planes: np.ndarray, crop: str) -> np.ndarray:
    rows, cols = planes.shape[-2:]
    if crop != "center_square" or rows == cols:
        return planes
    side = min(rows, cols)
    y0, x0 = (rows - side) // 2, (cols - side) // 2
    return planes[..., y0:y0 + side, x0:x0 + side]


def _resize(planes: np.ndarray, size: int) -> np.ndarray:
    """(..., rows, cols) -> (..., size, size) with PIL bilinear on float32 planes."""
    if planes.shape[-2:] == (size, size):
        return planes.astype(np.float32, copy=False)
    flat = planes.reshape(-1, *planes.shape[-2:])
    out = np.empty((flat.shape[0], size, size), np.float32)
    for i, p in enumerate(flat):
        img = Image.fromarray(np.ascontiguousarray(p, dtype=np.float32), mode="F")
        out[i] = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32)
    return out.reshape(*planes.shape[:-2], size, size)


def normalise(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> model input, following ``pipelines.models.Normalisation``."""
    n = spec.normalisation
    if n.kind == "xrv":
        lo, hi = n.range or (-1024.0, 1024.0)
        return (x * (hi - lo) + lo).astype(np.float32)
    if n.kind == "imagenet":
        c = x.shape[1]
        mean = np.resize(np.asarray(n.mean or [0.485, 0.456, 0.406], np.float32), c)
        std = np.resize(np.asarray(n.std or [0.229, 0.224, 0.225], np.float32), c)
        return ((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    if n.range is not None:
        lo, hi = n.range
        return (x * (hi - lo) + lo).astype(np.float32)
    return x.astype(np.float32, copy=False)


def windowed_planes(series: SeriesInput, spec: ClassifierSpec, input_spec: InputSpec,
                    frames: np.ndarray | None = None) -> np.ndarray:
    """(windows, len(frames), size, size) in [0, 1]: steps 1-3 for the given frame indices (default all).

    Works on a subset so a 500-slice series never holds every window at native resolution at once.
    """
    if series.pixels is None or series.pixels.ndim != 3:
        raise ValueError(f"series {series.series_uid} has no greyscale pixel data")
    idx = np.arange(series.pixels.shape[0]) if frames is None else np.asarray(frames)
    px = series.pixels[idx].astype(np.float32, copy=False)
    if spec.windows:
        planes = np.stack([apply_window(px, w) for w in spec.windows])
    else:
        planes = _autoscale(px, series.photometric)[None]
    return _resize(_square(planes, input_spec.crop), input_spec.size)


def stack_context(planes: np.ndarray, spec: ClassifierSpec, centres: np.ndarray | None = None,
                  first: int = 0, n_total: int | None = None) -> np.ndarray:
    """(windows, frames, H, W) -> (len(centres), channels, H, W) with neighbouring slices as extra channels.

    ``planes`` holds frames ``first .. first + planes.shape[1] - 1`` of a series of ``n_total`` frames;
    ``centres`` are absolute frame indices (default: all frames in ``planes``).
    """
    n_total = planes.shape[1] if n_total is None else n_total
    centres = np.arange(first, first + planes.shape[1]) if centres is None else np.asarray(centres)
    idx = np.clip(centres[:, None] + np.asarray(spec.context)[None, :], 0, n_total - 1) - first  # (F, K)
    gathered = planes[:, idx]  # (W, F, K, H, W)
    if spec.channel_order == "window_major":
        out = gathered.transpose(1, 0, 2, 3, 4)  # (F, W, K, H, W)
    else:
        out = gathered.transpose(1, 2, 0, 3, 4)  # (F, K, W, H, W)
    return np.ascontiguousarray(out.reshape(len(centres), -1, *planes.shape[-2:]))


def iter_batches(series: SeriesInput, spec: ClassifierSpec, input_spec: InputSpec, batch_size: int
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """(first frame index, model-ready batch) over the series, windowing only the frames each batch needs."""
    assert series.pixels is not None
    n = series.pixels.shape[0]
    lo_off, hi_off = min(spec.context), max(spec.context)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        first, last = max(0, start + lo_off), min(n - 1, stop - 1 + hi_off)
        planes = windowed_planes(series, spec, input_spec, np.arange(first, last + 1))
        batch = stack_context(planes, spec, np.arange(start, stop), first=first, n_total=n)
        yield start, normalise(batch, input_spec)


def preprocess(series: SeriesInput, spec: ClassifierSpec, input_spec: InputSpec) -> np.ndarray:
    """The exact (frames, channels, size, size) float32 input the model receives for this series.

    The documented hook for checking preprocessing: ``ClassifierPipeline.run`` feeds ONNX Runtime
    the batches of ``iter_batches``, whose concatenation is this array.
    """
    return np.concatenate([b for _, b in iter_batches(series, spec, input_spec, spec.batch_size)])
