"""Turn spooled instance files into a ``StudyInput``: decoded, rescaled, sorted, with geometry.

Decoding goes through pydicom's pixel handlers (pylibjpeg-openjpeg / -libjpeg / -rle and
python-gdcm), so every transfer syntax the SCP accepts decodes here too.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_rescale

from pipelines.base import ImageRef, SeriesInput, StudyInput

log = logging.getLogger(__name__)

STUDY_KEYWORDS = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber", "StudyID",
    "PatientAge", "PatientSex", "PatientWeight", "PatientSize", "BodyPartExamined",
)


def _float_list(value: Any) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if c is None or w is None:
        return None
    c = c[0] if isinstance(c, pydicom.multival.MultiValue) else c
    w = w[0] if isinstance(w, pydicom.multival.MultiValue) else w
    try:
        return float(c), float(w)
    except (TypeError, ValueError):
        return None


def _tags(ds: Dataset) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN") or elem.keyword == "":
            continue
        v = elem.value
        if isinstance(v, pydicom.multival.MultiValue):
            v = [str(x) if not isinstance(x, (int, float)) else x for x in v]
        elif isinstance(v, (pydicom.valuerep.PersonName, pydicom.uid.UID)):
            v = str(v)
        elif isinstance(v, bytes):
            continue
        out[elem.keyword] = v
    return out


def _frames_of(ds: Dataset, path: Path) -> list[tuple[ImageRef, np.ndarray | None, Dataset | None]]:
    """(ref, position, per-frame header) for each frame of one instance."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    series_uid, sop_uid, sop_class = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID)
    if n == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        pos = _float_list(ds.get("ImagePositionPatient"))
        return [(ImageRef(series_uid, sop_uid, sop_class), np.array(pos) if pos else None, None)]
    out = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    for i in range(n):
        fg = per_frame[i] if i < len(per_frame) else None
        pos = None
        if fg is not None and "PlanePositionSequence" in fg:
            pos = _float_list(fg.PlanePositionSequence[0].get("ImagePositionPatient"))
        out.append((ImageRef(series_uid, sop_uid, sop_class, frame=i + 1), np.array(pos) if pos else None, fg))
    return out


def _shared(ds: Dataset, fg: Dataset | None, seq: str, attr: str) -> Any:
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    for source in (fg, shared):
        if source is not None and seq in source and len(source[seq].value):
            v = source[seq][0].get(attr)
            if v is not None:
                return v
    return ds.get(attr)


def _modality_lut(ds: Dataset, fg: Dataset | None, arr: np.ndarray) -> np.ndarray:
    if fg is not None or "SharedFunctionalGroupsSequence" in ds:
        slope = _shared(ds, fg, "PixelValueTransformationSequence", "RescaleSlope")
        inter = _shared(ds, fg, "PixelValueTransformationSequence", "RescaleIntercept")
        if slope is not None or inter is not None:
            return arr.astype(np.float32) * float(slope if slope is not None else 1) + float(inter or 0)
        return arr.astype(np.float32)
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return np.asarray(apply_rescale(arr, ds), dtype=np.float32)
    return arr.astype(np.float32)


def read_header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def load_series(paths: Iterable[Path], pixels: bool = True) -> SeriesInput:
    items = []
    for p in paths:
        ds = pydicom.dcmread(p) if pixels else read_header(p)
        items.append((Path(p), ds))
    if not items:
        raise ValueError("empty series")
    first = items[0][1]
    frames: list[tuple[ImageRef, np.ndarray | None, Dataset | None, Path, Dataset]] = []
    for p, ds in items:
        for ref, pos, fg in _frames_of(ds, p):
            frames.append((ref, pos, fg, p, ds))

    orientation = None
    fg0 = frames[0][2]
    iop = _float_list(_shared(first, fg0, "PlaneOrientationSequence", "ImageOrientationPatient"))
    if iop and len(iop) == 6:
        orientation = np.array(iop)
    normal = np.cross(orientation[:3], orientation[3:]) if orientation is not None else None
    slice_pos = None
    if normal is not None and all(f[1] is not None and len(f[1]) == 3 for f in frames):
        z = np.array([float(np.dot(f[1], normal)) for f in frames])
        order = np.argsort(z, kind="stable")
        frames = [frames[i] for i in order]
        slice_pos = z[order]
    else:
        def inst_key(f: Any) -> tuple[int, int]:
            return int(f[4].get("InstanceNumber", 0) or 0), f[0].frame or 0
        frames.sort(key=inst_key)

    spacing = _float_list(_shared(first, fg0, "PixelMeasuresSequence", "PixelSpacing")) or _float_list(
        first.get("ImagerPixelSpacing"))
    thickness = _shared(first, fg0, "PixelMeasuresSequence", "SliceThickness")

    arr = None
    photometric = str(first.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels and "PixelData" in first:
        decoded: dict[str, np.ndarray] = {}
        planes = []
        for ref, _pos, fg, _p, ds in frames:
            if ref.sop_instance_uid not in decoded:
                decoded[ref.sop_instance_uid] = ds.pixel_array
            a = decoded[ref.sop_instance_uid]
            if ref.frame is not None and int(ds.get("NumberOfFrames", 1) or 1) > 1:
                a = a[ref.frame - 1]
            if int(ds.get("SamplesPerPixel", 1)) == 1:
                a = _modality_lut(ds, fg, a)
            planes.append(a)
        shapes = {a.shape for a in planes}
        if len(shapes) != 1:
            raise ValueError(f"series {first.SeriesInstanceUID} mixes image sizes {sorted(shapes)}")
        arr = np.stack(planes)
        if "PhotometricInterpretation" in first and photometric.startswith(("YBR", "RGB")):
            photometric = "RGB"  # pydicom converts YBR to RGB by default

    headers = [ds for _, ds in items]
    if pixels:  # keep headers light: the pixels live in ``arr``
        for ds in headers:
            if "PixelData" in ds:
                del ds.PixelData
    return SeriesInput(
        series_uid=str(first.SeriesInstanceUID),
        modality=str(first.get("Modality", "OT")),
        sop_class_uid=str(first.SOPClassUID),
        frames=[f[0] for f in frames],
        headers=headers,
        pixels=arr,
        pixel_spacing=(spacing[0], spacing[1]) if spacing and len(spacing) >= 2 else None,
        positions=np.array([f[1] for f in frames]) if slice_pos is not None else None,
        orientation=orientation,
        slice_positions=slice_pos,
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        photometric=photometric,
        window=_first_window(first),
        frame_headers=[f[2] for f in frames if f[2] is not None],
        tags=_tags(first),
        paths=[p for p, _ in items],
    )


NO_PIXEL_MODALITIES = {"SR", "KO", "PR", "DOC"}


def load_study(paths: Iterable[str | Path], options: dict[str, Any] | None = None, language: str = "en",
               pixels: bool = True) -> StudyInput:
    """Group files by series and load each; a series that fails to decode is logged and skipped."""
    groups: dict[str, list[Path]] = defaultdict(list)
    headers: dict[str, Dataset] = {}
    study_uid = None
    for p in paths:
        p = Path(p)
        h = read_header(p)
        study_uid = study_uid or str(h.StudyInstanceUID)
        groups[str(h.SeriesInstanceUID)].append(p)
        headers.setdefault(str(h.SeriesInstanceUID), h)
    series = []
    for uid, files in groups.items():
        h = headers[uid]
        want_pixels = pixels and str(h.get("Modality", "")) not in NO_PIXEL_MODALITIES
        try:
            series.append(load_series(files, pixels=want_pixels))
        except Exception as exc:  # one bad series must not sink the study
            log.warning("series %s could not be loaded: %s", uid, exc)
    if study_uid is None:
        raise ValueError("no instances")
    first = next(iter(headers.values()))
    tags = {k: _tags(first).get(k) for k in STUDY_KEYWORDS if k in first}
    return StudyInput(study_uid=study_uid, series=series, tags=tags, options=dict(options or {}),
                      language=language)
