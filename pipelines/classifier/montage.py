"""A montage of the top-scoring slices with their scores, for the Secondary Capture.

A slice classifier has no outline to draw; what helps the reader is seeing the few slices that drove
the score side by side, in the first manifest window (the brain window for head CT), with the numbers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines.models import InputSpec

from .preprocess import _autoscale, apply_window
from .spec import ClassifierSpec

if TYPE_CHECKING:
    from .pipeline import SeriesScores

TILE = 256
TEXT_H = 80


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render_montage(scored: list[SeriesScores], spec: ClassifierSpec, input_spec: InputSpec,
                   slots: list[tuple[int, int]], label_order: list[int], labels: list[str],
                   names: list[str]) -> np.ndarray:
    """RGB uint8 (H, W, 3): one tile per (series index, slice index) in ``slots``, scores of up to three labels."""
    seen: list[int] = []
    for j in label_order:
        if j not in seen:
            seen.append(j)
    shown = seen[:3]
    n = len(slots)
    cols = min(n, 3) if n <= 3 else math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = Image.new("RGB", (cols * TILE, rows * (TILE + TEXT_H)), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    f = _font(15)
    for k, (si, i) in enumerate(slots):
        sc = scored[si]
        px = sc.series.pixels[i].astype(np.float32)  # type: ignore[index]
        grey = apply_window(px, spec.windows[0]) if spec.windows else _autoscale(px[None], sc.series.photometric)[0]
        tile = Image.fromarray((grey * 255).round().astype(np.uint8), mode="L").resize((TILE, TILE), Image.BILINEAR)
        x, y = (k % cols) * TILE, (k // cols) * (TILE + TEXT_H)
        canvas.paste(tile.convert("RGB"), (x, y))
        draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], outline=(255, 150, 0) if k == 0 else (90, 90, 90))
        pos = ""
        if sc.series.slice_positions is not None:
            pos = f"  z={float(sc.series.slice_positions[i]):.1f} mm"
        draw.text((x + 6, y + TILE + 3), f"Slice {sc.slice_number(i)}{pos}", fill=(255, 255, 255), font=f)
        for line, j in enumerate(shown):
            name, value = names[j], f": {sc.probs[i, j]:.2f}"
            while name and draw.textlength(name + value, font=f) > TILE - 12:
                name = name[:-1]
            draw.text((x + 6, y + TILE + 22 + 18 * line), name + value, fill=(255, 230, 0), font=f)
    return np.asarray(canvas, dtype=np.uint8)
