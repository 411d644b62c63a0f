"""Pixels for the Secondary Capture: display windowing, overlays and the burned-in text panel.

The SC must read correctly in any viewer, including ones that ignore every presentation attribute,
so we bake in what a radiologist would see: the source's own window (or VOI LUT), MONOCHROME1
inverted, ROIs and heat maps drawn, and a text panel under the image (never over anatomy).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from pipelines.base import Overlay, Region

from .fonts import CJK_FONTS, LATIN_FONTS, TextFont, font, font_path  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

#: Images smaller than this (long side) are upscaled by an integer factor so panel text stays legible.
MIN_LONG_SIDE = 1024

RED = (230, 20, 20)
YELLOW = (255, 230, 0)
CYAN = (0, 220, 255)
ORANGE = (255, 150, 0)
WHITE = (255, 255, 255)
GREY = (190, 190, 190)
GREEN = (60, 220, 90)



# --------------------------------------------------------------------------- windowing
def _first(value: object) -> float:
    if isinstance(value, (list, tuple)) or hasattr(value, "__getitem__") and not isinstance(value, str):
        value = value[0]  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


def window_linear(x: np.ndarray, centre: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window, to [0, 1]."""
    width = max(width, 1.0)
    y = (x - (centre - 0.5)) / (width - 1.0) + 0.5 if width > 1 else (x >= centre).astype(float)
    return np.clip(y, 0.0, 1.0)


def display_values(ds: Dataset, frame: int | None = None) -> np.ndarray:
    """Grey levels 0..255 as a viewer would show the image (presentation polarity applied).

    Integer pixels go through a lookup table over the stored values present: the same float64
    arithmetic on a few thousand distinct values instead of every pixel of a 2000 x 2000 radiograph
    (a 30 MB float64 image and its temporaries cost more than everything else in the summary image).
    """
    arr = ds.pixel_array
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if nframes > 1:
        arr = arr[(frame or 1) - 1]
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return arr.astype(np.uint8) if arr.dtype == np.uint8 else _minmax(arr)
    if _has_voi(ds) and _window_spans_everything(ds, arr):
        return _percentile_grey(arr, ds)
    if arr.dtype.kind in "iu" and arr.size and _has_voi(ds):  # (a robust range needs every pixel: no table)
        lo, hi = int(arr.min()), int(arr.max())
        if hi - lo <= MAX_LUT_ENTRIES:
            values = np.arange(lo, hi + 1, dtype=np.int64).astype(arr.dtype)
            lut = _grey_levels(np.asarray(apply_modality_lut(values, ds), dtype=np.float64), ds)
            return lut[np.subtract(arr, lo, dtype=np.int32 if arr.dtype.itemsize <= 2 else np.int64)]
    return _grey_levels(np.asarray(apply_modality_lut(arr, ds), dtype=np.float64), ds)


def _window_spans_everything(ds: Dataset, arr: np.ndarray) -> bool:
    """A "window" as wide as the whole stored range (W30000/L15000 on a 15-bit CR) is no display window:
    burned in, it leaves the lungs mid-grey. A VOI LUT is always taken as meant."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) and "LUTData" in ds.VOILUTSequence[0]:
        return False
    if "WindowWidth" not in ds or not arr.size:
        return False
    lo, hi = (float(v) for v in apply_modality_lut(np.array([arr.min(), arr.max()]), ds))
    return _first(ds.WindowWidth) >= 0.9 * max(hi - lo, 1.0) or _first(ds.WindowWidth) > 4 * max(hi - lo, 1.0)


def _percentile_grey(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """A window from the 1st-99th percentiles of the central region (the body, not collimation or labels).

    Percentiles from every 4th pixel of the centre, and integer images mapped through a table, as above:
    the same picture at a fraction of the time on a 2000 x 2000 radiograph.
    """
    h, w = arr.shape[:2]
    centre = arr[h // 10: h - h // 10: 4, w // 10: w - w // 10: 4]
    lo, hi = np.percentile(np.asarray(apply_modality_lut(centre, ds), dtype=np.float64), [1.0, 99.0])
    mono1 = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"

    def grey(x: np.ndarray) -> np.ndarray:
        norm = np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        return np.round((1.0 - norm if mono1 else norm) * 255.0).astype(np.uint8)

    if arr.dtype.kind in "iu":
        a0, a1 = int(arr.min()), int(arr.max())
        if a1 - a0 <= MAX_LUT_ENTRIES:
            values = np.arange(a0, a1 + 1, dtype=np.int64).astype(arr.dtype)
            lut = grey(np.asarray(apply_modality_lut(values, ds), dtype=np.float64))
            return lut[np.subtract(arr, a0, dtype=np.int32 if arr.dtype.itemsize <= 2 else np.int64)]
    return grey(np.asarray(apply_modality_lut(arr, ds), dtype=np.float64))


#: Stored-value ranges up to this size are windowed through a table (16-bit images always are).
MAX_LUT_ENTRIES = 1 << 17


def _has_voi(ds: Dataset) -> bool:
    """The display mapping depends on the pixel value alone (a VOI LUT or a window), not on the histogram."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) and "LUTData" in ds.VOILUTSequence[0]:
        return True
    return "WindowCenter" in ds and "WindowWidth" in ds and str(ds.WindowWidth) != ""


def _grey_levels(x: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality values -> display grey levels 0..255: VOI LUT, else window, else a robust range."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) and "LUTData" in ds.VOILUTSequence[0]:
        norm = voi_lut(x, ds.VOILUTSequence[0])
    elif _has_voi(ds):
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        if str(ds.get("VOILUTFunction", "LINEAR")).upper() == "SIGMOID":
            norm = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / max(w, 1.0)))
        else:
            norm = window_linear(x, c, w)
    else:  # no window in the header: robust range instead of min/max so a few hot pixels do not wash it out
        lo, hi = np.percentile(x, [0.5, 99.5])
        norm = np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        norm = 1.0 - norm
    return np.round(norm * 255.0).astype(np.uint8)


def voi_lut(x: np.ndarray, item: Dataset) -> np.ndarray:
    """PS3.3 C.11.2.1.1 VOI LUT, to [0, 1]; inputs outside the table take its first / last entry.

    Done here rather than with pydicom's apply_voi, which wraps out-of-range input modulo the output
    bit depth (seen with pydicom 3.0.2 and an 8-bit table).
    """
    n, first, bits = (int(v) for v in item.LUTDescriptor)
    n = n or 65536
    data = item.LUTData
    lut = np.frombuffer(data, "<u2") if isinstance(data, bytes) else np.asarray(data, dtype=np.float64).ravel()
    lut = lut[:n].astype(np.float64)
    idx = np.clip(np.round(x).astype(np.int64) - first, 0, len(lut) - 1)
    return np.clip(lut[idx] / float(2 ** bits - 1), 0.0, 1.0)


def _minmax(arr: np.ndarray) -> np.ndarray:
    a = arr.astype(np.float64)
    return np.round((a - a.min()) / max(a.max() - a.min(), 1e-6) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- overlays
def _colormap(v: np.ndarray) -> np.ndarray:
    """A jet-like ramp: blue -> cyan -> yellow -> red; cheap and unambiguous on grey anatomy."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.stack([r, g, b], axis=-1) * 255.0


def blend_heatmap(rgb: np.ndarray, heat: np.ndarray, max_alpha: float = 0.5) -> np.ndarray:
    """The heat map in colour over the image, opaque up to ``max_alpha`` where the model looked hardest."""
    img = Image.fromarray(np.ascontiguousarray(np.asarray(rgb)[..., :3]))
    return np.asarray(heatmap_over(img, heat, max_alpha))


def heatmap_over(img: Image.Image, heat: np.ndarray, max_alpha: float = 0.5) -> Image.Image:
    """``blend_heatmap`` on a PIL RGB image.

    The map is quantised to 256 levels at its own (small) resolution and scaled, coloured and blended
    by PIL in 8-bit: a few grey levels from float arithmetic at most, and a tenth of the time on a
    full-size radiograph, where float32 colour planes cost a third of a second.
    """
    hm = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32)), 0.0, 1.0)
    level = Image.fromarray(np.round(hm * 255.0).astype(np.uint8), mode="L")
    if level.size != img.size:
        level = level.resize(img.size, Image.BILINEAR)
    colour = Image.merge("RGB", [level.point(lut) for lut in _HEAT_LUTS])
    alpha = level.point(_alpha_lut(max_alpha))  # low scores leave anatomy untouched
    return Image.composite(colour, img, alpha)


def _alpha_lut(max_alpha: float) -> list[int]:
    v = np.arange(256) / 255.0
    return np.round(255.0 * max_alpha * np.clip((v - 0.2) / 0.8, 0.0, 1.0)).astype(int).tolist()


_HEAT_LUTS = [np.round(_colormap(np.arange(256) / 255.0)[:, c]).astype(int).tolist() for c in range(3)]


def combined_heatmap(heats: list[np.ndarray]) -> np.ndarray | None:
    """One map, the pixel-wise maximum, at the finest resolution given: a reader sees where any finding
    drove the model, and stacking eighteen translucent layers would both hide anatomy and take seconds."""
    if not heats:
        return None
    arrays = [np.clip(np.nan_to_num(np.asarray(h, dtype=np.float32)), 0.0, 1.0) for h in heats]
    shape = max((a.shape for a in arrays), key=lambda t: t[0] * t[1])
    out = np.zeros(shape, np.float32)
    for a in arrays:
        if a.shape != shape:
            a = np.asarray(Image.fromarray(a, mode="F").resize((shape[1], shape[0]), Image.BILINEAR))
        np.maximum(out, a, out=out)
    return out


def blend_mask(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = CYAN) -> np.ndarray:
    h, w = rgb.shape[:2]
    m = np.asarray(mask).astype(bool)
    if m.shape != (h, w):
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
    out = rgb.astype(np.float32)
    out[m] = out[m] * 0.7 + np.array(colour, np.float32) * 0.3
    return out.astype(np.uint8)


@dataclass
class DrawnRegion:
    region: Region
    colour: tuple[int, int, int]
    label: str = ""


def draw_regions(img: Image.Image, regions: list[DrawnRegion], scale: float, language: str) -> list[Box]:
    """Outlines, then each label in free room inside the image (returns the label boxes, for tests)."""
    d = ImageDraw.Draw(img)
    todo: list[tuple[tuple[float, float], Box, str, tuple[int, int, int]]] = []
    lw = max(2, round(max(img.size) / 600))
    f = font(max(14, round(max(img.size) / 70)))

    def sc(p: tuple[float, float]) -> tuple[float, float]:  # pixel centres stay centres after upscaling
        return ((p[0] + 0.5) * scale - 0.5, (p[1] + 0.5) * scale - 0.5)

    for dr in regions:
        pts = [sc(tuple(p)) for p in dr.region.points]  # type: ignore[arg-type]
        gt = dr.region.graphic_type
        if gt == "CIRCLE" and len(pts) >= 2:
            (cx, cy), (ex, ey) = pts[0], pts[1]
            r = math.hypot(ex - cx, ey - cy)
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=dr.colour, width=lw)
            anchor = (cx + r * 0.75, cy - r * 0.75)
        elif gt == "ELLIPSE" and len(pts) >= 4:
            xs, ys = [p[0] for p in pts[:4]], [p[1] for p in pts[:4]]
            d.ellipse([min(xs), min(ys), max(xs), max(ys)], outline=dr.colour, width=lw)
            anchor = (max(xs), min(ys))
        elif gt in ("POINT", "MULTIPOINT"):
            r = 3 * lw
            for x, y in pts:
                d.line([x - r, y, x + r, y], fill=dr.colour, width=lw)
                d.line([x, y - r, x, y + r], fill=dr.colour, width=lw)
            anchor = (pts[0][0] + r, pts[0][1] - r)
        else:
            if len(pts) > 2 and pts[0] != pts[-1]:
                pts.append(pts[0])  # drawn as the SR encodes it: an area outline
            d.line(pts, fill=dr.colour, width=lw, joint="curve")
            anchor = (max(p[0] for p in pts), min(p[1] for p in pts))
        text = dr.label or dr.region.label
        if text:
            todo.append((anchor, outline_box(pts, gt), text, dr.colour))
    obstacles = [o for _, o, _, _ in todo]  # a label covers no outline and no other label
    labels: list[Box] = []
    for anchor, outline, text, colour in todo:
        box = place_label(anchor, (f.length(d, text) + 2 * lw, round(f.size * 1.25)), img.size,
                          obstacles + labels, outline)
        if box is None:
            continue  # no free room inside the image: the panel's legend names it
        labels.append(box)
        d.rectangle(box, fill=(0, 0, 0))
        f.draw(d, (box[0] + lw, box[1]), text, colour)
    return labels


Box = tuple[float, float, float, float]


def outline_box(pts: list[tuple[float, float]], graphic_type: str) -> Box:
    if graphic_type == "CIRCLE" and len(pts) >= 2:
        (cx, cy), (ex, ey) = pts[0], pts[1]
        r = math.hypot(ex - cx, ey - cy)
        return (cx - r, cy - r, cx + r, cy + r)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (min(xs), min(ys), max(xs), max(ys))


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_label(anchor: tuple[float, float], size: tuple[float, float], image: tuple[int, int],
                placed: list[Box], outline: Box) -> Box | None:
    """A box of ``size`` next to its outline, wholly inside the image and clear of every label placed so
    far: right of the outline, left, above, below, then further out; None when nothing fits."""
    w, h = size
    iw, ih = image
    x0, y0, x1, y1 = outline
    cands = []
    for step in (0.0, 1.0, 2.0, 3.0):
        dy = step * h
        cands += [(x1 + 2, anchor[1] + dy), (x0 - w - 2, anchor[1] + dy), (x1 + 2, anchor[1] - dy),
                  (x0 - w - 2, anchor[1] - dy), ((x0 + x1 - w) / 2, y0 - h - 2 - dy), ((x0 + x1 - w) / 2, y1 + 2 + dy)]
    for x, y in cands:
        box = (x, y, x + w, y + h)
        if box[0] < 0 or box[1] < 0 or box[2] > iw - 1 or box[3] > ih - 1:
            continue
        if not any(_overlap(box, p) for p in placed):
            return box
    return None


# --------------------------------------------------------------------------- panel
@dataclass
class Panel:
    """Burned-in text under the image; ``banner`` is the red CRITICAL FINDING strip when set."""

    title: str
    lines: list[tuple[str, tuple[int, int, int]]] = field(default_factory=list)
    banner: str = ""
    language: str = "en"
    #: header row then data rows, drawn as aligned columns under the lines (e.g. one row per reconstruction)
    table: list[list[str]] = field(default_factory=list)


def _wrap(text: str, f: TextFont, width: int, d: ImageDraw.ImageDraw) -> list[str]:
    """Greedy wrap on spaces; a run with no spaces (Chinese) breaks between characters."""
    out: list[str] = []
    for para in text.split("\n"):
        if f.length(d, para) <= width:  # most panel lines fit: one measurement instead of one per word
            out.append(para)
            continue
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}" if line else word
            if f.length(d, trial) <= width:
                line = trial
                continue
            if line:
                out.append(line)
            line = ""
            for ch in word:  # the word alone is too long, or starts a new line
                if line and f.length(d, line + ch) > width:
                    out.append(line)
                    line = ""
                line += ch
        out.append(line)
    return out


def panel_font_size(width: int) -> int:
    """~1/55 of the width: 35 px on a 1955-wide CR, legible at 1:1 and when a viewer fits to screen."""
    return max(16, round(width / 55))


def render_panel(width: int, panel: Panel) -> np.ndarray:
    size = panel_font_size(width)
    f = font(size)
    fb = font(round(size * 1.25))
    margin = size // 2
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows: list[tuple[str, tuple[int, int, int], TextFont]] = []
    for text, colour in [(panel.title, WHITE)] + panel.lines:
        for ln in _wrap(text, f, width - 2 * margin, scratch):
            rows.append((ln, colour, f))
    line_h = round(size * 1.3)
    banner_h = round(size * 2.0) if panel.banner else 0
    tf, widths = _table_layout(panel.table, width - 2 * margin, size, scratch)
    table_h = round(tf.size * 1.35) * len(panel.table) + (margin if panel.table else 0)
    height = banner_h + 2 * margin + line_h * len(rows) + table_h
    img = Image.new("RGB", (width, height), (0, 0, 0))
    d = ImageDraw.Draw(img)
    if panel.banner:
        d.rectangle([0, 0, width - 1, banner_h - 1], fill=RED)
        tw = fb.length(d, panel.banner)
        fb.draw(d, ((width - tw) / 2, (banner_h - fb.size) / 2), panel.banner, WHITE)
    y = banner_h + margin
    for text, colour, ff in rows:
        ff.draw(d, (margin, y), text, colour)
        y += line_h
    if panel.table:
        y += margin // 2
        for i, row in enumerate(panel.table):
            x = margin
            for cell, cw in zip(row, widths):
                tf.draw(d, (x, y), cell, CYAN if i == 0 else WHITE)
                x += cw
            y += round(tf.size * 1.35)
    return np.asarray(img)


def _table_layout(table: list[list[str]], room: int, size: int, d: ImageDraw.ImageDraw) -> tuple[TextFont, list[int]]:
    """Column widths for ``table``; the font shrinks (down to 12 px) until the widest row fits ``room``."""
    while True:
        f = font(size)
        gap = size
        widths = [max(int(f.length(d, r[c])) for r in table if c < len(r)) + gap
                  for c in range(max((len(r) for r in table), default=0))]
        if sum(widths) <= room or size <= 12:
            return f, widths
        size -= 1


def upscale_factor(rows: int, cols: int) -> int:
    return max(1, math.ceil(MIN_LONG_SIDE / max(rows, cols)))


def compose(grey_or_rgb: np.ndarray, regions: list[DrawnRegion], overlays: list[Overlay], panel: Panel,
            label_boxes: list | None = None) -> np.ndarray:
    """Key image (upscaled if small) with heat maps, masks and outlines, then the panel underneath.

    Kept in PIL from the grey image to the last outline: every numpy round trip of a full-size RGB
    radiograph is another 11 MB copy.
    """
    img = Image.fromarray(np.ascontiguousarray(grey_or_rgb))
    s = upscale_factor(*grey_or_rgb.shape[:2])
    if s > 1:
        img = img.resize((img.width * s, img.height * s), Image.BICUBIC)
    img = img.convert("RGB")
    heat = combined_heatmap([ov.array for ov in overlays if ov.kind == "heatmap"])
    if heat is not None:
        img = heatmap_over(img, heat)
    masks = [ov.array for ov in overlays if ov.kind == "mask"]
    if masks:
        rgb = np.asarray(img)
        for m in masks:
            rgb = blend_mask(rgb, m)
        img = Image.fromarray(rgb)
    boxes = draw_regions(img, regions, float(s), panel.language)
    if label_boxes is not None:
        label_boxes.extend(boxes)
    bottom = render_panel(img.width, panel)
    out = np.empty((img.height + bottom.shape[0], img.width, 3), np.uint8)
    out[: img.height] = np.asarray(img)
    out[img.height:] = bottom
    return out


def caption_strip(rgb: np.ndarray, panel: Panel) -> np.ndarray:
    """A pipeline-rendered chart keeps its pixels; the disclaimer panel goes underneath."""
    arr = np.asarray(rgb)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    arr = arr[..., :3].astype(np.uint8)
    return np.ascontiguousarray(np.vstack([arr, render_panel(arr.shape[1], panel)]))
