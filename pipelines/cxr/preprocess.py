"""From a stored CR/DX image to the tensor the model was trained on, refusing what it was not trained on.

Real deployments receive laterals, hands, phantoms, thumbnails and inverted (MONOCHROME1) plates.
A classifier fed any of these still returns confident numbers, so every check here happens before
the model and ends in a reason a technologist can act on.

View detection without a ViewPosition tag (documented heuristic): a frontal chest radiograph is
roughly mirror-symmetric about the spine, a lateral is not. We correlate the windowed, downsampled
image with its left-right mirror (after centring on the column of greatest symmetry within the
central third); below ``min_symmetry`` (default 0.70; the RG1 PA plate scores 0.86) the view is
treated as lateral. Portrait or near-square aspect ratios (0.6-1.7) are required of frontal views
too. This misjudges severely rotated or scoliotic frontals; the tag, when present, always wins.

Chest check without a chest BodyPartExamined (documented heuristic, on the image at MONOCHROME2
polarity): on a frontal chest (1) the two lung fields (left and right of centre, upper-middle height)
are darker than the mediastinum/spine column between them by ``min_lung_contrast``, (2) each lung
field lies in the darker half of the image (mean percentile rank <= 0.45), and (3) the
subdiaphragmatic band at the bottom is brighter than the lungs. The RG1 PA plate scores contrast
0.24, ranks 0.26/0.22, band +0.25; a head CT slice relabelled DX scores 0.09, 0.64/0.73, 0.00 and is
refused; so is the same chest with its polarity wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pydicom.multival import MultiValue

from pipelines.models import InputSpec

CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "TORSO", "RIB", "PORT CHEST", "CHEST_LAT", "HEART")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LLO", "RLO")
FRONTAL_VIEWS = ("PA", "AP")


class ImageRefused(Exception):
    """This image cannot go to the model; the message says why in words for the status page."""


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


def _tag(header: Any, keyword: str) -> str:
    v = header.get(keyword, "") if header is not None else ""
    return str(v or "").strip().upper()


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


def window(pixels: np.ndarray, header: Any, fallback: tuple[float, float] | None) -> tuple[np.ndarray, str]:
    """Apply the VOI LUT or window the image says it wants, else a robust percentile window; returns [0, 1].

    The instance's own window wins over ``fallback`` (the series' first instance), since a series
    of radiographs may carry a different window per image.
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
            return np.clip((arr - lo) / (hi - lo), 0.0, 1.0), f"window C{c:g}/W{w:g}"
    lo, hi = np.percentile(arr, [0.5, 99.5])
    if hi <= lo:
        raise ImageRefused("image has no contrast (all pixels about the same value)")
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0), "percentile window 0.5-99.5%"


def _small(img: np.ndarray, n: int = 128) -> np.ndarray:
    return np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((n, n), Image.BILINEAR))


def symmetry(display: np.ndarray) -> float:
    """Best left-right mirror correlation over axis shifts in the central third (1 = mirror-symmetric)."""
    s = _small(display)
    n = s.shape[1]
    best = -1.0
    for shift in range(-n // 6, n // 6 + 1, 2):
        a = np.roll(s, -shift, axis=1)[:, n // 8: n - n // 8]
        b = a[:, ::-1]
        a0, b0 = a - a.mean(), b - b.mean()
        den = float(np.sqrt((a0 * a0).sum() * (b0 * b0).sum()))
        if den > 0:
            best = max(best, float((a0 * b0).sum() / den))
    return best


def lung_contrast(display: np.ndarray) -> float:
    """Mediastinum-column mean minus lung-field mean on a frontal layout (positive on a chest radiograph)."""
    s = _small(display)
    n = s.shape[0]
    rows = slice(int(0.25 * n), int(0.65 * n))
    left = s[rows, int(0.15 * n): int(0.38 * n)]
    right = s[rows, int(0.62 * n): int(0.85 * n)]
    mid = s[rows, int(0.44 * n): int(0.56 * n)]
    return float(mid.mean() - 0.5 * (left.mean() + right.mean()))


def classify_view(header: Any, display: np.ndarray, min_symmetry: float) -> tuple[str, str]:
    """('PA'|'AP'|'FRONTAL'|'LATERAL', how we know)."""
    vp = _tag(header, "ViewPosition")
    if vp in FRONTAL_VIEWS:
        return vp, "ViewPosition"
    if vp in LATERAL_VIEWS:
        return "LATERAL", "ViewPosition"
    if header is not None and "ViewCodeSequence" in header and len(header.ViewCodeSequence):
        meaning = str(header.ViewCodeSequence[0].get("CodeMeaning", "")).lower()
        if "lateral" in meaning:
            return "LATERAL", "ViewCodeSequence"
        if "postero-anterior" in meaning or "antero-posterior" in meaning or "frontal" in meaning:
            return ("AP" if "antero-posterior" in meaning else "PA"), "ViewCodeSequence"
    keys = ("SeriesDescription", "ProtocolName", "AcquisitionDeviceProcessingDescription")
    text = " ".join(_tag(header, k) for k in keys)
    words = set(text.replace("/", " ").replace("_", " ").split())
    if words & {"LAT", "LATERAL", "LL", "RL"}:
        return "LATERAL", "series description"
    rows, cols = display.shape
    aspect = rows / cols
    if not 0.6 <= aspect <= 1.7:
        return "LATERAL", f"image heuristic (aspect {aspect:.2f})"
    sym = symmetry(display)
    if sym < min_symmetry:
        return "LATERAL", f"image heuristic (left-right symmetry {sym:.2f} < {min_symmetry})"
    return "FRONTAL", f"image heuristic (left-right symmetry {sym:.2f})"


def chest_likeness(display: np.ndarray) -> dict[str, float]:
    """The three numbers the chest heuristic uses (see the module docstring)."""
    s = _small(display)
    n = s.shape[0]
    rows = slice(int(0.25 * n), int(0.65 * n))
    left = s[rows, int(0.15 * n): int(0.38 * n)]
    right = s[rows, int(0.62 * n): int(0.85 * n)]
    flat = np.sort(s.ravel())

    def rank(a: np.ndarray) -> float:
        return float(np.searchsorted(flat, a.ravel()).mean() / flat.size)

    band = s[int(0.8 * n): int(0.95 * n), int(0.3 * n): int(0.7 * n)]
    return {"contrast": lung_contrast(display), "rank_left": rank(left), "rank_right": rank(right),
            "below_diaphragm": float(band.mean() - 0.5 * (left.mean() + right.mean()))}


def check_body_part(header: Any, display: np.ndarray, min_lung_contrast: float) -> str:
    bp = _tag(header, "BodyPartExamined")
    if bp:
        if any(k in bp for k in CHEST_BODY_PARTS):
            return f"BodyPartExamined {bp}"
        raise ImageRefused(f"BodyPartExamined is {bp!r}, not chest; this pipeline reads chest radiographs only")
    f = chest_likeness(display)
    desc = (f"lung/mediastinum contrast {f['contrast']:.2f}, lung ranks {f['rank_left']:.2f}/{f['rank_right']:.2f}, "
            f"below-diaphragm {f['below_diaphragm']:+.2f}")
    if f["contrast"] < min_lung_contrast or max(f["rank_left"], f["rank_right"]) > 0.45 \
            or f["below_diaphragm"] < min_lung_contrast:
        raise ImageRefused(f"no BodyPartExamined and the image does not look like a frontal chest radiograph ({desc})")
    return f"image heuristic ({desc})"


def to_model_input(display: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, np.ndarray, Geometry]:
    rows, cols = display.shape
    if spec.crop == "center_square":
        side = min(rows, cols)
        y0, x0 = (rows - side) // 2, (cols - side) // 2
        crop = display[y0: y0 + side, x0: x0 + side]
    else:
        side, y0, x0, crop = max(rows, cols), 0, 0, display
        if rows != cols:  # pad to square with black so geometry stays a single scale
            sq = np.zeros((side, side), np.float32)
            sq[:rows, :cols] = display
            crop = sq
    img = Image.fromarray(np.ascontiguousarray(crop, dtype=np.float32), mode="F")
    # Reduce in two steps: a box filter avoids aliasing when a 2000-pixel plate becomes 224.
    if side > 2 * spec.size:
        img = img.reduce(max(1, side // (2 * spec.size)))
    unit = np.asarray(img.resize((spec.size, spec.size), Image.BILINEAR), dtype=np.float32).clip(0, 1)
    n = spec.normalisation
    if n.kind == "xrv":
        lo, hi = n.range or (-1024.0, 1024.0)
        x = unit * (hi - lo) + lo
        chans = np.repeat(x[None], spec.channels, axis=0)
    elif n.kind == "imagenet":
        mean = np.asarray(n.mean or [0.485, 0.456, 0.406], np.float32)[: spec.channels]
        std = np.asarray(n.std or [0.229, 0.224, 0.225], np.float32)[: spec.channels]
        chans = (np.repeat(unit[None], spec.channels, axis=0) - mean[:, None, None]) / std[:, None, None]
    else:
        chans = np.repeat(unit[None], spec.channels, axis=0)
    return chans.astype(np.float32), unit, Geometry(rows, cols, x0, y0, side, spec.size)


def prepare(pixels: np.ndarray, header: Any, photometric: str, window_hint: tuple[float, float] | None,
            spec: InputSpec, *, min_size: int = 256, min_symmetry: float = 0.70,
            min_lung_contrast: float = 0.05) -> Prepared:
    """One 2D image -> model tensor, or ImageRefused with the reason."""
    if pixels.ndim != 2:
        raise ImageRefused(f"expected one greyscale frame; got array of shape {pixels.shape}")
    rows, cols = pixels.shape
    if min(rows, cols) < min_size:
        raise ImageRefused(f"image is {cols}x{rows} pixels; at least {min_size} on the short side is needed")
    unit01, how = window(pixels, header, window_hint)
    notes = [how]
    if photometric.upper() == "MONOCHROME1":
        unit01 = 1.0 - unit01  # MONOCHROME1 shows low values white; the model expects air dark
        notes.append("MONOCHROME1 inverted")
    elif photometric.upper() != "MONOCHROME2":
        raise ImageRefused(f"photometric interpretation {photometric} is not greyscale")
    view, view_source = classify_view(header, unit01, min_symmetry)
    if view == "LATERAL":
        raise ImageRefused(f"lateral view ({view_source}); the model reads frontal (PA/AP) views only")
    notes.append(f"view {view} from {view_source}")
    notes.append("chest from " + check_body_part(header, unit01, min_lung_contrast))
    tensor, unit, geom = to_model_input(unit01, spec)
    return Prepared(tensor, unit01, unit, geom, view, view_source, notes)
