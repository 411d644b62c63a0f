"""Side-by-side comparison of several reconstructions of one acquisition (FBP, iterative, deep-learning)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from pipelines.ct_quality.analysis import SeriesAnalysis, tag_text

FBP_PATTERN = re.compile(r"\bFBP\b|FILTER(ED)?[ _]?BACK|FILTER_BACK_PROJ", re.I)


def comparison_groups(analyses: list[SeriesAnalysis]) -> list[list[SeriesAnalysis]]:
    """Series of one acquisition: same FrameOfReferenceUID, parallel slices, overlapping z-range."""
    groups: list[list[SeriesAnalysis]] = []
    for a in analyses:
        for_uid = tag_text(a.series.tags.get("FrameOfReferenceUID"))
        if not for_uid:
            continue
        placed = False
        for g in groups:
            b = g[0]
            if tag_text(b.series.tags.get("FrameOfReferenceUID")) != for_uid:
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


def is_fbp(a: SeriesAnalysis) -> bool:
    text = " ".join(str(a.facts.get(k, "")) for k in ("ReconstructionAlgorithm", "SeriesDescription",
                                                     "ConvolutionKernel", "GE IterativeReconAnnotation"))
    return bool(FBP_PATTERN.search(text))


def compare_group(group: list[SeriesAnalysis]) -> dict[str, Any]:
    """Per tissue SD / SNR / CNR per series, CNR gain over the FBP (else noisiest) series, and a ranking."""
    fbp = [a for a in group if is_fbp(a)]

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




def comparison_lines(comp: dict[str, Any]) -> tuple[str, str]:
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
