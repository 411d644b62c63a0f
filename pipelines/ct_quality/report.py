"""The analysis as a PipelineResult: coded measurements, verdicts, narrative lines, details and overlays.

Codes live here because only the result needs them; what each number means is in its label."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.base import (
    PRIVATE_SCHEME,
    UCUM_CM,
    UCUM_HU,
    UCUM_MGY,
    UCUM_MGYCM,
    UCUM_PERCENT,
    UCUM_RATIO,
    Code,
    Measurement,
    Overlay,
    PipelineResult,
    Region,
    StudyInput,
)
from pipelines.ct_quality import render
from pipelines.ct_quality.analysis import SeriesAnalysis
from pipelines.ct_quality.noise import local_mean_sd, tissue_centres
from pipelines.ct_quality.roi import (
    ROIStats,
)

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
#: tissues below 0 HU: mean/SD is a negative "SNR" (the HU scale's zero is water), so none is reported for
#: them (their SD is); the calculation stays in ``details`` for anyone who wants it
NO_SNR = ("fat", "air")
PROCEDURE = Code("25045-6", "LN", "CT unspecified body region")


def roi_region(st: ROIStats, a: SeriesAnalysis) -> Region:
    ref = a.series.frames[st.frame]
    r_px = st.roi.radius_mm / a.geom.col_spacing
    return Region(ref, "CIRCLE", [(st.col, st.row), (st.col + r_px, st.row)],
                  label=f"{st.roi.label} {st.roi.index}")


def add_measurements(res: PipelineResult, a: SeriesAnalysis, study: StudyInput) -> None:
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
        if t in NO_SNR:  # mean/SD of a tissue below 0 HU is a negative "SNR" that means nothing to a reader
            continue
        add(Measurement(C_SNR, round(ts.snr, 3), UCUM_RATIO, group=g, label=lbl, region=reg, series_uid=uid))
        if ts.cnr is not None:
            add(Measurement(C_CNR, round(ts.cnr, 3), UCUM_RATIO, group=g, label=f"{lbl} vs subcutaneous fat",
                            region=reg, series_uid=uid))
    for st in a.stats:
        reg = roi_region(st, a)
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


def narrative_lines(a: SeriesAnalysis) -> tuple[str, str]:
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
        snr = f", SNR {ts.snr:.2f}" if t not in NO_SNR else ""
        en.append(f"{ts.label}: mean {ts.mean:.0f} HU, SD {ts.sd:.1f} HU{snr}{cnr}.")
        zh_names = {"fat": "皮下脂肪", "muscle": "椎旁肌", "soft_tissue": "软组织", "air": "体外空气"}
        zh_name = zh_names[t]
        zh.append(f"{zh_name}：均值 {ts.mean:.0f} HU，标准差 {ts.sd:.1f} HU"
                  + (f"，SNR {ts.snr:.2f}" if t not in NO_SNR else "")
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



def series_details(a: SeriesAnalysis) -> dict[str, Any]:
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


def result_overlays(analyses: list[SeriesAnalysis], comparisons: list[dict[str, Any]],
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
            header += [f"{t} SD"] + ([f"{t} SNR"] if t not in NO_SNR else []) + (
                [f"{t} CNR", f"{t} gain"] if t not in ("fat", "air") else [])
        rows = []
        for r in comp["rows"]:
            cells = [r["name"], f"{r['gnl']:.1f}" if r["gnl"] is not None else "-"]
            for t in tissues:
                ts = r["tissues"][t]
                cells += [f"{ts['sd']:.1f}"] + ([f"{ts['snr']:.2f}"] if t not in NO_SNR else [])
                if t not in ("fat", "air"):
                    g = r["cnr_gain"].get(t)
                    cells += [f"{ts['cnr']:.2f}", f"{100 * g:+.0f} %" if g is not None else "-"]
            rows.append(cells)
        title = (f"Reconstruction comparison, same ROIs (baseline: {comp['baseline_name']}, {comp['baseline_basis']});"
                 f" ranking: {' > '.join(comp['ranking'])}")
        out.append(Overlay(f"comparison-{i}", "image", render.table(header, rows, title),
                           caption="Per-tissue SD, SNR, CNR and CNR gain per reconstruction"))
    return out

