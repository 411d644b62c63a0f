"""CT image quality and dose per axial series: GNL, ROI noise / SNR / CNR, size and dose, verdicts,
and a side-by-side comparison when one acquisition was reconstructed several ways.

Pure: StudyInput in, PipelineResult out. Everything the scanner reports (kVp, mA, kernel, CTDIvol
...) is copied, never inferred; what we compute (noise, WED, SSDE) says how.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.base import (
    PRIVATE_SCHEME,
    UCUM_CM,
    UCUM_HU,
    UCUM_KGM2,
    UCUM_MGY,
    UCUM_MGYCM,
    UCUM_PERCENT,
    UCUM_RATIO,
    Code,
    Evaluation,
    Measurement,
    Narrative,
    Overlay,
    Pipeline,
    PipelineResult,
    Refused,
    Region,
    SeriesInput,
    StudyInput,
)
from pipelines.ct_quality import dose as dosemod
from pipelines.ct_quality import render
from pipelines.ct_quality.config import settings
from pipelines.ct_quality.geometry import SliceGeometry, is_axial
from pipelines.ct_quality.noise import GNLResult, global_noise_level, local_mean_sd, tissue_centres
from pipelines.ct_quality.roi import (
    LABELS,
    ROI,
    ROIStats,
    body_info,
    downsample2,
    measure,
    place_rois,
    smoothing_mm,
)
from pipelines.options import ct_quality_options

log = logging.getLogger(__name__)


C_MEAN = Code("112181", "DCM", "Mean attenuation coefficient")
C_SD = Code("112183", "DCM", "Standard deviation of attenuation coefficient")
C_SNR = Code("111787", "DCM", "Signal to noise ratio")
C_CNR = Code("CNR", PRIVATE_SCHEME, "Contrast to noise ratio (tissue vs subcutaneous fat)")
C_GNL = Code("GNL", PRIVATE_SCHEME, "Global noise level (soft tissue)")
C_CNR_GAIN = Code("CNRGAIN", PRIVATE_SCHEME, "Relative CNR gain over baseline reconstruction")
C_DRL_PCT = Code("DRLPCT", PRIVATE_SCHEME, "CTDIvol as percentage of diagnostic reference level")
C_CTDIVOL = Code("113830", "DCM", "Mean CTDIvol")
C_SSDE = Code("113930", "DCM", "Size Specific Dose Estimation")
C_WED = Code("113980", "DCM", "Water Equivalent Diameter")
C_DLP = Code("113838", "DCM", "DLP")
C_DLP_TOTAL = Code("113813", "DCM", "CT Dose Length Product Total")
C_BMI = Code("39156-5", "LN", "Body mass index (BMI) [Ratio]")
C_QUALITY = Code("111101", "DCM", "Image quality")
VERDICT_CODES = {
    "pass": Code("IQPASS", PRIVATE_SCHEME, "pass"),
    "warn": Code("IQWARN", PRIVATE_SCHEME, "warn"),
    "fail": Code("IQFAIL", PRIVATE_SCHEME, "fail"),
}
RANK = {"pass": 0, "warn": 1, "fail": 2}
PROCEDURE = Code("25045-6", "LN", "CT unspecified body region")
FBP_PATTERN = re.compile(r"\bFBP\b|FILTER(ED)?[ _]?BACK|FILTER_BACK_PROJ", re.I)


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


def _s(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v).strip()


def _fg_value(s: SeriesInput, seq: str, attr: str, frame: int | None = None) -> Any:
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
        v = _s(value)
        if v:
            facts[key] = v

    put("Manufacturer", h.get("Manufacturer"))
    put("ManufacturerModelName", h.get("ManufacturerModelName"))
    put("SeriesDescription", h.get("SeriesDescription"))
    put("ProtocolName", h.get("ProtocolName"))
    put("KVP", _fg_value(s, "CTXRayDetailsSequence", "KVP"))
    put("XRayTubeCurrent", h.get("XRayTubeCurrent") or _fg_value(s, "CTExposureSequence", "XRayTubeCurrentInmA"))
    put("Exposure", h.get("Exposure") or _fg_value(s, "CTExposureSequence", "ExposureInmAs"))
    put("ExposureTime", h.get("ExposureTime") or _fg_value(s, "CTExposureSequence", "ExposureTimeInms"))
    put("SliceThickness", s.slice_thickness)
    put("SpiralPitchFactor", h.get("SpiralPitchFactor")
        or _fg_value(s, "CTTableDynamicsSequence", "SpiralPitchFactor"))
    put("ConvolutionKernel", h.get("ConvolutionKernel")
        or _fg_value(s, "CTReconstructionSequence", "ConvolutionKernel"))
    put("ReconstructionAlgorithm", _fg_value(s, "CTReconstructionSequence", "ReconstructionAlgorithm"))
    put("ReconstructionDiameter", h.get("ReconstructionDiameter")
        or _fg_value(s, "CTReconstructionSequence", "ReconstructionDiameter"))
    put("ExposureModulationType", h.get("ExposureModulationType")
        or _fg_value(s, "CTExposureSequence", "ExposureModulationType"))
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


# --------------------------------------------------------------------------- the pipeline
class CTQualityPipeline(Pipeline):
    """Image quality and dose report for every axial CT series of a study."""

    name = "ct_quality"
    Options = ct_quality_options()  # every option this pipeline reads (node.pipeline_options)
    version = "1.0.0"
    modalities = frozenset({"CT", "SR"})
    device = "cpu"
    memory_mb = 1536
    _cfg_param_types: list[str] = ["PERFUSION"]

    def check(self, study: StudyInput) -> None:
        if not any(s.modality == "CT" for s in study.series):
            raise Refused(f"{self.name} needs a CT series; study has {sorted({s.modality for s in study.series})}")

    # ---- selection
    def qualify(self, s: SeriesInput) -> str | None:
        """None when the series is an axial CT image series we can measure, else why not."""
        if s.modality != "CT":
            return f"modality {s.modality}"
        if s.pixels is None:
            return "no pixel data"
        image_type = [str(x).upper() for x in (s.tags.get("ImageType") or [])]
        if isinstance(s.tags.get("ImageType"), str):
            image_type = str(s.tags["ImageType"]).upper().split("\\")
        if "LOCALIZER" in image_type:
            return "localizer (ImageType LOCALIZER)"
        maps = sorted(set(image_type) & set(self._cfg_param_types))
        if maps:
            return f"parametric map (ImageType {'/'.join(maps)}), not attenuation in HU"
        rescale_type = _s(s.tags.get("RescaleType")) or _s(_fg_value(s, "PixelValueTransformationSequence",
                                                                          "RescaleType"))
        if rescale_type and rescale_type.upper() != "HU":
            return f"pixel values are not HU (RescaleType {rescale_type})"
        if s.pixels.ndim != 3:
            return "not greyscale"
        if not is_axial(s.orientation):
            if len(s.frames) == 1:
                return "single non-axial slice (localizer / scout)"
            return "non-axial series (reformat); measured only on axial images"
        if s.pixel_spacing is None or s.positions is None:
            return "no PixelSpacing / ImagePositionPatient"
        return None

    def run(self, study: StudyInput) -> PipelineResult:
        self.check(study)
        cfg = settings(self.options, study.options)
        self._cfg_param_types = [str(t).upper() for t in cfg["parametric_image_types"]]
        skipped: dict[str, str] = {}
        chosen: list[SeriesInput] = []
        dose_reports = []
        for s in study.series:
            if s.modality == "SR":
                for h in s.headers:
                    rep = dosemod.parse_dose_sr(h)
                    if rep is not None:
                        dose_reports.append(rep)
                continue
            why = self.qualify(s)
            if why:
                skipped[s.series_uid] = why
                log.info("ct_quality: series %s skipped: %s", s.series_uid, why)
            else:
                chosen.append(s)
        if not chosen:
            reasons = "; ".join(f"{uid}: {why}" for uid, why in skipped.items()) or "no CT image series"
            raise Refused(f"no axial CT image series to measure ({reasons})")

        analyses = [self._analyse(s, study, cfg, dose_reports) for s in chosen]
        groups = _comparison_groups(analyses)
        grouped = {id(a) for g in groups for a in g}
        for g in groups:
            self._place_and_measure(g, cfg)
        for a in analyses:
            if id(a) not in grouped:
                self._place_and_measure([a], cfg)
        for a in analyses:
            _summarise_tissues(a)
            self._verdict(a, cfg)
        comparisons = [_compare(g) for g in groups]
        return self._result(study, analyses, comparisons, skipped, dose_reports, cfg)

    # ---- per series
    def _analyse(self, s: SeriesInput, study: StudyInput, cfg: dict[str, Any],
                 dose_reports: list[dosemod.DoseReport]) -> SeriesAnalysis:
        geom = SliceGeometry.of(s)
        assert geom is not None and s.pixels is not None
        px = s.pixels
        n = px.shape[0]
        spacing = float(min(geom.row_spacing, geom.col_spacing))
        gnl = global_noise_level(px, spacing, tuple(cfg["gnl_window_hu"]), float(cfg["gnl_kernel_mm"]),
                                 int(cfg["gnl_min_pixels"]), bool(cfg["gnl_texture_correction"]),
                                 float(cfg["gnl_max_correction"]), float(cfg["fov_padding_below_hu"]))
        z = geom.slice_pos
        # size: body outline on up to 40 slices, interpolated along z
        idx = np.unique(np.linspace(0, n - 1, min(n, 40)).round().astype(int))
        wed_s, trunc = [], []
        for i in idx:
            # half resolution is plenty for an outline: 2x2 block means keep the HU sum exact
            info = body_info(downsample2(px[i]), 4 * geom.row_spacing * geom.col_spacing,
                             float(cfg["body_threshold_hu"]), float(cfg["fov_padding_below_hu"]),
                             float(cfg["truncation_min_fraction"]))
            wed_s.append(info.wed_mm if info.wed_mm is not None else np.nan)
            if info.truncated_fraction > 0:
                trunc.append(int(i))
        wed_s_arr = np.array(wed_s, float)
        ok = np.isfinite(wed_s_arr)
        wed = np.interp(z, z[idx][ok], wed_s_arr[ok]) if ok.any() else np.full(n, np.nan)
        # metal
        counts = np.count_nonzero(px > float(cfg["metal_threshold_hu"]), axis=(1, 2))
        metal = [int(i) for i in np.nonzero(counts >= int(cfg["metal_min_pixels"]))[0]]
        # gaps
        missing, gaps = 0, []
        if n >= 3:
            dz = np.diff(z)
            step = float(np.median(dz))
            if step > 0:
                for i in np.nonzero(dz > float(cfg["gap_tolerance"]) * step)[0]:
                    missing += int(round(dz[i] / step)) - 1
                    gaps.append((float(z[i]), float(z[i + 1])))
        # dose indices as reported
        by_uid = {str(h.SOPInstanceUID): h for h in s.headers}
        ctdi = np.full(n, np.nan)
        for i, ref in enumerate(s.frames):
            h = by_uid.get(ref.sop_instance_uid)
            v = h.get("CTDIvol") if h is not None else None
            if v is None and s.is_multiframe:
                v = _fg_value(s, "CTExposureSequence", "CTDIvol", i)
            if v not in (None, ""):
                ctdi[i] = float(v)
        h0 = s.headers[0]
        texts = [_s(h0.get(k)) or _s(study.tags.get(k)) for k in
                 ("BodyPartExamined", "ProtocolName", "SeriesDescription", "StudyDescription")]
        region, contrast = dosemod.body_region(texts, cfg)
        a = SeriesAnalysis(s, geom, _series_name(s), gnl, z, wed, trunc, metal, missing, gaps,
                           acquisition_facts(s), ctdi, region=region, contrast=contrast)
        phantom = dosemod.phantom_from_code(h0)
        if phantom is None and s.is_multiframe:
            seq = _fg_value(s, "CTExposureSequence", "CTDIPhantomTypeCodeSequence")
            if seq:
                phantom = dosemod.phantom_from_code({"CTDIPhantomTypeCodeSequence": seq})
        if phantom is not None:
            a.phantom_cm, a.phantom_source = phantom, "CTDIPhantomTypeCodeSequence"
        elif a.ctdivol_mean is not None:
            a.phantom_cm = 16 if region == "head" else 32
            a.phantom_source = f"assumed from body region ({region or 'unknown'})"
        if a.ctdivol_mean is not None and np.isfinite(wed).any() and a.phantom_cm:
            f = np.array([dosemod.ssde_factor(w, a.phantom_cm) if np.isfinite(w) else np.nan for w in wed])
            v = f * ctdi
            a.ssde = float(np.nanmean(v)) if np.isfinite(v).any() else None
        proto_key = {str(k).upper(): v for k, v in (cfg.get("protocol_keys") or {}).items()}.get(
            _s(h0.get("ProtocolName")).upper())
        if proto_key:
            a.drl_key = proto_key if proto_key in cfg["drl_ctdivol_mgy"] else None
            a.region = proto_key.removesuffix("_contrast")
        else:
            a.drl_key = dosemod.reference_key(region, contrast, cfg["drl_ctdivol_mgy"])
        a.drl = float(cfg["drl_ctdivol_mgy"][a.drl_key]) if a.drl_key else None
        targets = cfg["noise_target_hu"]
        key = proto_key if proto_key in targets else a.drl_key if a.drl_key in targets else (
            a.region if a.region in targets else "default")
        a.noise_target = float(targets[key]) if key in targets else None
        # DLP: the dose report event for this series' CTDIvol (same protocol/CTDIvol), else none
        for rep in dose_reports:
            ev = _match_event(rep, a)
            if ev is not None and ev.dlp is not None:
                a.dlp, a.dlp_source = ev.dlp, f"dose SR {rep.sop_instance_uid} event '{ev.protocol}'"
                break
        return a

    def _place_and_measure(self, group: list[SeriesAnalysis], cfg: dict[str, Any]) -> None:
        """ROIs placed once on the cleanest series of the group, measured on all at the same patient points."""
        ref = min(group, key=lambda a: a.gnl.value if a.gnl.value is not None else np.inf)
        px = ref.series.pixels
        assert px is not None
        n = px.shape[0]
        k = int(cfg["roi_slices"])
        lo, hi = (0.1, 0.9) if n >= 5 else (0.0, 1.0)
        frames = np.unique(np.round(np.linspace(lo, hi, min(n, k)) * (n - 1)).astype(int)) if n > 1 else np.array([0])
        rois: list[ROI] = []
        smooth = smoothing_mm(ref.gnl.value, ref.gnl.acf.get("sum"), min(ref.geom.row_spacing, ref.geom.col_spacing))
        for f in frames:
            info = body_info(px[f], ref.geom.row_spacing * ref.geom.col_spacing, float(cfg["body_threshold_hu"]),
                             float(cfg["fov_padding_below_hu"]))
            rois += place_rois(px[f], info, ref.geom, int(f), cfg, start_index=len(rois), smooth_mm=smooth)
        # per-tissue numbering for labels
        seen: dict[str, int] = {}
        for r in rois:
            seen[r.tissue] = seen.get(r.tissue, 0) + 1
            r.index = seen[r.tissue]
        for a in group:
            a.rois = []
            a.stats = []
        common = []
        for r in rois:
            per = []
            for a in group:
                step = float(np.median(np.diff(a.z))) if len(a.z) > 1 else float(a.series.slice_thickness or 1.0)
                tol = max(0.5, 0.5 * step)  # nearest slice, never a neighbour half a slice away
                hit = a.geom.to_pixel(r.centre_patient, tol)
                if hit is None:
                    break
                st = measure(a.series.pixels[hit[0]], r, a.geom, hit[0], a.series.series_uid)  # type: ignore[index]
                if st is None:
                    break
                per.append((a, st))
            else:
                common.append(r)
                for a, st in per:
                    a.stats.append(st)
        for a in group:
            a.rois = list(common)
            a.key_frame = _key_frame(a)

    def _verdict(self, a: SeriesAnalysis, cfg: dict[str, Any]) -> None:
        checks: list[Check] = []
        g = a.gnl.value
        if g is not None and a.noise_target:
            if g > a.noise_target * float(cfg["noise_fail_factor"]):
                checks.append(Check("fail", f"noise {g:.1f} HU well above target {a.noise_target:g} HU",
                                    f"噪声 {g:.1f} HU 明显高于目标值 {a.noise_target:g} HU"))
            elif g > a.noise_target:
                checks.append(Check("warn", f"noise {g:.1f} HU above target {a.noise_target:g} HU",
                                    f"噪声 {g:.1f} HU 高于目标值 {a.noise_target:g} HU"))
        elif g is None:
            checks.append(Check("warn", "no soft tissue for a global noise level",
                                "无足够软组织，无法计算全局噪声水平"))
        c = a.ctdivol_mean
        if c is not None and a.drl:
            if c > a.drl * float(cfg["drl_fail_factor"]):
                fac = float(cfg["drl_fail_factor"])
                checks.append(Check("fail", f"CTDIvol {c:.1f} mGy above {fac:g}x the reference level {a.drl:g} mGy",
                                    f"CTDIvol {c:.1f} mGy 超过参考水平 {a.drl:g} mGy 的 {fac:g} 倍"))
            elif c > a.drl:
                checks.append(Check("warn", f"CTDIvol {c:.1f} mGy above the reference level {a.drl:g} mGy",
                                    f"CTDIvol {c:.1f} mGy 高于诊断参考水平 {a.drl:g} mGy"))
        if a.truncated_frames:
            checks.append(Check("warn", f"body truncated by the field of view on {len(a.truncated_frames)} sampled "
                                        "slice(s): water-equivalent diameter underestimated, SSDE overestimated",
                                f"{len(a.truncated_frames)} 个抽样层面身体超出扫描视野（截断）："
                                "水等效直径偏小，SSDE 偏大"))
        if a.metal_frames:
            checks.append(Check("warn", f"metal (> {cfg['metal_threshold_hu']} HU) on {len(a.metal_frames)} slice(s)",
                                f"{len(a.metal_frames)} 个层面存在金属（> {cfg['metal_threshold_hu']} HU）"))
        if a.missing:
            checks.append(Check("fail", f"{a.missing} missing slice(s): gaps in slice positions "
                                + ", ".join(f"{z0:.1f}-{z1:.1f} mm" for z0, z1 in a.gaps),
                                f"缺失 {a.missing} 个层面（层面位置存在间隙）"))
        a.checks = checks
        a.verdict = max((ch.level for ch in checks), key=lambda v: RANK[v], default="pass")

    # ---- result
    def _result(self, study: StudyInput, analyses: list[SeriesAnalysis], comparisons: list[dict[str, Any]],
                skipped: dict[str, str], dose_reports: list[dosemod.DoseReport], cfg: dict[str, Any]) -> PipelineResult:
        res = PipelineResult(self.name, self.version, procedure=PROCEDURE)
        en_lines: list[str] = []
        zh_lines: list[str] = []
        for a in analyses:
            _measurements(res, a, study)
            res.evaluations.append(Evaluation(C_QUALITY, VERDICT_CODES[a.verdict], group=a.name,
                                              note="; ".join(c.en for c in a.checks) or "all checks passed"))
            key = a.series.frames[a.key_frame]
            if key not in res.key_images:
                res.key_images.append(key)
            en, zh = _narrative_lines(a)
            en_lines.append(en)
            zh_lines.append(zh)
        for rep in dose_reports:
            if rep.total_dlp is not None:
                res.measurements.append(Measurement(C_DLP_TOTAL, rep.total_dlp, UCUM_MGYCM, group="Study dose",
                                                    label="Total DLP (CT Radiation Dose SR)"))
        w, hgt = study.tags.get("PatientWeight"), study.tags.get("PatientSize")
        bmi = None
        try:
            if w and hgt and float(hgt) > 0.3:
                bmi = float(w) / float(hgt) ** 2
                res.measurements.append(Measurement(C_BMI, round(bmi, 1), UCUM_KGM2, group="Patient",
                                                    label="BMI from PatientWeight / PatientSize"))
        except (TypeError, ValueError):
            bmi = None
        for comp in comparisons:
            en, zh = _comparison_lines(comp)
            en_lines.append(en)
            zh_lines.append(zh)
            for row in comp["rows"]:
                for t, gain in row["cnr_gain"].items():
                    if gain is not None:
                        res.measurements.append(Measurement(
                            C_CNR_GAIN, round(100 * gain, 1), UCUM_PERCENT, group=f"Comparison {row['name']}",
                            label=f"{LABELS.get(t, t)} CNR vs {comp['baseline_name']}", series_uid=row["series_uid"]))
        worst = max((a.verdict for a in analyses), key=lambda v: RANK[v])
        totals = [r.total_dlp for r in dose_reports if r.total_dlp is not None]
        en_imp = f"Overall image quality verdict: {worst.upper()}."
        zh_imp = f"总体图像质量结论：{ {'pass': '通过', 'warn': '警告', 'fail': '不合格'}[worst]}。"
        if totals:
            en_imp += f" Total DLP {totals[0]:.0f} mGy·cm (dose report)."
            zh_imp += f" 总 DLP {totals[0]:.0f} mGy·cm（剂量报告）。"
        if bmi is not None:  # a patient fact for the findings, not an impression about image quality
            en_lines.append(f"Patient: BMI {bmi:.1f} kg/m² (from PatientWeight / PatientSize).")
            zh_lines.append(f"患者：BMI {bmi:.1f} kg/m²（由体重 / 身高计算）。")
        if skipped:
            names = {u: _series_label(study, u) for u in skipped}
            en_lines.append("Not measured: " + "; ".join(f"{names[u]} ({why})" for u, why in skipped.items()))
            zh_lines.append("未测量：" + "；".join(f"{names[u]}（{why}）" for u, why in skipped.items()))
        rec_en = [c.en for a in analyses for c in a.checks if c.level != "pass"]
        rec_zh = [c.zh for a in analyses for c in a.checks if c.level != "pass"]
        res.narrative = {
            "en": Narrative(findings="\n".join(en_lines), impression=en_imp,
                            recommendations=("Review: " + "; ".join(rec_en) + ".") if rec_en else ""),
            "zh": Narrative(findings="\n".join(zh_lines), impression=zh_imp,
                            recommendations=("请复核：" + "；".join(rec_zh) + "。") if rec_zh else ""),
        }
        try:
            res.overlays = _overlays(analyses, comparisons, tuple(cfg["gnl_window_hu"]))
        except Exception as exc:  # pictures are a convenience; the numbers must still go out
            log.warning("ct_quality: rendering failed: %s", exc)
            res.warnings.append(f"overlay rendering failed: {exc}")
        for a in analyses:
            if a.gnl.correction_capped:
                res.warnings.append(f"{a.name}: GNL texture correction capped at {a.gnl.correction:.2f}")
        res.details = {
            "summary": render.summary(analyses, comparisons),
            "skipped": skipped,
            "series": [_details(a) for a in analyses],
            "comparisons": comparisons,
            "dose_reports": [{"sop_instance_uid": r.sop_instance_uid, "total_dlp": r.total_dlp,
                              "events": [e.__dict__ for e in r.events]} for r in dose_reports],
            "settings": {k: cfg[k] for k in ("gnl_window_hu", "gnl_kernel_mm", "roi_diameter_mm", "roi_slices",
                                             "rois_per_slice", "metal_threshold_hu")},
        }
        return res


# --------------------------------------------------------------------------- helpers
def _series_name(s: SeriesInput) -> str:
    num = _s(s.tags.get("SeriesNumber"))
    desc = _s(s.tags.get("SeriesDescription"))
    return " ".join(p for p in ("Series", num, desc) if p) if num or desc else f"Series {s.series_uid[-8:]}"


def _series_label(study: StudyInput, uid: str) -> str:
    for s in study.series:
        if s.series_uid == uid:
            return _series_name(s)
    return uid


def _match_event(rep: dosemod.DoseReport, a: SeriesAnalysis) -> dosemod.DoseEvent | None:
    """The dose-report acquisition these images came from.

    By Irradiation Event UID (0008,3010) when the images carry it; otherwise the event whose
    CTDIvol matches the images within 2 %, preferring the same protocol name.
    """
    uids = {_s(h.get("IrradiationEventUID")) for h in a.series.headers} - {""}
    for e in rep.events:
        if e.irradiation_uid and e.irradiation_uid in uids:
            return e
    c = a.ctdivol_mean
    if c is None:
        return rep.events[0] if len(rep.events) == 1 else None
    cands = [e for e in rep.events if e.ctdivol is not None and abs(e.ctdivol - c) <= 0.02 * max(c, 0.1)]
    proto = _s(a.series.tags.get("ProtocolName")).upper()
    for e in cands:
        if proto and e.protocol.upper() == proto:
            return e
    return cands[0] if cands else None


def _key_frame(a: SeriesAnalysis) -> int:
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


def _summarise_tissues(a: SeriesAnalysis) -> None:
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


def _comparison_groups(analyses: list[SeriesAnalysis]) -> list[list[SeriesAnalysis]]:
    """Series of one acquisition: same FrameOfReferenceUID, parallel slices, overlapping z-range."""
    groups: list[list[SeriesAnalysis]] = []
    for a in analyses:
        for_uid = _s(a.series.tags.get("FrameOfReferenceUID"))
        if not for_uid:
            continue
        placed = False
        for g in groups:
            b = g[0]
            if _s(b.series.tags.get("FrameOfReferenceUID")) != for_uid:
                continue
            if abs(float(np.dot(a.geom.normal, b.geom.normal))) < 0.999:
                continue
            lo, hi = max(a.z.min(), b.z.min()), min(a.z.max(), b.z.max())
            if hi >= lo:
                g.append(a)
                placed = True
                break
        if not placed:
            groups.append([a])
    return [g for g in groups if len(g) >= 2]


def _is_fbp(a: SeriesAnalysis) -> bool:
    text = " ".join(str(a.facts.get(k, "")) for k in ("ReconstructionAlgorithm", "SeriesDescription",
                                                     "ConvolutionKernel", "GE IterativeReconAnnotation"))
    return bool(FBP_PATTERN.search(text))


def _compare(group: list[SeriesAnalysis]) -> dict[str, Any]:
    """Per tissue SD / SNR / CNR per series, CNR gain over the FBP (else noisiest) series, and a ranking."""
    fbp = [a for a in group if _is_fbp(a)]

    def noise(a: SeriesAnalysis) -> float:
        if a.gnl.value is not None:
            return a.gnl.value
        fat = a.tissues.get("fat")
        return fat.sd if fat else 0.0

    base = fbp[0] if len(fbp) == 1 else max(group, key=noise)
    basis = "identified as FBP" if len(fbp) == 1 else "noisiest series"
    rows = []
    for a in group:
        gains: dict[str, float | None] = {}
        for t, ts in a.tissues.items():
            bt = base.tissues.get(t)
            if ts.cnr is not None and bt is not None and bt.cnr:
                gains[t] = ts.cnr / bt.cnr - 1.0
        rows.append({
            "name": a.name, "series_uid": a.series.series_uid, "gnl": a.gnl.value,
            "tissues": {t: {"mean": ts.mean, "sd": ts.sd, "snr": ts.snr, "cnr": ts.cnr} for t, ts in a.tissues.items()},
            "cnr_gain": gains,
        })
    primary = next((t for t in ("muscle", "soft_tissue") if all(t in r["tissues"] and r["tissues"][t]["cnr"] is not None
                                                                 for r in rows)), None)

    def score(r: dict[str, Any]) -> float:
        if primary and r["tissues"][primary]["cnr"] is not None:
            return abs(r["tissues"][primary]["cnr"])
        return -(r["gnl"] or 0.0)

    ranking = [r["name"] for r in sorted(rows, key=score, reverse=True)]
    roi_positions = [{"tissue": r.tissue, "index": r.index, "centre_patient_mm": [float(v) for v in r.centre_patient]}
                     for r in group[0].rois]
    return {"baseline_name": base.name, "baseline_uid": base.series.series_uid, "baseline_basis": basis,
            "ranking": ranking, "ranked_by": f"{primary} CNR" if primary else "GNL", "rows": rows,
            "roi_positions": roi_positions, "series": [a.series.series_uid for a in group]}


def _region(st: ROIStats, a: SeriesAnalysis) -> Region:
    ref = a.series.frames[st.frame]
    r_px = st.roi.radius_mm / a.geom.col_spacing
    return Region(ref, "CIRCLE", [(st.col, st.row), (st.col + r_px, st.row)],
                  label=f"{st.roi.label} {st.roi.index}")


def _measurements(res: PipelineResult, a: SeriesAnalysis, study: StudyInput) -> None:
    uid = a.series.series_uid
    grp = a.name
    add = res.measurements.append
    if a.gnl.value is not None:
        add(Measurement(C_GNL, round(a.gnl.value, 2), UCUM_HU, group=grp, label="Global noise level (soft tissue, "
            f"{a.gnl.kernel_px} px kernel, texture correction x{a.gnl.correction:.3f})", series_uid=uid))
    for t, ts in a.tissues.items():
        # pooled over every ROI of the tissue: no one region (the ROIs have their own groups below), so a
        # viewer does not draw a second, overlapping label on one of them
        reg = None
        lbl = f"{ts.label} ({ts.n_rois} ROIs pooled)"
        g = f"{grp} {ts.label}"
        add(Measurement(C_MEAN, round(ts.mean, 2), UCUM_HU, group=g, label=lbl, region=reg, series_uid=uid))
        add(Measurement(C_SD, round(ts.sd, 2), UCUM_HU, group=g, label=lbl, region=reg, series_uid=uid))
        if t == "air":  # SNR and CNR of air outside the body mean nothing to a reader (issue 13)
            continue
        add(Measurement(C_SNR, round(ts.snr, 3), UCUM_RATIO, group=g, label=lbl, region=reg, series_uid=uid))
        if ts.cnr is not None:
            add(Measurement(C_CNR, round(ts.cnr, 3), UCUM_RATIO, group=g, label=f"{lbl} vs subcutaneous fat",
                            region=reg, series_uid=uid))
    for st in a.stats:
        reg = _region(st, a)
        g = f"{grp} ROI {st.roi.label} {st.roi.index}"
        add(Measurement(C_MEAN, round(st.mean, 2), UCUM_HU, group=g, label=reg.label, region=reg, series_uid=uid))
        add(Measurement(C_SD, round(st.sd, 2), UCUM_HU, group=g, label=reg.label, region=reg, series_uid=uid))
    if a.wed_mean is not None:
        add(Measurement(C_WED, round(a.wed_mean / 10.0, 2), UCUM_CM, group=grp,
                        label="Water-equivalent diameter (AAPM TG-220), mean over slices", series_uid=uid))
    c = a.ctdivol_mean
    if c is not None:
        add(Measurement(C_CTDIVOL, round(c, 2), UCUM_MGY, group=grp, label="CTDIvol as reported in (0018,9345), "
                        f"{a.phantom_cm} cm phantom", series_uid=uid))
        if a.drl:
            add(Measurement(C_DRL_PCT, round(100 * c / a.drl, 1), UCUM_PERCENT, group=grp,
                            label=f"of reference level {a.drl:g} mGy ({a.drl_key})", series_uid=uid))
    if a.ssde is not None:
        add(Measurement(C_SSDE, round(a.ssde, 2), UCUM_MGY, group=grp,
                        label=f"SSDE (TG-204/TG-220, {a.phantom_cm} cm, from water-equivalent diameter)",
                        series_uid=uid))
    if a.dlp is not None:
        add(Measurement(C_DLP, round(a.dlp, 1), UCUM_MGYCM, group=grp, label=f"DLP from {a.dlp_source}",
                        series_uid=uid))


def _narrative_lines(a: SeriesAnalysis) -> tuple[str, str]:
    en, zh = [f"{a.name}:"], [f"{a.name}："]
    g = a.gnl.value
    if g is not None:
        tgt = f" (target ≤ {a.noise_target:g})" if a.noise_target else ""
        en.append(f"Image noise {g:.1f} HU{tgt}.")
        zh.append(f"图像噪声 {g:.1f} HU{'（目标 ≤ ' + format(a.noise_target, 'g') + '）' if a.noise_target else ''}。")
    for t in ("muscle", "soft_tissue", "fat", "air"):
        ts = a.tissues.get(t)
        if ts is None:
            continue
        if t == "air":
            en.append(f"{ts.label}: mean {ts.mean:.0f} HU, SD {ts.sd:.1f} HU.")
            zh.append(f"体外空气：均值 {ts.mean:.0f} HU，标准差 {ts.sd:.1f} HU。")
            continue
        cnr = f", CNR {ts.cnr:.2f}" if ts.cnr is not None else ""
        en.append(f"{ts.label}: mean {ts.mean:.0f} HU, SD {ts.sd:.1f} HU, SNR {ts.snr:.2f}{cnr}.")
        zh_names = {"fat": "皮下脂肪", "muscle": "椎旁肌", "soft_tissue": "软组织", "air": "体外空气"}
        zh_name = zh_names[t]
        zh.append(f"{zh_name}：均值 {ts.mean:.0f} HU，标准差 {ts.sd:.1f} HU，SNR {ts.snr:.2f}"
                  + (f"，CNR {ts.cnr:.2f}" if ts.cnr is not None else "") + "。")
    if a.wed_mean is not None:
        en.append(f"Water-equivalent diameter {a.wed_mean / 10:.1f} cm.")
        zh.append(f"水等效直径 {a.wed_mean / 10:.1f} cm。")
    c = a.ctdivol_mean
    if c is not None:
        s = f"CTDIvol {c:.1f} mGy ({a.phantom_cm} cm phantom)"
        z = f"CTDIvol {c:.1f} mGy（{a.phantom_cm} cm 模体）"
        if a.drl:
            s += f", {100 * c / a.drl:.0f} % of the reference level {a.drl:g} mGy"
            z += f"，为诊断参考水平 {a.drl:g} mGy 的 {100 * c / a.drl:.0f}%"
        if a.ssde is not None:
            s += f"; SSDE {a.ssde:.1f} mGy"
            z += f"；SSDE {a.ssde:.1f} mGy"
        if a.dlp is not None:
            s += f"; DLP {a.dlp:.0f} mGy·cm"
            z += f"；DLP {a.dlp:.0f} mGy·cm"
        en.append(s + ".")
        zh.append(z + "。")
    else:
        en.append("CTDIvol not reported in the images.")
        zh.append("图像中未记录 CTDIvol。")
    f = a.facts
    acq = ", ".join(f"{k} {f[k]}" for k in ("KVP", "XRayTubeCurrent", "Exposure", "SliceThickness", "ConvolutionKernel",
                                            "ReconstructionAlgorithm", "GE IterativeReconAnnotation",
                                            "ManufacturerModelName") if k in f)
    if acq:
        en.append(f"As reported: {acq}.")
        zh.append(f"设备记录：{acq}。")
    vz = {"pass": "通过", "warn": "警告", "fail": "不合格"}[a.verdict]
    en.append(f"Verdict: {a.verdict.upper()}" + (" (" + "; ".join(c.en for c in a.checks) + ")." if a.checks else "."))
    zh.append(f"结论：{vz}" + ("（" + "；".join(c.zh for c in a.checks) + "）。" if a.checks else "。"))
    return " ".join(en), "".join(zh)


def _comparison_lines(comp: dict[str, Any]) -> tuple[str, str]:
    en = [f"Reconstruction comparison (same ROIs, baseline {comp['baseline_name']}, {comp['baseline_basis']}):"]
    zh = [f"重建对比（相同 ROI，基准 {comp['baseline_name']}）："]
    for row in comp["rows"]:
        t = "muscle" if "muscle" in row["tissues"] else "soft_tissue"
        m = row["tissues"].get(t)
        g = row["cnr_gain"].get(t)
        if m and m["cnr"] is not None:
            en.append(f"{row['name']}: {t.replace('_', ' ')} SD {m['sd']:.1f} HU, CNR {m['cnr']:.2f}"
                      + (f" ({100 * g:+.0f} %)" if g is not None else "") + ";")
            zt = "肌肉" if t == "muscle" else "软组织"
            zh.append(f"{row['name']}：{zt}标准差 {m['sd']:.1f} HU，CNR {m['cnr']:.2f}"
                      + (f"（{100 * g:+.0f}%）" if g is not None else "") + "；")
    en.append("ranking by " + comp["ranked_by"] + ": " + " > ".join(comp["ranking"]) + ".")
    zh.append("排序：" + " > ".join(comp["ranking"]) + "。")
    return " ".join(en), "".join(zh)


def _details(a: SeriesAnalysis) -> dict[str, Any]:
    return {
        "series_uid": a.series.series_uid, "name": a.name, "verdict": a.verdict,
        "checks": [{"level": c.level, "reason": c.en} for c in a.checks],
        "gnl": a.gnl.value, "gnl_per_slice": [None if not np.isfinite(v) else float(v) for v in a.gnl.per_slice],
        "slice_positions": [float(v) for v in a.z], "gnl_kernel_px": a.gnl.kernel_px,
        "gnl_texture_correction": a.gnl.correction, "noise_acf": a.gnl.acf, "noise_target": a.noise_target,
        "wed_mm": a.wed_mean, "ctdivol": a.ctdivol_mean, "phantom_cm": a.phantom_cm, "phantom_source": a.phantom_source,
        "ssde": a.ssde, "dlp": a.dlp, "region": a.region, "contrast": a.contrast, "drl_key": a.drl_key, "drl": a.drl,
        "truncated_frames": a.truncated_frames, "metal_frames": a.metal_frames, "missing_slices": a.missing,
        "gaps_mm": a.gaps, "facts": a.facts, "key_frame": a.key_frame,
        "tissues": {t: ts.__dict__ for t, ts in a.tissues.items()},
        "rois": [{"tissue": st.roi.tissue, "index": st.roi.index, "label": st.roi.label, "frame": st.frame,
                  "col": st.col, "row": st.row, "radius_mm": st.roi.radius_mm,
                  "centre_patient_mm": [float(v) for v in st.roi.centre_patient],
                  "mean": st.mean, "sd": st.sd, "n": st.n} for st in a.stats],
    }


def _overlays(analyses: list[SeriesAnalysis], comparisons: list[dict[str, Any]],
              window: tuple[float, float]) -> list[Overlay]:
    out: list[Overlay] = []
    main = analyses[0]
    keys: list[tuple[np.ndarray, Any, str]] = []
    for a in analyses:
        px = a.series.pixels
        assert px is not None
        img = px[a.key_frame]
        ref = a.series.frames[a.key_frame]
        circles = [(st.roi.tissue, f"{st.roi.tissue.replace('_', ' ')} SD {st.sd:.0f}", st.col, st.row,
                    st.roi.radius_mm / a.geom.col_spacing, st.roi.radius_mm / a.geom.row_spacing)
                   for st in a.stats if st.frame == a.key_frame]
        title = f"{a.name}  GNL {a.gnl.value:.1f} HU" if a.gnl.value is not None else a.name
        keys.append((render.key_slice(img, circles, title), ref, a.name))
        if a is main:
            k = a.gnl.kernel_px
            m, sd = local_mean_sd(img, k)
            valid = tissue_centres(m, k, window, img > -1500, a.gnl.step_limit)
            sd = sd * np.float32(a.gnl.correction)
            typical = a.gnl.value or (float(np.median(sd[valid])) if valid.any() else 1.0)
            vmax = 2.5 * typical
            out.append(Overlay(f"noise-map-{a.series.series_uid[-6:]}", "image",
                               render.noise_map(img, sd, valid, vmax, f"Local noise (SD, {k}x{k} px) {a.name}"),
                               source=ref, caption="Local SD over soft tissue (texture-corrected)"))
    # one picture for all reconstructions: the same ROIs side by side, as a reader would compare them
    if len(keys) == 1:
        out.insert(0, Overlay(f"key-slice-{main.series.series_uid[-6:]}", "image", keys[0][0], source=keys[0][1],
                              caption=f"{keys[0][2]}: ROIs (label: tissue and SD in HU)"))
    elif keys:
        h = max(k[0].shape[0] for k in keys)
        tiles = [np.pad(k[0], ((0, h - k[0].shape[0]), (0, 4), (0, 0))) for k in keys]
        out.insert(0, Overlay("key-slices", "image", np.ascontiguousarray(np.hstack(tiles)), source=keys[0][1],
                              caption="Same ROIs on every reconstruction: " + ", ".join(k[2] for k in keys)))
    curves = [(a.name, a.z, a.gnl.per_slice) for a in analyses if len(a.z) > 1]
    if curves:
        out.append(Overlay("noise-profile", "image",
                           render.profile_chart(curves, main.noise_target, "Global noise level along z"),
                           caption="GNL per slice"))
    for i, comp in enumerate(comparisons):
        header = ["Series", "GNL"]
        tissues = [t for t in ("muscle", "soft_tissue", "fat", "air") if all(t in r["tissues"] for r in comp["rows"])]
        for t in tissues:
            header += [f"{t} SD"] + ([f"{t} SNR"] if t != "air" else []) + (
                [f"{t} CNR", f"{t} gain"] if t not in ("fat", "air") else [])
        rows = []
        for r in comp["rows"]:
            cells = [r["name"], f"{r['gnl']:.1f}" if r["gnl"] is not None else "-"]
            for t in tissues:
                ts = r["tissues"][t]
                cells += [f"{ts['sd']:.1f}"] + ([f"{ts['snr']:.2f}"] if t != "air" else [])
                if t not in ("fat", "air"):
                    g = r["cnr_gain"].get(t)
                    cells += [f"{ts['cnr']:.2f}", f"{100 * g:+.0f} %" if g is not None else "-"]
            rows.append(cells)
        title = (f"Reconstruction comparison, same ROIs (baseline: {comp['baseline_name']}, {comp['baseline_basis']});"
                 f" ranking: {' > '.join(comp['ranking'])}")
        out.append(Overlay(f"comparison-{i}", "image", render.table(header, rows, title),
                           caption="Per-tissue SD, SNR, CNR and CNR gain per reconstruction"))
    return out


__all__ = ["CTQualityPipeline"]
