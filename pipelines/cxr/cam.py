"""Class activation maps -> a heatmap over the source image and a polygon around the hot area.

The CAM is the model's own evidence for a label (classifier weights times last-layer features), not
a segmentation; the polygon is the convex hull of the largest connected area above half the map's
peak, which is how reviewers use it: "where did the model look".
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from pipelines.cxr.preprocess import Geometry

#: Heatmaps are stored at reduced resolution; the writer scales them over the source.
HEATMAP_MAX_SIDE = 512


def upsample(cam: np.ndarray, size: int) -> np.ndarray:
    """(h, w) CAM -> (size, size), bilinear, normalised to [0, 1] (flat maps become all zeros)."""
    h, w = cam.shape
    z = ndimage.zoom(cam.astype(np.float32), (size / h, size / w), order=1, mode="nearest")
    lo, hi = float(z.min()), float(z.max())
    return (z - lo) / (hi - lo) if hi > lo else np.zeros_like(z)


def heatmap_on_source(cam_unit: np.ndarray, geom: Geometry) -> np.ndarray:
    """Place the (size, size) map where the model's crop came from, on a reduced grid of the whole image."""
    scale = min(1.0, HEATMAP_MAX_SIDE / max(geom.rows, geom.cols))
    out = np.zeros((max(1, round(geom.rows * scale)), max(1, round(geom.cols * scale))), np.float32)
    side = max(1, round(geom.side * scale))
    z = ndimage.zoom(cam_unit, side / cam_unit.shape[0], order=1)[:side, :side]
    y0, x0 = round(geom.y0 * scale), round(geom.x0 * scale)
    h = min(z.shape[0], out.shape[0] - y0)
    w = min(z.shape[1], out.shape[1] - x0)
    out[y0: y0 + h, x0: x0 + w] = z[:h, :w]
    return np.clip(out, 0.0, 1.0)


def hot_polygon(cam_unit: np.ndarray, geom: Geometry, level: float = 0.5) -> list[tuple[float, float]]:
    """Closed polygon (col, row) in source pixels around the largest region >= level; [] when there is none."""
    mask = cam_unit >= level
    lab, n = ndimage.label(mask)
    if n == 0:
        return []
    sizes = ndimage.sum(mask, lab, index=range(1, n + 1))
    region = lab == int(np.argmax(sizes)) + 1
    # Only each row's first and last pixel can be on the hull: the same hull from ~900 points instead of
    # up to 200 000 (15 ms -> 2 ms a label, which adds up when a study calls all eighteen).
    rows = np.nonzero(region.any(axis=1))[0]
    first = region[rows].argmax(axis=1)
    last = region.shape[1] - 1 - region[rows, ::-1].argmax(axis=1)
    ys, xs = np.concatenate([rows, rows]), np.concatenate([first, last])
    # Pixel corners, not centres, so a one-pixel blob still has an area.
    pts = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (-0.5, 0.5) for dy in (-0.5, 0.5)]).astype(float)
    try:
        hull = pts[ConvexHull(pts).vertices]
    except QhullError:
        return []
    out = []
    for x, y in hull:
        sx, sy = geom.to_source(x, y)
        out.append((float(np.clip(sx, 0, geom.cols - 1)), float(np.clip(sy, 0, geom.rows - 1))))
    out.append(out[0])
    return out
