"""The ``template`` report writer: offline, deterministic, worded the way a radiologist dictates.

The text is built from the probability bands, organised by anatomy (lungs, pleura, heart and
mediastinum, bones) as chest reports are read, and it only states a negative for something the model
actually evaluated: a model without a fracture label never writes "no fracture". Probabilities are
quoted next to each positive so the reviewing radiologist sees how strong the signal was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.base import Narrative
from pipelines.cxr.labels import Concept
from pipelines.models import UNVERIFIED_BANNER, UNVERIFIED_BANNER_ZH

Band = Literal["present", "possible", "absent"]


@dataclass
class LabelCall:
    """One label after thresholds: the input to every report backend and to the consistency check."""

    label: str
    concept: Concept
    probability: float
    band: Band
    critical: bool = False
    #: the operating threshold ``probability`` was compared with; the text states it beside the number
    threshold: float | None = None


# English negatives listed for the lungs when they were evaluated and are absent, in dictation order.
_EN_LUNG_NEG = {"consolidation": "focal consolidation", "edema": "pulmonary oedema",
                "nodule": "pulmonary nodule", "mass": "mass"}
_ZH_LUNG_NEG = {"consolidation": "实变", "nodule": "结节", "mass": "肿块"}

_EN_PRESENT = {
    "cardiomegaly": "The cardiac silhouette is enlarged",
    "enlarged_cardiomediastinum": "The cardiomediastinal silhouette is widened",
    "pneumothorax": "There is a pneumothorax",
    "effusion": "There is a pleural effusion",
    "pleural_thickening": "There is pleural thickening",
    "fracture": "A fracture is suspected",
    "hernia": "There is a hiatal or diaphragmatic hernia",
    "nodule": "There is a pulmonary nodule",
    "mass": "There is a pulmonary mass",
    "lung_lesion": "There is a focal lung lesion",
    "lung_opacity": "There is an airspace opacity",
    "infiltration": "There is a pulmonary infiltrate",
}
_ZH_PRESENT = {
    "cardiomegaly": "心影增大",
    "enlarged_cardiomediastinum": "心影及纵隔影增宽",
    "pneumothorax": "可见气胸征象",
    "effusion": "可见胸腔积液征象",
    "pleural_thickening": "可见胸膜增厚",
    "fracture": "可疑骨折征象",
    "hernia": "可见食管裂孔疝或膈疝征象",
    "nodule": "可见肺结节影",
    "mass": "可见肺部肿块影",
    "lung_lesion": "可见肺内占位性病变",
    "lung_opacity": "可见肺内片状密度增高影",
    "infiltration": "可见肺部浸润影",
    "consolidation": "可见肺实变影",
    "fibrosis": "可见肺纤维化改变",
}


def _join_en(items: list[str], conj: str = "or") -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {conj} " + items[-1]


def _join_zh(items: list[str], conj: str = "及") -> str:
    if len(items) <= 1:
        return "".join(items)
    return "、".join(items[:-1]) + conj + items[-1]


def _num(v: float) -> str:
    return f"{v:.2f}" if v >= 0.095 else f"{v:.2g}"


def _p(call: LabelCall, lang: str = "en") -> str:
    """'0.81', or with the operating threshold '0.81, threshold 0.10' (zh: '0.81，阈值0.10')."""
    if call.threshold is None:
        return f"{call.probability:.2f}"
    sep = "，阈值" if lang == "zh" else ", threshold "
    return f"{_num(call.probability)}{sep}{_num(call.threshold)}"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _en_positive(c: LabelCall) -> str:
    base = _EN_PRESENT.get(c.concept.key, f"There is {c.concept.en}")
    if c.band == "possible":
        return f"Possible {c.concept.en} (model probability {_p(c)})."
    return f"{base} (model probability {_p(c)})."


def _zh_positive(c: LabelCall) -> str:
    if c.band == "possible":
        return f"可疑{c.concept.zh}（模型概率{_p(c, 'zh')}）。"
    return f"{_ZH_PRESENT.get(c.concept.key, '可见' + c.concept.zh + '征象')}（模型概率{_p(c, 'zh')}）。"


def _by_group(calls: list[LabelCall]) -> dict[str, tuple[list[LabelCall], set[str]]]:
    """group -> (positive/possible calls ordered present first, keys of absent concepts)."""
    out: dict[str, tuple[list[LabelCall], set[str]]] = {}
    for g in ("lungs", "pleura", "heart", "bones", "other"):
        pos = [c for c in calls if c.concept.group == g and c.band != "absent"]
        pos.sort(key=lambda c: (c.band != "present", -c.probability))
        # A concept is absent only when every label mapping to it is absent.
        positive_keys = {c.concept.key for c in pos}
        absent = {c.concept.key for c in calls if c.concept.group == g and c.band == "absent"} - positive_keys
        out[g] = (_dedupe(pos), absent)
    return out


def _dedupe(calls: list[LabelCall]) -> list[LabelCall]:
    seen: set[str] = set()
    out = []
    for c in calls:
        if c.concept.key not in seen:
            seen.add(c.concept.key)
            out.append(c)
    return out


def findings_en(calls: list[LabelCall]) -> str:
    g = _by_group(calls)
    parts: list[str] = []
    pos, absent = g["lungs"]
    negs = [v for k, v in _EN_LUNG_NEG.items() if k in absent]
    if not pos:
        parts.append("The lungs are clear" + (f", with no {_join_en(negs)}." if negs else "."))
    else:
        parts += [_en_positive(c) for c in pos]
        if negs:
            parts.append(f"No {_join_en(negs)}.")
    pos, absent = g["pleura"]
    parts += [_en_positive(c) for c in pos]
    pneg = [n for k, n in (("effusion", "pleural effusion"), ("pneumothorax", "pneumothorax")) if k in absent]
    if pneg:
        parts.append(f"No {_join_en(pneg)}.")
    pos, absent = g["heart"]
    parts += [_en_positive(c) for c in pos]
    if {"cardiomegaly", "enlarged_cardiomediastinum"} <= absent:
        parts.append("The cardiomediastinal silhouette is within normal limits.")
    elif "cardiomegaly" in absent:
        parts.append("The heart size is normal.")
    elif "enlarged_cardiomediastinum" in absent:
        parts.append("The mediastinal contour is normal.")
    pos, absent = g["bones"]
    parts += [_en_positive(c) for c in pos]
    if "fracture" in absent:
        parts.append("No displaced fracture is identified.")
    pos, _ = g["other"]
    parts += [_en_positive(c) for c in pos]
    return " ".join(parts)


def findings_zh(calls: list[LabelCall]) -> str:
    g = _by_group(calls)
    parts: list[str] = []
    pos, absent = g["lungs"]
    negs = [v for k, v in _ZH_LUNG_NEG.items() if k in absent]
    if not pos:
        s = "双肺纹理清晰，走行自然"
        s += f"，双肺野未见明显{_join_zh(negs)}影。" if negs else "。"
        parts.append(s)
        if "edema" in absent:
            parts.append("未见肺水肿征象。")
    else:
        parts += [_zh_positive(c) for c in pos]
        if negs:
            parts.append(f"余肺野未见明显{_join_zh(negs)}影。")
        if "edema" in absent:
            parts.append("未见肺水肿征象。")
    pos, absent = g["pleura"]
    parts += [_zh_positive(c) for c in pos]
    if "effusion" in absent and "pneumothorax" in absent:
        parts.append("双侧肋膈角锐利，未见胸腔积液及气胸征象。")
    elif "effusion" in absent:
        parts.append("双侧肋膈角锐利，未见胸腔积液征象。")
    elif "pneumothorax" in absent:
        parts.append("未见气胸征象。")
    pos, absent = g["heart"]
    parts += [_zh_positive(c) for c in pos]
    if {"cardiomegaly", "enlarged_cardiomediastinum"} <= absent:
        parts.append("心影大小、形态正常，纵隔未见增宽。")
    elif "cardiomegaly" in absent:
        parts.append("心影大小、形态正常。")
    elif "enlarged_cardiomediastinum" in absent:
        parts.append("纵隔未见增宽。")
    pos, absent = g["bones"]
    parts += [_zh_positive(c) for c in pos]
    if "fracture" in absent:
        parts.append("所见骨质未见明显骨折征象。")
    pos, _ = g["other"]
    parts += [_zh_positive(c) for c in pos]
    return "".join(parts)


def _ordered_positives(calls: list[LabelCall]) -> list[LabelCall]:
    pos = [c for c in calls if c.band != "absent"]
    pos.sort(key=lambda c: (not c.critical, c.band != "present", -c.probability))
    return _dedupe(pos)


def impression_en(calls: list[LabelCall]) -> str:
    pos = _ordered_positives(calls)
    if not pos:
        return "No acute cardiopulmonary abnormality."
    lines = []
    for i, c in enumerate(pos, 1):
        if c.band == "present":
            text = _cap(c.concept.en) + "."
            if c.critical:
                text += " Critical finding: urgent communication to the referring clinician is recommended."
        else:
            text = f"Possible {c.concept.en}; clinical correlation is recommended."
        lines.append(f"{i}. {text}")
    return "\n".join(lines)


def impression_zh(calls: list[LabelCall]) -> str:
    pos = _ordered_positives(calls)
    if not pos:
        return "心肺未见明显异常。"
    lines = []
    for i, c in enumerate(pos, 1):
        if c.band == "present":
            text = c.concept.zh + ("（危急征象，请立即通知临床医师）。" if c.critical else "。")
        else:
            text = f"可疑{c.concept.zh}，建议结合临床。"
        lines.append(f"{i}. {text}")
    return "\n".join(lines)


def critical_text(calls: list[LabelCall], lang: str) -> str:
    crit = [c for c in _ordered_positives(calls) if c.critical and c.band == "present"]
    if not crit:
        return ""
    if lang == "zh":
        names = "、".join(f"{c.concept.zh}（模型概率{_p(c, 'zh')}）" for c in crit)
        return f"AI提示危急征象：{names}。需放射科医师立即复核并通知临床。"
    names = ", ".join(f"{c.concept.en} (model probability {_p(c)})" for c in crit)
    return f"AI flagged a critical finding: {names}. Requires immediate radiologist review and communication."


def recommendations(calls: list[LabelCall], lang: str) -> str:
    if not any(c.band == "possible" for c in calls):
        return ""
    return "建议结合临床，必要时复查胸片。" if lang == "zh" else \
        "Correlate clinically; a follow-up radiograph may be considered."


def banner(lang: str) -> str:
    return f"{UNVERIFIED_BANNER}（{UNVERIFIED_BANNER_ZH}）。" if lang == "zh" else f"{UNVERIFIED_BANNER}."


def template_report(calls: list[LabelCall], languages: tuple[str, ...] = ("en", "zh"),
                    unverified: bool = False) -> dict[str, Narrative]:
    out = {}
    for lang in languages:
        if lang == "zh":
            n = Narrative(findings=findings_zh(calls), impression=impression_zh(calls))
        else:
            n = Narrative(findings=findings_en(calls), impression=impression_en(calls))
        n.recommendations = recommendations(calls, lang)
        n.critical = critical_text(calls, lang)
        if unverified:
            n = mark_unverified(n, lang)
        out[lang] = n
    return out


def mark_unverified(n: Narrative, lang: str) -> Narrative:
    """Put the banner at the top of every non-empty section so no excerpt loses it."""
    b = banner(lang)
    sep = "" if lang == "zh" else " "
    for attr in ("findings", "impression", "recommendations", "critical"):
        text = getattr(n, attr)
        if text and not text.startswith(UNVERIFIED_BANNER):
            setattr(n, attr, f"{b}{sep}{text}" if attr != "impression" else f"{b}\n{text}")
    return n
