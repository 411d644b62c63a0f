"""From a stored CR/DX image to the tensor the model was trained on, refusing what it was not trained on.

Real deployments receive laterals, hands, phantoms, thumbnails and inverted (MONOCHROME1) plates.
A classifier fed any of these still returns confident numbers, so every check here happens before
the model and ends in a reason a technologist can act on.

Whether an image is a frontal chest at all is decided in ``gating`` (tags first, then measured
image rules). Windowing and resizing follow the reference implementations exactly, so that the
same weights give the same probabilities as torchxrayvision's DICOM path (``read_xray_dcm`` with
``voi_lut=True``, ``XRayCenterCrop``, ``XRayResizer``) and as reproduce-chexnet's torchvision
transforms (``Resize(224)``, ImageNet normalisation); ``tests/test_cxr_parity.py`` checks both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image
from pydicom.multival import MultiValue
from scipy import ndimage, sparse

from pipelines.cxr.gating import ImageRefused, check, lung_contrast, tag
from pipelines.models import InputSpec

__all__ = ["Geometry", "ImageRefused", "Prepared", "lung_contrast", "prepare", "window"]

@dataclass
class Geometry:
    """Where the model input came from in the source image: crop origin (col, row), side, and scale."""

    rows: int
    cols: int
    x0: int
    y0: int
    side: int
    size: int

    def to_source(self, x: float, y: float) -> tuple[float, float]:
        """Model-input pixel (col, row) -> source pixel (col, row)."""
        s = self.side / self.size
        return self.x0 + (x + 0.5) * s - 0.5, self.y0 + (y + 0.5) * s - 0.5


@dataclass
class Prepared:
    tensor: np.ndarray  # (C, size, size) float32, normalised for the model
    display: np.ndarray  # (rows, cols) float32 in [0, 1], MONOCHROME2 polarity, windowed
    unit: np.ndarray  # (size, size) float32 in [0, 1] before normalisation (for checks and the LLM image)
    geometry: Geometry
    view: str
    view_source: str
    notes: list[str] = field(default_factory=list)
    #: Why this image is unusual but was read anyway (goes to the SR and the warnings), empty when typical.
    cautions: list[str] = field(default_factory=list)


def header_window(header: Any) -> tuple[float, float] | None:
    """This instance's first (WindowCenter, WindowWidth), or None."""
    if header is None:
        return None
    c, w = header.get("WindowCenter"), header.get("WindowWidth")
    if c is None or w is None:
        return None
    try:
        c = c[0] if isinstance(c, (list, tuple, MultiValue)) else c
        w = w[0] if isinstance(w, (list, tuple, MultiValue)) else w
        return float(c), float(w)
    except (TypeError, ValueError, IndexError):
        return None


def voi_lut(arr: np.ndarray, item: Any) -> np.ndarray:
    """Look values up in one VOI LUT item, scaled to [0, 1] by the LUT's bit depth.

    Done here rather than with pydicom's helper so that values outside the LUT's input range clamp
    to its first/last entry as PS3.3 C.11.2.1.2 says, instead of wrapping.
    """
    n, first, bits = (int(v) for v in item.LUTDescriptor)
    n = n or 65536
    data = item.LUTData
    lut = np.frombuffer(data, dtype="<u2" if bits > 8 else "u1") if isinstance(data, bytes) \
        else np.asarray(data, dtype=np.float64).ravel()
    lut = lut[:n]
    if first > 32767 and float(arr.min()) < 0:  # first value mapped is signed for signed data
        first -= 65536
    idx = np.clip(np.rint(arr).astype(np.int64) - first, 0, len(lut) - 1)
    return (lut[idx].astype(np.float32) / float(2 ** bits - 1)).clip(0.0, 1.0)


def stored_range(header: Any) -> tuple[float, float] | None:
    """The value range the stored bits can hold, after the Modality LUT (rescale), or None without BitsStored."""
    if header is None or header.get("BitsStored") is None:
        return None
    try:
        bits = int(header.BitsStored)
        if int(header.get("PixelRepresentation", 0) or 0):
            lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
        else:
            lo, hi = 0.0, 2.0 ** bits - 1
        slope = float(header.get("RescaleSlope", 1) or 1)
        inter = float(header.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return None
    a, b = lo * slope + inter, hi * slope + inter
    return (min(a, b), max(a, b)) if b != a else None


def linear_window(arr: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing to [0, 1]: LINEAR (the default), LINEAR_EXACT or SIGMOID.

    The LINEAR form (centre - 0.5, width - 1) is the one pydicom, and so torchxrayvision's DICOM
    reader, applies; using it too keeps ainode's model input equal to the reference's.
    """
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (arr - centre) / width))).astype(np.float32)
    if function != "LINEAR_EXACT":
        centre, width = centre - 0.5, width - 1.0
    return np.clip((arr - centre) / width + 0.5, 0.0, 1.0).astype(np.float32)


def window(pixels: np.ndarray, header: Any, fallback: tuple[float, float] | None) -> tuple[np.ndarray, str]:
    """Apply the VOI LUT or window the image says it wants, else its full stored range; returns [0, 1].

    The instance's own window wins over ``fallback`` (the series' first instance), since a series
    of radiographs may carry a different window per image. Without any window the full range of
    BitsStored is used, as torchxrayvision's reader does and as the 8-bit images both public models
    were trained on were read; only when the data fills less than half of that range (a 12-bit
    image in 16 stored bits, say) is a robust 0.5-99.5 percentile window used instead.
    """
    arr = pixels.astype(np.float32)
    fallback = header_window(header) or fallback
    if header is not None and "VOILUTSequence" in header and len(header.VOILUTSequence):
        try:
            out = voi_lut(arr, header.VOILUTSequence[0])
            if float(out.max()) > float(out.min()):
                return out, "VOI LUT"
        except Exception:  # a malformed LUT must not sink the study; fall back to window/percentiles
            pass
    if fallback is not None and fallback[1] > 1:
        c, w = fallback
        lo, hi = c - w / 2.0, c + w / 2.0
        # A window that covers (nearly) nothing of the actual data is a bad header value, not a choice.
        inside = float(np.mean((arr >= lo) & (arr <= hi)))
        if inside > 0.5:
            function = tag(header, "VOILUTFunction") or "LINEAR"
            return linear_window(arr, c, w, function), f"window C{c:g}/W{w:g}"
    lo, hi = np.percentile(arr, [0.5, 99.5])
    if hi <= lo:
        raise ImageRefused("image has no contrast (all pixels about the same value)")
    full = stored_range(header)
    if full is not None and (hi - lo) >= 0.5 * (full[1] - full[0]) and lo >= full[0] and hi <= full[1]:
        a, b = full
        return np.clip((arr - a) / (b - a), 0.0, 1.0), f"full stored range {a:g}-{b:g} (no window in the header)"
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0), "percentile window 0.5-99.5%"


@lru_cache(maxsize=32)
def _skimage_axis_matrix(n_in: int, size: int) -> sparse.csr_matrix:
    """(size, n_in) matrix = bilinear grid sampling (scipy ``zoom``, ``grid_mode``, zero outside) after the
    Gaussian anti-aliasing filter (scipy ``gaussian_filter1d``, truncate 4, zero padding) along one axis."""
    f = n_in / size
    if f > 1:
        sigma = (f - 1) / 2
        taps = np.arange(-int(4.0 * sigma + 0.5), int(4.0 * sigma + 0.5) + 1)
        k = np.exp(-0.5 * (taps / sigma) ** 2)
        k /= k.sum()
    else:
        taps, k = np.zeros(1, int), np.ones(1)
    coords = (np.arange(size) + 0.5) * f - 0.5
    i0 = np.floor(coords).astype(int)
    w1 = coords - i0
    rows, cols, vals = [], [], []
    for j, w in ((i0, 1.0 - w1), (i0 + 1, w1)):  # the two bilinear neighbours, zero outside the image
        for t, kt in zip(taps, k):  # each neighbour's filtered value: Gaussian taps, zero outside the image
            ok = (j >= 0) & (j < n_in) & (j + t >= 0) & (j + t < n_in)
            rows.append(np.nonzero(ok)[0])
            cols.append(j[ok] + t)
            vals.append(w[ok] * kt)
    m = sparse.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(size, n_in))
    return m.tocsr().astype(np.float32)  # duplicates summed; ~4 sigma + 2 taps per output row


def resize_like_skimage(x: np.ndarray, size: int) -> np.ndarray:
    """``skimage.transform.resize(x, (size, size), mode="constant", preserve_range=True)``, as torchxrayvision's
    ``XRayResizer`` calls it: Gaussian anti-aliasing (sigma = (factor - 1) / 2, zero padding in model
    units), bilinear sampling on the pixel grid, clipping to the input range.

    Both steps are linear and separable, so they are done as two sparse matrix products (rows, then
    columns): SciPy's numbers for a fraction of the work of filtering every source pixel. A box
    reduction first (what this module used to do) left a last box one pixel wide on sizes like 1841
    and moved probabilities by up to 0.03 against the reference.
    """
    x = np.asarray(x, np.float32)
    rows, cols = x.shape
    if rows <= size and cols <= size:  # skimage filters only when it shrinks
        out = ndimage.zoom(x, (size / rows, size / cols), order=1, mode="grid-constant", cval=0.0, grid_mode=True)
    else:
        out = np.asarray((_skimage_axis_matrix(cols, size) @ (_skimage_axis_matrix(rows, size) @ x).T).T)
    return np.clip(out, min(float(x.min()), 0.0), max(float(x.max()), 0.0)).astype(np.float32)


def resize_like_pil(img: np.ndarray, size: int) -> np.ndarray:
    """PIL's antialiased bilinear resize, which torchvision's ``Resize`` applies to the PIL images CheXNet reads."""
    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    return np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.float32).clip(0, 1)


def to_model_input(display: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, np.ndarray, Geometry]:
    rows, cols = display.shape
    if spec.crop == "center_square":
        side = min(rows, cols)
        y0, x0 = rows // 2 - side // 2, cols // 2 - side // 2  # torchxrayvision XRayCenterCrop
        crop = display[y0: y0 + side, x0: x0 + side]
    else:
        side, y0, x0, crop = max(rows, cols), 0, 0, display
        if rows != cols:  # pad to square with black so geometry stays a single scale
            sq = np.zeros((side, side), np.float32)
            sq[:rows, :cols] = display
            crop = sq
    n = spec.normalisation
    if n.kind == "xrv":
        lo, hi = n.range or (-1024.0, 1024.0)
        x = resize_like_skimage(np.asarray(crop, np.float32) * (hi - lo) + lo, spec.size)
        unit = ((x - lo) / (hi - lo)).astype(np.float32)
        chans = np.repeat(x[None], spec.channels, axis=0)
    else:
        unit = resize_like_pil(crop, spec.size)
        if n.kind == "imagenet":
            mean = np.asarray(n.mean or [0.485, 0.456, 0.406], np.float32)[: spec.channels]
            std = np.asarray(n.std or [0.229, 0.224, 0.225], np.float32)[: spec.channels]
            chans = (np.repeat(unit[None], spec.channels, axis=0) - mean[:, None, None]) / std[:, None, None]
        else:
            chans = np.repeat(unit[None], spec.channels, axis=0)
    return chans.astype(np.float32), unit, Geometry(rows, cols, x0, y0, side, spec.size)


def prepare(pixels: np.ndarray, header: Any, photometric: str, window_hint: tuple[float, float] | None,
            spec: InputSpec, *, min_size: int = 256, min_layout: float | None = None,
            typical_layout: float | None = None) -> Prepared:
    """One 2D image -> model tensor, or ImageRefused with the reason."""
    if pixels.ndim != 2:
        raise ImageRefused(f"expected one greyscale frame; got array of shape {pixels.shape}")
    rows, cols = pixels.shape
    if min(rows, cols) < min_size:
        raise ImageRefused(f"image is {cols}x{rows} pixels; at least {min_size} on the short side is needed")
    if photometric.upper() not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageRefused(f"photometric interpretation {photometric} is not greyscale")
    unit01, how = window(pixels, header, window_hint)
    notes = [how]
    if photometric.upper() == "MONOCHROME1":
        unit01 = 1.0 - unit01  # MONOCHROME1 shows low values white; the model expects air dark
        notes.append("MONOCHROME1 inverted")
    kw = {k: v for k, v in (("min_layout", min_layout), ("typical_layout", typical_layout)) if v is not None}
    gate = check(header, unit01, **kw)
    notes.append(f"view {gate.view} from {gate.view_source}")
    notes.append("chest from " + gate.chest_source)
    tensor, unit, geom = to_model_input(unit01, spec)
    return Prepared(tensor, unit01, unit, geom, gate.view, gate.view_source, notes, gate.notes)
