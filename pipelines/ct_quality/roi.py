"""Body outline, tissue masks and automatic circular ROIs on axial CT slices.

Tissues are found on a ~5 mm box-smoothed image: at 20-40 HU noise single pixels of fat and
muscle overlap, their 5 mm means do not. ROI centres are chosen where the distance to any other
tissue is at least radius + margin (a Euclidean distance transform), so the whole circle lies in
its tissue, and several centres per slice are spread apart by farthest-point sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from pipelines.ct_quality.geometry import SliceGeometry

TISSUES = ("fat", "muscle", "soft_tissue", "air")
LABELS = {"fat": "Subcutaneous fat", "muscle": "Paraspinal muscle", "air": "Air (outside body)",
          "soft_tissue": "Soft tissue (no spine found)"}


@dataclass
class ROI:
    """A circular ROI: placed once in patient space, measurable on any series of the same FoR."""

    tissue: str
    index: int
    centre_patient: np.ndarray  # (3,) mm
    radius_mm: float
    label: str = ""


@dataclass
class BodyInfo:
    body: np.ndarray  # bool (rows, cols), holes filled, table removed
    fov: np.ndarray  # bool, inside the reconstruction FOV
    truncated_fraction: float  # of the body outline lying on the FOV edge
    wed_mm: float | None  # water-equivalent diameter (AAPM TG-220)
    area_mm2: float


def downsample2(img: np.ndarray) -> np.ndarray:
    """2x2 block mean (odd edge row / column dropped)."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    return img[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3), dtype=np.float32)


def fov_mask(img: np.ndarray, below: float) -> np.ndarray:
    """Reconstruction FOV: scanners pad outside it with very low values (-2000, -3024 ...)."""
    fov = img > below
    if fov.all() or not fov.any():
        return np.ones(img.shape, bool)
    return fov


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background not connected to the image border is a hole: one labelling, no iterative dilation."""
    lab, n = ndi.label(~mask)
    if n == 0:
        return mask
    touches = np.zeros(n + 1, bool)
    touches[np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])] = True
    touches[0] = False
    return ~touches[lab]


def edge(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Mask pixels within ``width`` pixels (4-neighbourhood steps) of its outside or the image border."""
    inner = mask.copy()
    for _ in range(width):
        nxt = inner.copy()
        nxt[1:] &= inner[:-1]
        nxt[:-1] &= inner[1:]
        nxt[:, 1:] &= inner[:, :-1]
        nxt[:, :-1] &= inner[:, 1:]
        nxt[0] = nxt[-1] = False
        nxt[:, 0] = nxt[:, -1] = False
        inner = nxt
    return mask & ~inner


def body_info(img: np.ndarray, pixel_area_mm2: float, threshold: float, fov_below: float,
              truncation_min_fraction: float = 0.01) -> BodyInfo:
    """Largest connected object above the threshold (drops the table and clothing), holes filled.

    Water-equivalent area (TG-220): A_w = sum over the body of (HU / 1000 + 1) * pixel area,
    D_w = 2 sqrt(A_w / pi). Air inside the body (lungs, bowel gas) counts with its low weight.
    """
    fov = fov_mask(img, fov_below)
    sm = ndi.uniform_filter(img, 3)
    obj = (sm > threshold) & fov
    lab, n = ndi.label(obj)
    if n == 0:
        return BodyInfo(np.zeros(img.shape, bool), fov, 0.0, None, 0.0)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    body = lab == int(np.argmax(sizes))
    body = fill_holes(body)
    hu = np.clip(img[body], -1000.0, None)
    area = float(body.sum()) * pixel_area_mm2
    aw = float(np.sum(hu / 1000.0 + 1.0)) * pixel_area_mm2
    wed = 2.0 * np.sqrt(aw / np.pi) if aw > 0 else None
    outline = edge(body)
    fov_edge = ~fov | edge(fov, 2)
    on_edge = float((outline & fov_edge).sum()) / max(1.0, float(outline.sum()))
    return BodyInfo(body, fov, on_edge if on_edge >= truncation_min_fraction else 0.0, wed, area)


def _edt(mask: np.ndarray, sampling: tuple[float, float]) -> np.ndarray:
    """Distance to the nearest pixel outside the mask, the image border counting as outside."""
    return ndi.distance_transform_edt(np.pad(mask, 1), sampling=sampling)[1:-1, 1:-1]


def _farthest_points(cands: np.ndarray, score: np.ndarray, n: int, min_sep: float) -> list[tuple[int, int]]:
    """Up to n candidate pixels: first the best-scored, then each farthest from those chosen."""
    rr, cc = np.nonzero(cands)
    if rr.size == 0:
        return []
    pts = np.stack([rr, cc], 1).astype(float)
    chosen = [int(np.argmax(score[rr, cc]))]
    dmin = np.hypot(*(pts - pts[chosen[0]]).T)
    while len(chosen) < n:
        j = int(np.argmax(dmin))
        if dmin[j] < min_sep:
            break
        chosen.append(j)
        dmin = np.minimum(dmin, np.hypot(*(pts - pts[j]).T))
    return [(int(rr[j]), int(cc[j])) for j in chosen]


def _best_points(cands: np.ndarray, score: np.ndarray, n: int, min_sep: float) -> list[tuple[int, int]]:
    """Up to n candidate pixels in score order, each at least min_sep from those already chosen."""
    rr, cc = np.nonzero(cands)
    order = np.argsort(score[rr, cc])[::-1]
    chosen: list[tuple[int, int]] = []
    for j in order:
        r, c = int(rr[j]), int(cc[j])
        if all((r - a) ** 2 + (c - b) ** 2 >= min_sep**2 for a, b in chosen):
            chosen.append((r, c))
            if len(chosen) == n:
                break
    return chosen


def smoothing_mm(noise_hu: float | None, acf_sum: float | None, pixel_mm: float, target_hu: float = 10.0) -> float:
    """Box size for tissue segmentation so the smoothed noise stays near ``target_hu``.

    Where ROIs go must depend on anatomy, not on the noise: if smoothed noise still pushes pixels
    out of a tissue window, the distance transform favours quiet patches and every ROI SD reads low
    (6 % at 40 HU of correlated noise with a fixed 5 mm box). A box of n pixels divides the noise
    variance by about n^2 / S, S the sum of the noise autocorrelation (1 for white noise).
    """
    if not noise_hu:
        return 5.0
    n = noise_hu * np.sqrt(max(acf_sum or 1.0, 1.0)) / target_hu
    return float(np.clip(n * pixel_mm, 5.0, 10.0))


def place_rois(img: np.ndarray, info: BodyInfo, geom: SliceGeometry, frame: int, cfg: dict,
               start_index: int = 0, smooth_mm: float = 5.0) -> list[ROI]:
    """ROIs of every tissue on one slice, in patient coordinates."""
    step = 2 if min(img.shape) >= 256 else 1  # masks at half resolution: placement needs no sub-mm detail
    rs, cs = geom.row_spacing * step, geom.col_spacing * step
    radius = float(cfg["roi_diameter_mm"]) / 2.0
    need = radius + float(cfg["roi_margin_mm"])
    per = int(cfg["rois_per_slice"])
    box = max(3, int(round(smooth_mm / min(geom.row_spacing, geom.col_spacing))) | 1)
    sm = ndi.uniform_filter(img.astype(np.float32), box)[::step, ::step]
    body = info.body[::step, ::step]
    fov = info.fov[::step, ::step]
    if not body.any():
        return []
    sampling = (rs, cs)
    px, py = geom.patient_xy(frame, img.shape)
    px, py = px[::step, ::step], py[::step, ::step]
    depth = _edt(body, sampling)
    out: list[ROI] = []

    def add(tissue: str, window_mask: np.ndarray, region: np.ndarray, posterior_of: float | None = None,
            n: int = per, label: str | None = None) -> None:
        """Centres at least radius + margin inside the tissue: the deepest first, or the most posterior."""
        dist = _edt(window_mask, sampling)
        cands = (dist >= need) & region
        sep = 2.0 * radius / min(rs, cs) + 1
        if posterior_of is None:  # spread out: anterior, lateral, posterior fat; air on both sides
            points = _farthest_points(cands, dist, n, sep)
        else:  # stay in the posterior muscle, side by side, rather than spreading into the abdomen
            points = _best_points(cands, (py - posterior_of) + 0.1 * dist, n, sep)
        for r, c in points:
            p = geom.to_patient(frame, float(c * step), float(r * step))
            out.append(ROI(tissue, start_index + len(out), p, radius, label or LABELS[tissue]))

    # subcutaneous fat: fat-window pixels connected to the skin, not deeper than a few cm
    lo, hi = cfg["fat_window_hu"]
    fat = (sm >= lo) & (sm <= hi) & body
    add("fat", fat, depth <= float(cfg["subcutaneous_depth_mm"]))

    # paraspinal muscle: posterior to the vertebral body, either side of the midline
    lo, hi = cfg["muscle_window_hu"]
    muscle = (sm >= lo) & (sm <= hi) & body
    bone = (sm > 200) & body & (depth > 20)
    bx = float(np.average(px, weights=body))
    by_c = float(np.average(py, weights=body))
    ap = float(py[body].max() - py[body].min()) if body.any() else 0.0
    spine = bone & (py > by_c) & (np.abs(px - bx) < 40)
    placed = False
    if spine.sum() * rs * cs > 100:  # at least ~1 cm^2 of bone behind the centre
        lab, nlab = ndi.label(spine)
        sizes = ndi.sum_labels(np.ones_like(px), lab, np.arange(1, nlab + 1))
        vb = lab == (int(np.argmax(sizes)) + 1)
        sx, sy = float(px[vb].mean()), float(py[vb].mean())
        for side in (-1, 1):
            # erector spinae: centres within 45 mm of the midline, behind the vertebral body centre
            region = (py > sy) & (side * (px - sx) > need) & (side * (px - sx) < 45) & (depth > need)
            before = len(out)
            # erector spinae lies just under the posterior subcutaneous fat: prefer the most posterior fit
            add("muscle", muscle, region, posterior_of=sy, n=max(1, (per + 1) // 2))
            placed = placed or len(out) > before
    if not placed and ap > 0:
        # no spine (head, extremity): the deepest soft tissue in the muscle window, named as what it is
        add("soft_tissue", muscle, body)

    # air outside the body but inside the FOV, near the patient (not the FOV rim)
    air = (sm <= float(cfg["air_max_hu"])) & ~body & fov
    outside = ndi.distance_transform_edt(~body, sampling=sampling)
    fov_depth = _edt(fov, sampling)
    add("air", air, (outside <= 80.0) & (fov_depth >= need + 5.0))
    return out


def _pix(geom: SliceGeometry, roi: ROI, frame: int) -> tuple[float, float]:
    rel = roi.centre_patient - geom.positions[frame]
    return float(rel @ geom.row_dir / geom.col_spacing), float(rel @ geom.col_dir / geom.row_spacing)


def circle_mask(shape: tuple[int, int], col: float, row: float, radius_mm: float, row_spacing: float,
                col_spacing: float) -> tuple[slice, slice, np.ndarray]:
    """Pixels whose centres lie within the circle, as a bounding-box slice and a small mask."""
    rr = int(np.ceil(radius_mm / row_spacing)) + 1
    rc = int(np.ceil(radius_mm / col_spacing)) + 1
    r0, r1 = max(0, int(row) - rr), min(shape[0], int(row) + rr + 2)
    c0, c1 = max(0, int(col) - rc), min(shape[1], int(col) + rc + 2)
    yy = (np.arange(r0, r1)[:, None] - row) * row_spacing
    xx = (np.arange(c0, c1)[None, :] - col) * col_spacing
    return slice(r0, r1), slice(c0, c1), (yy**2 + xx**2) <= radius_mm**2


@dataclass
class ROIStats:
    roi: ROI
    series_uid: str
    frame: int
    col: float
    row: float
    mean: float
    sd: float
    n: int


def measure(img: np.ndarray, roi: ROI, geom: SliceGeometry, frame: int, series_uid: str) -> ROIStats | None:
    col, row = _pix(geom, roi, frame)
    rs, cs, m = circle_mask(img.shape, col, row, roi.radius_mm, geom.row_spacing, geom.col_spacing)
    v = img[rs, cs][m].astype(np.float64)
    expected = np.pi * roi.radius_mm**2 / (geom.row_spacing * geom.col_spacing)
    if v.size < 0.9 * expected:  # circle (partly) off this series' image: no measurement, not a smaller one
        return None
    return ROIStats(roi, series_uid, frame, col, row, float(v.mean()), float(v.std(ddof=1)), int(v.size))
