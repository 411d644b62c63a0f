"""RGB pictures for the Secondary Capture: key slice with ROIs, local-noise map, z profile, table.

Pillow only; fonts from DejaVu when installed (needed for the Chinese-free labels we draw here,
and for legible sizes), else Pillow's built-in bitmap font.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
COLOURS = {"fat": (255, 210, 0), "muscle": (255, 60, 60), "air": (80, 200, 255), "soft_tissue": (60, 255, 120)}


@lru_cache(maxsize=8)
def font(size: int = 14, bold: bool = False) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    path = FONT_DIR / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:
        return ImageFont.load_default()


def window_rgb(img: np.ndarray, centre: float = 40.0, width: float = 400.0) -> np.ndarray:
    lo = centre - width / 2
    g = np.clip((img.astype(np.float32) - lo) / width * 255.0, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def key_slice(img: np.ndarray, rois: list[tuple[str, str, float, float, float, float]], title: str) -> np.ndarray:
    """rois: (tissue, label, col, row, radius_px_col, radius_px_row)."""
    im = Image.fromarray(window_rgb(img))
    d = ImageDraw.Draw(im)
    f = font(13)
    placed: list[Box] = [(0, 0, im.width, 21)]  # the title bar, then every circle: labels cover neither
    for tissue, _label, c, r, rc, rr in rois:
        d.ellipse([c - rc, r - rr, c + rc, r + rr], outline=COLOURS.get(tissue, (0, 255, 0)), width=2)
        placed.append((c - rc - 1, r - rr - 1, c + rc + 1, r + rr + 1))
    for tissue, label, c, r, rc, rr in rois:
        col = COLOURS.get(tissue, (0, 255, 0))
        box = d.textbbox((0, 0), label, font=f)
        spot = free_spot((c - rc, r - rr, c + rc, r + rr), (box[2] - box[0] + 2, box[3] - box[1] + 4), im.size,
                         placed, away_from=im.width / 2)
        if spot is None:
            continue  # no room inside the picture without covering another label: the table has the numbers
        placed.append(spot)
        d.text((spot[0] + 1, spot[1] - box[1] + 2), label, fill=col, font=f)
    d.rectangle([0, 0, im.width, 20], fill=(0, 0, 0))
    d.text((4, 2), title, fill=(255, 255, 255), font=font(13, True))
    return np.asarray(im, dtype=np.uint8)


Box = tuple[float, float, float, float]


def free_spot(outline: Box, size: tuple[float, float], image: tuple[int, int], placed: list[Box],
              away_from: float) -> Box | None:
    """A label box beside ``outline`` (outward from ``away_from`` first), inside the image and clear of
    ``placed``; None when there is no such place. Labels never run off the edge or over each other."""
    x0, y0, x1, y1 = outline
    w, h = size
    cy = (y0 + y1) / 2 - h / 2
    right, left = (x1 + 3, cy), (x0 - 3 - w, cy)
    sides = [right, left] if (x0 + x1) / 2 >= away_from else [left, right]
    cands = sides + [((x0 + x1 - w) / 2, y0 - h - 2), ((x0 + x1 - w) / 2, y1 + 2)]
    cands += [(x, y + k * h) for k in (-1, 1, -2, 2) for x, y in sides]
    for x, y in cands:
        box = (x, y, x + w, y + h)
        if box[0] < 0 or box[1] < 0 or box[2] > image[0] or box[3] > image[1]:
            continue
        if not any(box[0] < p[2] and p[0] < box[2] and box[1] < p[3] and p[1] < box[3] for p in placed):
            return box
    return None


def _colormap(v: np.ndarray) -> np.ndarray:
    """A perceptually ordered dark-blue -> yellow ramp (viridis-like anchors)."""
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
    x = np.clip(v, 0, 1) * (len(anchors) - 1)
    out = np.empty(v.shape + (3,))
    for ch in range(3):
        out[..., ch] = np.interp(x, np.arange(len(anchors)), anchors[:, ch])
    return out.astype(np.uint8)


def noise_map(img: np.ndarray, sd: np.ndarray, valid: np.ndarray, vmax: float, title: str) -> np.ndarray:
    """Local SD in colour over soft tissue, greyscale anatomy elsewhere, with a scale bar."""
    base = window_rgb(img).astype(np.float32) * 0.6
    col = _colormap(sd / max(vmax, 1e-6)).astype(np.float32)
    rgb = np.where(valid[..., None], col, base).astype(np.uint8)
    im = Image.fromarray(rgb)
    d = ImageDraw.Draw(im)
    h = im.height
    bar = _colormap(np.linspace(1, 0, 150)[:, None].repeat(14, 1))
    im.paste(Image.fromarray(bar), (im.width - 24, h // 2 - 75))
    f = font(12)
    d.text((im.width - 78, h // 2 - 90), f"{vmax:.0f} HU", fill=(255, 255, 255), font=f)
    d.text((im.width - 60, h // 2 + 78), "0 HU", fill=(255, 255, 255), font=f)
    d.rectangle([0, 0, im.width, 20], fill=(0, 0, 0))
    d.text((4, 2), title, fill=(255, 255, 255), font=font(13, True))
    return np.asarray(im, dtype=np.uint8)


def profile_chart(curves: list[tuple[str, np.ndarray, np.ndarray]], target: float | None, title: str,
                  size: tuple[int, int] = (640, 360)) -> np.ndarray:
    """GNL (HU) against slice position (mm), one line per series."""
    w, h = size
    im = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(im)
    left, right, top, bottom = 60, w - 20, 30, h - 45
    finite = [(z[np.isfinite(v)], v[np.isfinite(v)]) for _, z, v in curves]
    finite = [(z, v) for z, v in finite if v.size]
    d.text((left, 6), title, fill=(0, 0, 0), font=font(14, True))
    if not finite:
        d.text((left, h // 2), "no soft tissue for a noise estimate", fill=(0, 0, 0), font=font(13))
        return np.asarray(im, dtype=np.uint8)
    zmin = min(float(z.min()) for z, _ in finite)
    zmax = max(float(z.max()) for z, _ in finite)
    vmax = max(float(v.max()) for _, v in finite)
    if target:
        vmax = max(vmax, target)
    vmax *= 1.15
    zspan = (zmax - zmin) or 1.0

    def xy(z: float, v: float) -> tuple[float, float]:
        return left + (z - zmin) / zspan * (right - left), bottom - v / vmax * (bottom - top)

    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    f = font(11)
    for i in range(6):
        v = vmax * i / 5
        _, y = xy(zmin, v)
        d.line([left - 4, y, left, y], fill=(0, 0, 0))
        d.text((4, y - 6), f"{v:.1f}", fill=(0, 0, 0), font=f)
        z = zmin + zspan * i / 5
        x, _ = xy(z, 0)
        d.line([x, bottom, x, bottom + 4], fill=(0, 0, 0))
        d.text((x - 18, bottom + 6), f"{z:.0f}", fill=(0, 0, 0), font=f)
    d.text(((left + right) // 2 - 60, h - 18), "slice position (mm)", fill=(0, 0, 0), font=f)
    d.text((4, top - 16), "GNL (HU)", fill=(0, 0, 0), font=f)
    if target:
        _, y = xy(zmin, target)
        d.line([left, y, right, y], fill=(200, 0, 0), width=1)
        d.text((right - 90, y - 14), f"target {target:g}", fill=(200, 0, 0), font=f)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75)]
    for j, (name, z, v) in enumerate(curves):
        ok = np.isfinite(v)
        pts = [xy(float(a), float(b)) for a, b in zip(z[ok], v[ok])]
        colr = palette[j % len(palette)]
        if len(pts) > 1:
            d.line(pts, fill=colr, width=2)
        for p in pts if len(pts) < 40 else []:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colr)
        d.text((left + 8, top + 6 + 14 * j), name, fill=colr, font=f)
    return np.asarray(im, dtype=np.uint8)


def table(header: list[str], rows: list[list[str]], title: str) -> np.ndarray:
    """A plain grid table, sized to its text."""
    f, fb = font(13), font(13, True)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def tw(s: str, fn: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
        box = probe.textbbox((0, 0), s, font=fn)
        return int(box[2] - box[0])

    cols = len(header)
    widths = [max([tw(header[c], fb)] + [tw(r[c], f) for r in rows]) + 16 for c in range(cols)]
    rh = 22
    w = max(sum(widths) + 20, tw(title, fb) + 20)
    h = 40 + rh * (len(rows) + 1) + 10
    im = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.text((10, 8), title, fill=(0, 0, 0), font=fb)
    y = 34
    x = 10
    d.rectangle([10, y, 10 + sum(widths), y + rh], fill=(225, 230, 240))
    for c in range(cols):
        d.text((x + 8, y + 4), header[c], fill=(0, 0, 0), font=fb)
        x += widths[c]
    for r in rows:
        y += rh
        x = 10
        for c in range(cols):
            d.text((x + 8, y + 4), r[c], fill=(0, 0, 0), font=f)
            x += widths[c]
        d.line([10, y, 10 + sum(widths), y], fill=(200, 200, 200))
    d.rectangle([10, 34, 10 + sum(widths), y + rh], outline=(0, 0, 0))
    return np.asarray(im, dtype=np.uint8)


# --------------------------------------------------------------------------- summary for the SC headline
VERDICT_ZH = {"pass": "通过", "warn": "警告", "fail": "不合格"}


def summary(analyses: list, comparisons: list[dict]) -> dict[str, dict]:
    """What a reader needs in five seconds, per language: the verdict, then one row per reconstruction
    with the numbers that matter (noise, dose, size-specific dose, muscle CNR and its gain).

    ``analyses`` are the pipeline's SeriesAnalysis objects; the results writer draws this as the headline
    and table of the summary Secondary Capture (node/results/sc.py).
    """
    worst = max((a.verdict for a in analyses), key=["pass", "warn", "fail"].index, default="pass")
    gains: dict[str, tuple[float | None, str]] = {}
    for comp in comparisons:
        for row in comp["rows"]:
            t = "muscle" if "muscle" in row["cnr_gain"] else "soft_tissue"
            gains[row["series_uid"]] = (row["cnr_gain"].get(t), comp["baseline_uid"])

    def cells(a, lang: str) -> list[str]:
        c, g = a.ctdivol_mean, a.gnl.value
        t = a.tissues.get("muscle") or a.tissues.get("soft_tissue")
        gain, base = gains.get(a.series.series_uid, (None, ""))
        verdict = a.verdict.upper() if lang == "en" else f"{VERDICT_ZH[a.verdict]} {a.verdict.upper()}"
        target = f" (≤ {a.noise_target:g})" if a.noise_target else ""
        return [a.name, verdict,
                f"{g:.1f} HU{target}" if g is not None else "–",
                f"{c:.1f} mGy" if c is not None else "–",
                f"{100 * c / a.drl:.0f} %" if c is not None and a.drl else "–",
                f"{a.ssde:.1f} mGy" if a.ssde is not None else "–",
                f"{t.cnr:.1f}" if t is not None and t.cnr is not None else "–",
                (f"{100 * gain:+.0f} %" if gain is not None and a.series.series_uid != base else "baseline")
                if a.series.series_uid in gains else "–"]

    header = {"en": ["Series", "Verdict", "Noise (GNL)", "CTDIvol", "of DRL", "SSDE", "Muscle CNR", "CNR vs baseline"],
              "zh": ["序列", "结论", "噪声 (GNL)", "CTDIvol", "占 DRL", "SSDE", "肌肉 CNR", "CNR 相对基准"]}
    reasons = {a.name: "; ".join(ch.en for ch in a.checks if ch.level != "pass") for a in analyses}
    out = {}
    for lang in ("en", "zh"):
        if lang == "en":
            head = [f"Image quality: {worst.upper()}"]
            head += [f"{name}: {why}" for name, why in reasons.items() if why]
        else:
            head = [f"图像质量：{VERDICT_ZH[worst]} ({worst.upper()})"]
            head += [f"{a.name}：" + "；".join(ch.zh for ch in a.checks if ch.level != "pass")
                     for a in analyses if reasons[a.name]]
        out[lang] = {"verdict": worst, "headline": head, "table": [header[lang]] + [cells(a, lang) for a in analyses]}
    return out
