"""Fonts for burned-in text: a real TrueType face per script, mixed per run of characters."""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

from PIL import ImageDraw, ImageFont

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
LATIN_FONTS = [
    _HERE / "fonts" / "DejaVuSans.ttf",
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),  # fonts-dejavu-core
    Path("/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf"),
    Path("/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf"),
]
CJK_FONTS = [
    _HERE / "fonts" / "DroidSansFallbackFull.ttf",
    Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"),  # fonts-wqy-microhei
    Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"),  # fonts-noto-cjk
    Path("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf"),  # fonts-droid-fallback
]


@lru_cache(maxsize=4)
def font_path(language: str = "en") -> Path | None:
    """A real TTF for the script; None means PIL's built-in font (logged, because it is ugly)."""
    env = os.environ.get("AINODE_FONT_CJK" if language == "zh" else "AINODE_FONT")
    candidates = ([Path(env)] if env else []) + (CJK_FONTS if language == "zh" else LATIN_FONTS)
    for p in candidates:
        if p.exists():
            return p
    log.warning("no TrueType font found for %r; falling back to PIL's default font", language)
    return None


def _load(path: Path | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path is not None:
        return ImageFont.truetype(str(path), size)
    try:
        return ImageFont.load_default(size)
    except TypeError:  # very old Pillow
        return ImageFont.load_default()


def _is_cjk(ch: str) -> bool:
    return ord(ch) >= 0x2E80  # CJK radicals onwards, incl. full-width punctuation


class TextFont:
    """Latin text in the Latin font, CJK runs in the CJK font.

    Fallback CJK fonts (Droid Sans Fallback) have no Latin glyphs and Latin fonts no Han ones, and a
    Chinese panel line mixes both ("算法: densenet 2.1").
    """

    def __init__(self, size: int):
        self.size = size
        self.latin = _load(font_path("en"), size)
        self._cjk: ImageFont.FreeTypeFont | ImageFont.ImageFont | None = None

    @property
    def cjk(self) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
        if self._cjk is None:
            self._cjk = _load(font_path("zh"), self.size)
        return self._cjk

    def runs(self, text: str) -> list[tuple[str, ImageFont.FreeTypeFont | ImageFont.ImageFont]]:
        out: list[tuple[str, ImageFont.FreeTypeFont | ImageFont.ImageFont]] = []
        for ch in text:
            f = self.cjk if _is_cjk(ch) else self.latin
            if out and out[-1][1] is f:
                out[-1] = (out[-1][0] + ch, f)
            else:
                out.append((ch, f))
        return out

    def length(self, d: ImageDraw.ImageDraw, text: str) -> float:
        return sum(d.textlength(t, font=f) for t, f in self.runs(text))

    def draw(self, d: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill: tuple[int, int, int]) -> None:
        x, y = xy
        for t, f in self.runs(text):
            d.text((x, y), t, fill=fill, font=f)
            x += d.textlength(t, font=f)


@lru_cache(maxsize=16)
def font(size: int) -> TextFont:
    return TextFont(size)
