"""Per-series state of the CT quality analysis and what the scanner reported about each series."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.base import (
    SeriesInput,
    StudyInput,
)
from pipelines.ct_quality import dose as dosemod
from pipelines.ct_quality.geometry import SliceGeometry
from pipelines.ct_quality.noise import GNLResult
from pipelines.ct_quality.roi import (
    ROI,
    ROIStats,
)


# --------------------------------------------------------------------------- per-series state
@dataclass
class TissueSummary:
    tissue: str
    label: str
    mean: float
    sd: float
    snr: float
    cnr: float | None
    n_rois: int
    n_pixels: int


@dataclass
class Check:
    level: str  # pass / warn / fail
    en: str
    zh: str


@dataclass
class SeriesAnalysis:
    series: SeriesInput
    geom: SliceGeometry
    name: str
    gnl: GNLResult
    z: np.ndarray
    wed_mm: np.ndarray  # per frame (interpolated between sampled slices); NaN where unknown
    truncated_frames: list[int]
    metal_frames: list[int]
    missing: int
    gaps: list[tuple[float, float]]
    facts: dict[str, Any]
    ctdivol: np.ndarray  # per frame, NaN where absent
    phantom_cm: int | None = None
    phantom_source: str = ""
    region: str | None = None
    contrast: bool = False
    drl_key: str | None = None
    drl: float | None = None
    noise_target: float | None = None
    ssde: float | None = None
    dlp: float | None = None
    dlp_source: str = ""
    rois: list[ROI] = field(default_factory=list)
    stats: list[ROIStats] = field(default_factory=list)
    tissues: dict[str, TissueSummary] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    verdict: str = "pass"
    key_frame: int = 0

    @property
    def ctdivol_mean(self) -> float | None:
        v = self.ctdivol[np.isfinite(self.ctdivol)]
        return float(v.mean()) if v.size else None

    @property
    def wed_mean(self) -> float | None:
        v = self.wed_mm[np.isfinite(self.wed_mm)]
        return float(v.mean()) if v.size else None


def tag_text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v).strip()


def fg_value(s: SeriesInput, seq: str, attr: str, frame: int | None = None) -> Any:
    """A value from the per-frame, then shared functional groups (Enhanced CT), then top level."""
    sources = []
    if frame is not None and frame < len(s.frame_headers) and s.frame_headers[frame] is not None:
        sources.append(s.frame_headers[frame])
    h0 = s.headers[0]
    shared = h0.get("SharedFunctionalGroupsSequence")
    if shared:
        sources.append(shared[0])
    for src in sources:
        sq = src.get(seq)
        if sq and len(sq) and sq[0].get(attr) is not None:
            return sq[0].get(attr)
    return h0.get(attr)


def acquisition_facts(s: SeriesInput) -> dict[str, Any]:
    """What the scanner reported about acquisition and reconstruction; absent stays absent."""
    h = s.headers[0]
    facts: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        v = tag_text(value)
        if v:
            facts[key] = v

    put("Manufacturer", h.get("Manufacturer"))
    put("ManufacturerModelName", h.get("ManufacturerModelName"))
    put("SeriesDescription", h.get("SeriesDescription"))
    put("ProtocolName", h.get("ProtocolName"))
    put("KVP", fg_value(s, "CTXRayDetailsSequence", "KVP"))
    put("XRayTubeCurrent", h.get("XRayTubeCurrent") or fg_value(s, "CTExposureSequence", "XRayTubeCurrentInmA"))
    put("Exposure", h.get("Exposure") or fg_value(s, "CTExposureSequence", "ExposureInmAs"))
    put("ExposureTime", h.get("ExposureTime") or fg_value(s, "CTExposureSequence", "ExposureTimeInms"))
    put("SliceThickness", s.slice_thickness)
    put("SpiralPitchFactor", h.get("SpiralPitchFactor")
        or fg_value(s, "CTTableDynamicsSequence", "SpiralPitchFactor"))
    put("ConvolutionKernel", h.get("ConvolutionKernel")
        or fg_value(s, "CTReconstructionSequence", "ConvolutionKernel"))
    put("ReconstructionAlgorithm", fg_value(s, "CTReconstructionSequence", "ReconstructionAlgorithm"))
    put("ReconstructionDiameter", h.get("ReconstructionDiameter")
        or fg_value(s, "CTReconstructionSequence", "ReconstructionDiameter"))
    put("ExposureModulationType", h.get("ExposureModulationType")
        or fg_value(s, "CTExposureSequence", "ExposureModulationType"))
    # GE: private creator GEHC_CT_ADVAPP_001, (0053,xx40) annotation, xx41 mode, xx42 config, xx43 level
    try:
        block = h.private_block(0x0053, "GEHC_CT_ADVAPP_001")
        for off, key in ((0x40, "GE IterativeReconAnnotation"), (0x41, "GE IterativeReconMode"),
                         (0x42, "GE IterativeReconConfiguration"), (0x43, "GE IterativeReconLevel")):
            if off in block:
                v = block[off].value
                put(key, v.decode("latin-1", "replace") if isinstance(v, bytes) else v)
    except KeyError:
        pass
    return facts



# --------------------------------------------------------------------------- helpers
def series_name(s: SeriesInput) -> str:
    num = tag_text(s.tags.get("SeriesNumber"))
    desc = tag_text(s.tags.get("SeriesDescription"))
    return " ".join(p for p in ("Series", num, desc) if p) if num or desc else f"Series {s.series_uid[-8:]}"


def series_label(study: StudyInput, uid: str) -> str:
    for s in study.series:
        if s.series_uid == uid:
            return series_name(s)
    return uid


def match_event(rep: dosemod.DoseReport, a: SeriesAnalysis) -> dosemod.DoseEvent | None:
    """The dose-report acquisition these images came from.

    By Irradiation Event UID (0008,3010) when the images carry it; otherwise the event whose
    CTDIvol matches the images within 2 %, preferring the same protocol name.
    """
    uids = {tag_text(h.get("IrradiationEventUID")) for h in a.series.headers} - {""}
    for e in rep.events:
        if e.irradiation_uid and e.irradiation_uid in uids:
            return e
    c = a.ctdivol_mean
    if c is None:
        return rep.events[0] if len(rep.events) == 1 else None
    cands = [e for e in rep.events if e.ctdivol is not None and abs(e.ctdivol - c) <= 0.02 * max(c, 0.1)]
    proto = tag_text(a.series.tags.get("ProtocolName")).upper()
    for e in cands:
        if proto and e.protocol.upper() == proto:
            return e
    return cands[0] if cands else None


def key_frame_of(a: SeriesAnalysis) -> int:
    """The ROI slice with the most tissues and ROIs, nearest the middle."""
    if not a.stats:
        return len(a.series.frames) // 2
    by: dict[int, set[str]] = {}
    cnt: dict[int, int] = {}
    for st in a.stats:
        by.setdefault(st.frame, set()).add(st.roi.tissue)
        cnt[st.frame] = cnt.get(st.frame, 0) + 1
    mid = (len(a.series.frames) - 1) / 2
    return max(by, key=lambda f: (len(by[f]), cnt[f], -abs(f - mid)))


def summarise_tissues(a: SeriesAnalysis) -> None:
    """Pooled within-ROI SD (sqrt of mean variance) so mean differences between ROIs are not noise."""
    out: dict[str, TissueSummary] = {}
    for t in {st.roi.tissue for st in a.stats}:
        ss = [st for st in a.stats if st.roi.tissue == t]
        w = np.array([st.n for st in ss], float)
        mean = float(np.average([st.mean for st in ss], weights=w))
        sd = float(np.sqrt(np.average([st.sd**2 for st in ss], weights=w)))
        label = ss[0].roi.label
        if sd <= 0:  # clipped air (-1024 everywhere) carries no noise information
            continue
        out[t] = TissueSummary(t, label, mean, sd, mean / sd, None, len(ss), int(w.sum()))
    fat = out.get("fat")
    for t, ts in out.items():
        if t != "fat" and fat is not None and fat.sd > 0:
            ts.cnr = (ts.mean - fat.mean) / fat.sd
    a.tissues = out
