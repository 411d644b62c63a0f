"""TID 2000 Basic Diagnostic Imaging Report as Enhanced SR: the human-readable draft.

Radiologists read this one in the PACS report viewer, so it says plainly that it is an unverified AI
draft, in the language the route asked for, and gains a Communication of Critical Results section
only when something critical was found.
"""

from __future__ import annotations

import re

from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    EnhancedSR,
    LanguageOfContentItemAndDescendants,
    TextContentItem,
)
from highdicom.sr.enum import RelationshipTypeValues as R
from highdicom.sr.value_types import ContentSequence
from pydicom.dataset import Dataset

from pipelines.base import Finding, Narrative, PipelineResult
from pipelines.models import UNVERIFIED_BANNER, UNVERIFIED_BANNER_ZH

from . import codes as C
from .common import (
    CHARSET,
    DRAFT_TEXT,
    UNVERIFIED_TEXT,
    Context,
    model_name,
    model_version,
    new_uid,
    series_description,
)
from .sources import Source

#: Fallback wording when a pipeline gave no narrative in the requested language.
WORDS = {
    "en": {
        "draft": DRAFT_TEXT,
        "unverified": UNVERIFIED_TEXT,
        "preliminary": "PRELIMINARY",
        "none": "No findings reported by the algorithm.",
        "more": "... and {n} more results in the structured report",
        "others_absent": "{n} other findings not detected",
        "present": "present", "absent": "not detected", "possible": "possible", "probability": "probability",
        "threshold": "threshold",
        "critical": "Critical finding",
        "algorithm": "Algorithm",
    },
    "zh": {
        "draft": "AI 生成的草稿 — 需经医师审核 (" + DRAFT_TEXT + ")",
        "unverified": "未验证模型 — 不得用于临床 (" + UNVERIFIED_TEXT + ")",
        "preliminary": "初步结果 (PRELIMINARY)",
        "none": "算法未报告任何发现。",
        "more": "……另有 {n} 项结果见结构化报告",
        "others_absent": "其余 {n} 项未检出",
        "present": "存在", "absent": "未检出", "possible": "可能存在", "probability": "概率", "threshold": "阈值",
        "critical": "危急发现",
        "algorithm": "算法",
    },
}


def words(language: str) -> dict[str, str]:
    return WORDS.get(language, WORDS["en"])


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def fmt_probability(v: float) -> str:
    """Two decimals, or two significant digits below 0.095 so that a threshold of 0.0022 does not read 0.00."""
    return f"{v:.2f}" if v >= 0.095 else f"{v:.2g}"


def probability_text(f: Finding, language: str = "en") -> str:
    """'0.62' or '0.62, threshold 0.51': the raw probability and the operating threshold it was compared with."""
    p = fmt_probability(float(f.probability or 0.0))
    if f.threshold is None:
        return p
    return f"{p}, {words(language).get('threshold', 'threshold')} {fmt_probability(float(f.threshold))}"


def finding_lines(result: PipelineResult, language: str) -> list[str]:
    """One line per finding / measurement / evaluation; also used for the SC panel."""
    w = words(language)
    lines = []
    for f in result.findings:
        state = w["present"] if f.present else w["absent"]
        if f.certainty == "possible":
            state = w["possible"]
        p = f" ({w['probability']} {probability_text(f, language)})" if f.probability is not None else ""
        crit = f" — {w['critical']}" if f.critical and f.present else ""
        note = f" — {f.note}" if f.note else ""
        lines.append(f"{f.name(language)}: {state}{p}{crit}{note}")
    for m in result.measurements:
        unit = m.unit.value if m.unit.value not in ("1", "[hnsf'U]") else ("HU" if m.unit.value == "[hnsf'U]" else "")
        # the quantity's name first: mean, SD and SNR of one ROI share a label and must not look alike
        detail = ", ".join(x for x in (m.group, m.label) if x and x != m.code.meaning)
        where = f" ({detail})" if detail else ""
        lines.append(f"{m.code.meaning}{where}: {_fmt(m.value)} {unit}".rstrip())
    for e in result.evaluations:
        lines.append(f"{e.name.meaning}: {e.value.meaning}" + (f" — {e.note}" if e.note else ""))
    return lines


def narrative_for(result: PipelineResult, language: str) -> Narrative:
    """The pipeline's own text when it wrote one for this language, else a list built from the result."""
    n = result.narrative.get(language)
    if n is not None:
        return n
    w = words(language)
    lines = finding_lines(result, language) or [w["none"]]
    return Narrative(findings="\n".join(lines), impression=lines[0], critical=critical_text(result, language))


def critical_text(result: PipelineResult, language: str) -> str:
    crit = [f.name(language) for f in result.findings if f.critical and f.present]
    crit += [f"{e.name.meaning}: {e.value.meaning}" for e in result.evaluations if e.critical]
    return (words(language)["critical"] + ": " + "; ".join(crit)) if crit else ""


#: Where a Finding's text is broken into lines; see ``wrap``.
FINDING_COLUMNS = 88
_WIDE = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
_TOKENS = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]|[^\s\u2e80-\u9fff\uac00-\ud7af"
                     r"\uf900-\ufaff\uff00-\uffef]+|\s+")


def wrap(text: str, columns: int = FINDING_COLUMNS) -> str:
    """A paragraph broken into lines of at most ``columns`` (CJK characters count two).

    OHIF shows (121071, DCM) "Finding" TEXT preformatted, in a <pre> that never wraps (findings are often
    tables), so an unbroken paragraph ran off the right of the report. Breaks replace spaces between words;
    Chinese, which has none, breaks between characters. Deleting the newlines gives the paragraph back."""
    lines: list[str] = []
    line, width = "", 0
    for tok in _TOKENS.findall(text):
        if tok.isspace():
            if line:
                line, width = line + tok, width + len(tok)
            continue
        w = sum(2 if _WIDE.match(ch) else 1 for ch in tok)
        if line and width + w > columns:
            lines.append(line)  # a break at a space keeps it at the line's end: removing "\n" restores the text
            line, width = "", 0
        line, width = line + tok, width + w
    if line.strip():
        lines.append(line.rstrip())
    return "\n".join(lines)


def _section(name, concept_name, texts: list[str]) -> ContainerContentItem:
    """One TEXT item per paragraph, SEPARATE: viewers show each on its own line instead of one run-on."""
    box = ContainerContentItem(name, relationship_type=R.CONTAINS, is_content_continuous=False)
    if concept_name == C.FINDING:
        texts = [wrap(t) for t in texts if t]
    box.ContentSequence = ContentSequence([TextContentItem(concept_name, t, relationship_type=R.CONTAINS)
                                           for t in texts if t])
    return box


#: Banners pipelines may already have put at the top of their own text (pipelines.cxr.report.mark_unverified).
_BANNERS = (f"{UNVERIFIED_BANNER}（{UNVERIFIED_BANNER_ZH}）。", f"{UNVERIFIED_BANNER}.", UNVERIFIED_BANNER,
            UNVERIFIED_BANNER_ZH)


def paragraphs(text: str) -> list[str]:
    """The pipeline's text as paragraphs, without any unverified banner it carries (the section states it)."""
    out = []
    for para in (text or "").split("\n"):
        para = para.strip()
        for b in _BANNERS:
            if para.startswith(b):
                para = para[len(b):].lstrip(" ：:.")
        if para:
            out.append(para)
    return out


def marking(result: PipelineResult, language: str) -> str:
    """The status line each section opens with, once: unverified model, else preliminary AI draft."""
    w = words(language)
    end = "。" if language == "zh" else "."
    head = w["unverified"] if result.unverified else w["preliminary"]
    return f"{head}{end} {w['draft']}{end}"


def build_narrative(result: PipelineResult, sources: list[Source], ctx: Context) -> Dataset:
    lang = ctx.language
    w = words(lang)
    n = narrative_for(result, lang)
    root = ContainerContentItem(C.DIAGNOSTIC_IMAGING_REPORT, template_id="2000", is_content_continuous=False)
    items: list = list(LanguageOfContentItemAndDescendants(C.language(lang)))
    # the device that wrote the report is named in the header (Author Observer Sequence), not as the first
    # lines of the text: a report viewer otherwise opens with "Device Observer UID: 1.2.826..."
    modality = str(sources[0].header.get("Modality", ""))
    procedure = C.concept(result.procedure) if result.procedure else C.PROCEDURE_BY_MODALITY.get(modality)
    if procedure is not None:
        items.append(CodeContentItem(C.PROCEDURE_REPORTED, procedure, relationship_type=R.HAS_CONCEPT_MOD))
    mark = marking(result, lang)
    algo = f"{w['algorithm']}: {model_name(result)} {model_version(result)}"
    findings = [mark, *(paragraphs(n.findings) or [w["none"]]), algo]
    items.append(_section(C.FINDINGS_SECTION, C.FINDING, findings))
    items.append(_section(C.IMPRESSIONS_SECTION, C.IMPRESSION, [mark, *(paragraphs(n.impression) or [w["none"]])]))
    if paragraphs(n.recommendations):
        items.append(_section(C.RECOMMENDATIONS_SECTION, C.RECOMMENDATION, [mark, *paragraphs(n.recommendations)]))
    if result.critical:
        crit = paragraphs(n.critical) or [critical_text(result, lang)]
        items.append(_section(C.CRITICAL_SECTION, C.FINDING, [mark, *crit]))
    root.ContentSequence = ContentSequence(items)
    evidence = [s.header for s in sources if s.is_image] or [sources[0].header]
    sr = EnhancedSR(
        evidence=evidence, content=root, series_instance_uid=new_uid(), series_number=ctx.series_number(1),
        sop_instance_uid=new_uid(), instance_number=1, manufacturer=ctx.manufacturer,
        institution_name=ctx.institution or None,
        previous_versions=ctx.previous_versions(narrative=True),
        specific_character_set=CHARSET, series_description=series_description(result, "report"),
        record_evidence=True)
    sr.AuthorObserverSequence = [author_observer(result, ctx)]
    C.declare_private_scheme(sr)
    return sr


def author_observer(result: PipelineResult, ctx: Context) -> Dataset:
    """PS3.3 C.17.2 Author Observer: the node as a device (type DEV), what TID 1004 said in the content."""
    item = Dataset()
    item.ObserverType = "DEV"
    item.DeviceUID = ctx.device_uid
    item.StationName = f"ainode {result.pipeline}"[:16]
    item.Manufacturer = ctx.manufacturer[:64]
    item.ManufacturerModelName = model_name(result)[:64]
    item.InstitutionName = ctx.institution[:64] if ctx.institution else ""
    item.InstitutionCodeSequence = []  # type 2: no code for the institution
    return item

