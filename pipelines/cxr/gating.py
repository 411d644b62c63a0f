"""Is this image a frontal chest radiograph? Tags decide when present; otherwise the image, by measured rules.

Many chest radiographs arrive with no useful tags (exports, secondary captures, teaching files),
so the image itself must be judged, and a pipeline that refuses a third of real chests (what a
symmetry threshold and fixed lung boxes did on the NIH ChestX-ray14 sample) helps no one. The
rules here were calibrated on real frontal radiographs (``benchmarks/cxr_gating.py`` prints the
confusion table) with wide margins, and kept simple so they generalise:

1. **Layout score** ``L``: the Pearson correlation between the image reduced to 32x32 (box filter,
   then rank-transformed so window and gamma do not matter) and the mean frontal chest layout
   (``chest_layout.json``: the same reduction averaged over the 156 dev radiographs). A frontal
   chest scores 0.80 (median; leave-one-out), CT/MR/ultrasound/extremity images score -0.3..0.4.
2. **Subdiaphragmatic band** ``B``: the brightest 15 %-high band in the lower 55-95 % of the central
   columns minus the lung rows (25-60 %), on the rank scale. The abdomen under the diaphragm is
   bright on every frontal chest; a head CT's lower edge is not.

Refused: ``L < min_layout`` (0.20; dev chests: lowest 0.31 apart from one inverted image), or
``L < 0.45`` together with ``B < 0.22`` (head CT slice: 0.40 / 0.19). When the inverted image would
pass, the reason says so, so that a wrong PhotometricInterpretation can be fixed at the source. Accepted with a note
(reaching the SR): ``L < typical_layout`` (0.55), ``B < 0.22``, or left-right symmetry < 0.60
(rotation, scoliosis, one-sided disease). Aspect ratios outside 0.6-1.7 (a half chest, a long
bone) are refused as not a frontal view.

The numbers that decide are in every note, so a refusal can be checked against the image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "TORSO", "RIB", "PORT CHEST", "CHEST_LAT", "HEART")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LLO", "RLO")
FRONTAL_VIEWS = ("PA", "AP")
LAYOUT_FILE = Path(__file__).with_name("chest_layout.json")

MIN_LAYOUT = 0.20  #: below: not a frontal chest
WEAK_LAYOUT = 0.45  #: below this AND a dark lower band: refused (cross-sectional slices sit here)
TYPICAL_LAYOUT = 0.55  #: below: accepted with a note
MIN_BAND = 0.22
MIN_SYMMETRY = 0.60
ASPECT = (0.6, 1.7)


class ImageRefused(Exception):
    """This image cannot go to the model; the message says why in words for the status page."""


def tag(header: Any, keyword: str) -> str:
    v = header.get(keyword, "") if header is not None else ""
    return str(v or "").strip().upper()


@lru_cache(maxsize=1)
def layout_template() -> np.ndarray:
    data = json.loads(LAYOUT_FILE.read_text(encoding="utf-8"))
    return np.asarray(data["template"], np.float32)


def _box(img: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F").resize((n, n), Image.BOX))


def reduced(img: np.ndarray) -> np.ndarray:
    """The 128 x 128 box reduction every image score starts from (done once per image)."""
    return img if img.shape == (128, 128) else _box(img, 128)


def rank_image(img: np.ndarray, n: int = 32) -> np.ndarray:
    """``img`` reduced to n x n, rank-transformed and standardised (zero mean, unit SD)."""
    s = _box(reduced(img), n).ravel()
    r = np.empty(s.size, np.float32)
    r[np.argsort(s, kind="stable")] = np.arange(s.size, dtype=np.float32)
    r = (r - r.mean()) / r.std()
    return r.reshape(n, n)


def layout_score(display: np.ndarray) -> float:
    t = layout_template()
    return float((rank_image(display, t.shape[0]) * t).mean())


def band_score(display: np.ndarray) -> float:
    """Brightest lower band (55-95 % height, central 60 % of columns) minus the lung rows, rank scale 0..1."""
    n = 64
    r = rank_image(display, n)
    r = (r - r.min()) / max(1e-6, float(r.max() - r.min()))
    lung = float(r[int(0.25 * n): int(0.6 * n)].mean())
    h, cols = int(0.15 * n), slice(int(0.2 * n), int(0.8 * n))
    best = max(float(r[a: a + h, cols].mean()) for a in range(int(0.55 * n), int(0.95 * n) - h + 1))
    return best - lung


def symmetry(display: np.ndarray) -> float:
    """Best left-right mirror correlation over axis shifts in the central third (1 = mirror-symmetric)."""
    s = reduced(display)
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
    s = reduced(display)
    n = s.shape[0]
    rows = slice(int(0.25 * n), int(0.65 * n))
    left = s[rows, int(0.15 * n): int(0.38 * n)]
    right = s[rows, int(0.62 * n): int(0.85 * n)]
    mid = s[rows, int(0.44 * n): int(0.56 * n)]
    return float(mid.mean() - 0.5 * (left.mean() + right.mean()))


@dataclass
class Gate:
    """What the checks found: view and how we know it, and notes for an unusual but accepted image."""

    view: str
    view_source: str
    chest_source: str
    notes: list[str]
    scores: dict[str, float]


def view_from_tags(header: Any) -> tuple[str, str] | None:
    """('PA'|'AP'|'LATERAL', which tag said so), or None when no tag tells."""
    vp = tag(header, "ViewPosition")
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
    words = set(" ".join(tag(header, k) for k in keys).replace("/", " ").replace("_", " ").split())
    if words & {"LAT", "LATERAL", "LL", "RL"}:
        return "LATERAL", "series description"
    if words & {"PA", "AP", "FRONTAL"}:
        return ("AP" if "AP" in words else "PA" if "PA" in words else "FRONTAL"), "series description"
    return None


def check(header: Any, display: np.ndarray, *, min_layout: float = MIN_LAYOUT,
          typical_layout: float = TYPICAL_LAYOUT) -> Gate:
    """Decide on one windowed MONOCHROME2 image; raises ImageRefused with the reason."""
    notes: list[str] = []
    view = view_from_tags(header)
    if view is not None and view[0] == "LATERAL":
        raise ImageRefused(f"lateral view ({view[1]}); the model reads frontal (PA/AP) views only")
    bp = tag(header, "BodyPartExamined")
    if bp and not any(k in bp for k in CHEST_BODY_PARTS):
        raise ImageRefused(f"BodyPartExamined is {bp!r}, not chest; this pipeline reads chest radiographs only")
    rows, cols = display.shape
    aspect = rows / cols
    if view is None and not ASPECT[0] <= aspect <= ASPECT[1]:
        raise ImageRefused(f"not a frontal chest view: image heuristic (aspect {aspect:.2f} outside "
                           f"{ASPECT[0]}-{ASPECT[1]}; a lateral, a half chest or a long bone)")
    small = reduced(display)
    lay, band, sym = layout_score(small), band_score(small), symmetry(small)
    scores = {"layout": round(lay, 3), "band": round(band, 3), "symmetry": round(sym, 3)}
    desc = f"layout {lay:.2f}, lower band {band:+.2f}, symmetry {sym:.2f}"
    failing = lay < min_layout or (lay < WEAK_LAYOUT and band < MIN_BAND)
    if failing and (not bp or view is None):  # the image decides what the tags leave open
        missing = "no BodyPartExamined" if not bp else "no ViewPosition"
        inverse = layout_score(1.0 - small)
        hint = (f"; inverted it would score {inverse:.2f}: if this is a chest, check PhotometricInterpretation"
                if inverse >= WEAK_LAYOUT else "")
        raise ImageRefused(f"{missing} and the image does not look like a frontal chest radiograph ({desc}; a "
                           f"frontal chest scores layout >= {min_layout:g}{hint}): a lateral view, another body "
                           "part or a cross-sectional image")
    chest_source = f"BodyPartExamined {bp}" if bp else f"image heuristic ({desc})"
    if lay < typical_layout:
        notes.append(f"unusual layout for a frontal chest radiograph (layout score {lay:.2f}, typical >= "
                     f"{typical_layout:g}): framing, projection or patient position differs from most; read as "
                     "a probable chest, check the image")
    if band < MIN_BAND:
        notes.append(f"little brightness below the lung fields (lower band {band:+.2f}): diaphragm or abdomen "
                     "may be out of the field")
    if sym < MIN_SYMMETRY:
        notes.append(f"left-right asymmetric (symmetry {sym:.2f}): rotated patient, scoliosis or one-sided "
                     "disease; findings near the edges deserve a second look")
    view_name, view_source = view if view is not None else ("FRONTAL", f"image heuristic ({desc})")
    return Gate(view_name, view_source, chest_source, notes, scores)
