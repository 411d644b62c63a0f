"""Pixel <-> patient coordinates of one axial series, so ROIs can move between reconstructions.

DICOM: P = IPP + X * (column * column_spacing) + Y * (row * row_spacing), X and Y the row and
column direction cosines of ImageOrientationPatient, PixelSpacing = [row spacing, column spacing].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.base import SeriesInput


@dataclass
class SliceGeometry:
    """Geometry shared by the slices of one series; only the position changes along z."""

    positions: np.ndarray  # (frames, 3)
    row_dir: np.ndarray  # X: direction of increasing column index
    col_dir: np.ndarray  # Y: direction of increasing row index
    normal: np.ndarray
    row_spacing: float
    col_spacing: float
    slice_pos: np.ndarray  # (frames,) along the normal

    @classmethod
    def of(cls, s: SeriesInput) -> SliceGeometry | None:
        if s.orientation is None or s.positions is None or s.pixel_spacing is None:
            return None
        x = np.asarray(s.orientation[:3], float)
        y = np.asarray(s.orientation[3:], float)
        n = np.cross(x, y)
        pos = np.asarray(s.positions, float)
        return cls(pos, x, y, n, float(s.pixel_spacing[0]), float(s.pixel_spacing[1]), pos @ n)

    def to_patient(self, frame: int, col: float, row: float) -> np.ndarray:
        return self.positions[frame] + self.row_dir * col * self.col_spacing + self.col_dir * row * self.row_spacing

    def to_pixel(self, point: np.ndarray, tolerance_mm: float) -> tuple[int, float, float] | None:
        """(frame, col, row) of the slice nearest to ``point``; None if no slice is within tolerance."""
        d = float(np.dot(point, self.normal))
        frame = int(np.argmin(np.abs(self.slice_pos - d)))
        if abs(self.slice_pos[frame] - d) > tolerance_mm:
            return None
        rel = point - self.positions[frame]
        return frame, float(rel @ self.row_dir / self.col_spacing), float(rel @ self.col_dir / self.row_spacing)

    def patient_xy(self, frame: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Patient x (right->left) and y (anterior->posterior) of every pixel of one slice."""
        r = np.arange(shape[0])[:, None] * self.row_spacing
        c = np.arange(shape[1])[None, :] * self.col_spacing
        p = self.positions[frame]
        px = p[0] + self.row_dir[0] * c + self.col_dir[0] * r
        py = p[1] + self.row_dir[1] * c + self.col_dir[1] * r
        return px, py


def is_axial(orientation: np.ndarray | None, tolerance: float = 0.85) -> bool:
    """Slice normal within ~32 degrees of the patient z axis (gantry tilt allowed)."""
    if orientation is None:
        return False
    n = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    norm = np.linalg.norm(n)
    return bool(norm > 0 and abs(n[2]) / norm >= tolerance)
