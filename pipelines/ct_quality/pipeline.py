"""CT image quality and dose per axial series: GNL, ROI noise / SNR / CNR, size and dose, verdicts,
and a side-by-side comparison when one acquisition was reconstructed several ways.

Pure: StudyInput in, PipelineResult out. Everything the scanner reports (kVp, mA, kernel, CTDIvol
...) is copied, never inferred; what we compute (noise, WED, SSDE) says how.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipelines.base import (
    UCUM_KGM2,
    UCUM_MGYCM,
    UCUM_PERCENT,
    Evaluation,
    Measurement,
    Narrative,
    Pipeline,
    PipelineResult,
    Refused,
    SeriesInput,
    StudyInput,
)
from pipelines.ct_quality import dose as dosemod
from pipelines.ct_quality import render
from pipelines.ct_quality.analysis import (
    Check,
    SeriesAnalysis,
    acquisition_facts,
    fg_value,
    key_frame_of,
    match_event,
    series_label,
    series_name,
    summarise_tissues,
    tag_text,
)
from pipelines.ct_quality.compare import compare_group, comparison_groups, comparison_lines
from pipelines.ct_quality.config import settings
from pipelines.ct_quality.geometry import SliceGeometry, is_axial
from pipelines.ct_quality.noise import global_noise_level
from pipelines.ct_quality.report import (
    C_BMI,
    C_CNR_GAIN,
    C_DLP_TOTAL,
    C_QUALITY,
    PROCEDURE,
    RANK,
    VERDICT_CODES,
    add_measurements,
    narrative_lines,
    result_overlays,
    series_details,
)
from pipelines.ct_quality.roi import (
    LABELS,
    ROI,
    body_info,
    downsample2,
    measure,
    place_rois,
    smoothing_mm,
)
from pipelines.options import ct_quality_options

log = logging.getLogger(__name__)


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
        rescale_type = tag_text(s.tags.get("RescaleType")) or tag_text(fg_value(s, "PixelValueTransformationSequence",
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
        groups = comparison_groups(analyses)
        grouped = {id(a) for g in groups for a in g}
        for g in groups:
            self._place_and_measure(g, cfg)
        for a in analyses:
            if id(a) not in grouped:
                self._place_and_measure([a], cfg)
        for a in analyses:
            summarise_tissues(a)
            self._verdict(a, cfg)
        comparisons = [compare_group(g) for g in groups]
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
                v = fg_value(s, "CTExposureSequence", "CTDIvol", i)
            if v not in (None, ""):
                ctdi[i] = float(v)
        h0 = s.headers[0]
        texts = [tag_text(h0.get(k)) or tag_text(study.tags.get(k)) for k in
                 ("BodyPartExamined", "ProtocolName", "SeriesDescription", "StudyDescription")]
        region, contrast = dosemod.body_region(texts, cfg)
        a = SeriesAnalysis(s, geom, series_name(s), gnl, z, wed, trunc, metal, missing, gaps,
                           acquisition_facts(s), ctdi, region=region, contrast=contrast)
        phantom = dosemod.phantom_from_code(h0)
        if phantom is None and s.is_multiframe:
            seq = fg_value(s, "CTExposureSequence", "CTDIPhantomTypeCodeSequence")
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
            tag_text(h0.get("ProtocolName")).upper())
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
            ev = match_event(rep, a)
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
            a.key_frame = key_frame_of(a)

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
            add_measurements(res, a, study)
            res.evaluations.append(Evaluation(C_QUALITY, VERDICT_CODES[a.verdict], group=a.name,
                                              note="; ".join(c.en for c in a.checks) or "all checks passed"))
            key = a.series.frames[a.key_frame]
            if key not in res.key_images:
                res.key_images.append(key)
            en, zh = narrative_lines(a)
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
            en, zh = comparison_lines(comp)
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
            names = {u: series_label(study, u) for u in skipped}
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
            res.overlays = result_overlays(analyses, comparisons, tuple(cfg["gnl_window_hu"]))
        except Exception as exc:  # pictures are a convenience; the numbers must still go out
            log.warning("ct_quality: rendering failed: %s", exc)
            res.warnings.append(f"overlay rendering failed: {exc}")
        for a in analyses:
            if a.gnl.correction_capped:
                res.warnings.append(f"{a.name}: GNL texture correction capped at {a.gnl.correction:.2f}")
        res.details = {
            "summary": render.summary(analyses, comparisons),
            "skipped": skipped,
            "series": [series_details(a) for a in analyses],
            "comparisons": comparisons,
            "dose_reports": [{"sop_instance_uid": r.sop_instance_uid, "total_dlp": r.total_dlp,
                              "events": [e.__dict__ for e in r.events]} for r in dose_reports],
            "settings": {k: cfg[k] for k in ("gnl_window_hu", "gnl_kernel_mm", "roi_diameter_mm", "roi_slices",
                                             "rois_per_slice", "metal_threshold_hu")},
        }
        return res


__all__ = ["CTQualityPipeline"]
