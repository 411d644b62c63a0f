"""Template reports for given probability vectors, phrase by phrase, in English and Chinese."""

from __future__ import annotations

import pytest

from node.weights import CHEXNET_LABELS, XRV_ALL_LABELS
from pipelines.cxr.labeller import check_consistency
from pipelines.cxr.labels import concept_for
from pipelines.cxr.report import LabelCall, template_report
from pipelines.models import UNVERIFIED_BANNER


def calls(probs: dict[str, float], labels=XRV_ALL_LABELS, possible=0.3, present=0.5, critical=("Pneumothorax",)):
    out = []
    for label in labels:
        p = probs.get(label, 0.02)
        b = "present" if p >= present else "possible" if p >= possible else "absent"
        out.append(LabelCall(label, concept_for(label), p, b, critical=label in critical and b == "present"))
    return out


def test_normal_study_english():
    n = template_report(calls({}), ("en",))["en"]
    assert n.findings == ("The lungs are clear, with no focal consolidation, pulmonary oedema, pulmonary nodule or "
                          "mass. No pleural effusion or pneumothorax. The cardiomediastinal silhouette is within "
                          "normal limits. No displaced fracture is identified.")
    assert n.impression == "No acute cardiopulmonary abnormality."
    assert n.recommendations == "" and n.critical == ""


def test_normal_study_chinese():
    n = template_report(calls({}), ("zh",))["zh"]
    for phrase in ("双肺纹理清晰，走行自然，双肺野未见明显实变、结节及肿块影。", "未见肺水肿征象。",
                   "双侧肋膈角锐利，未见胸腔积液及气胸征象。", "心影大小、形态正常，纵隔未见增宽。",
                   "所见骨质未见明显骨折征象。"):
        assert phrase in n.findings
    assert n.impression == "心肺未见明显异常。"


def test_model_without_fracture_label_never_says_no_fracture():
    n = template_report(calls({}, labels=CHEXNET_LABELS), ("en", "zh"))
    assert "fracture" not in n["en"].findings.lower() and "骨折" not in n["zh"].findings
    assert "The heart size is normal." in n["en"].findings  # no cardiomediastinum label in ChestX-ray14


def test_single_finding():
    r = template_report(calls({"Effusion": 0.81}), ("en", "zh"))
    en, zh = r["en"], r["zh"]
    assert "There is a pleural effusion (model probability 0.81)." in en.findings
    assert "No pneumothorax." in en.findings and "No pleural effusion" not in en.findings
    assert en.findings.startswith("The lungs are clear")
    assert en.impression == "1. Pleural effusion."
    assert "可见胸腔积液征象（模型概率0.81）。" in zh.findings and "未见气胸征象。" in zh.findings
    assert "肋膈角锐利" not in zh.findings  # blunted angles are what an effusion looks like
    assert zh.impression == "1. 胸腔积液。"


def test_several_findings_with_critical_and_possible():
    r = template_report(calls({"Pneumothorax": 0.93, "Cardiomegaly": 0.7, "Consolidation": 0.35}), ("en", "zh"))
    en, zh = r["en"], r["zh"]
    assert "Possible consolidation (model probability 0.35)." in en.findings
    assert "The lungs are clear" not in en.findings
    assert "No pulmonary oedema, pulmonary nodule or mass." in en.findings
    assert "There is a pneumothorax (model probability 0.93)." in en.findings
    assert "No pleural effusion." in en.findings
    assert "The cardiac silhouette is enlarged (model probability 0.70)." in en.findings
    assert "The mediastinal contour is normal." in en.findings
    assert en.impression.splitlines() == [
        "1. Pneumothorax. Critical finding: urgent communication to the referring clinician is recommended.",
        "2. Cardiomegaly.",
        "3. Possible consolidation; clinical correlation is recommended.",
    ]
    assert en.critical.startswith("AI flagged a critical finding: pneumothorax (model probability 0.93)")
    assert en.recommendations == "Correlate clinically; a follow-up radiograph may be considered."
    for phrase in ("可疑肺实变（模型概率0.35）。", "余肺野未见明显结节及肿块影。", "可见气胸征象（模型概率0.93）。",
                   "双侧肋膈角锐利，未见胸腔积液征象。", "心影增大（模型概率0.70）。", "纵隔未见增宽。"):
        assert phrase in zh.findings
    assert "双肺纹理清晰" not in zh.findings
    assert zh.impression.splitlines() == ["1. 气胸（危急征象，请立即通知临床医师）。", "2. 心影增大。",
                                          "3. 可疑肺实变，建议结合临床。"]
    assert zh.critical.startswith("AI提示危急征象：气胸")
    assert zh.recommendations == "建议结合临床，必要时复查胸片。"


def test_labels_sharing_a_concept_are_reported_once():
    en = template_report(calls({"Nodule": 0.9, "Lung Lesion": 0.6, "Mass": 0.4}), ("en",))["en"]
    assert en.findings.count("pulmonary nodule") == 1
    assert "There is a focal lung lesion (model probability 0.60)." in en.findings
    assert "Possible pulmonary mass (model probability 0.40)." in en.findings


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_unverified_banner_on_top_of_every_section(lang):
    n = template_report(calls({"Pneumothorax": 0.93, "Consolidation": 0.35}), (lang,), unverified=True)[lang]
    for text in (n.findings, n.impression, n.recommendations, n.critical):
        assert text.startswith(UNVERIFIED_BANNER)


@pytest.mark.parametrize("probs", [{}, {"Effusion": 0.81}, {"Pneumothorax": 0.93, "Cardiomegaly": 0.7,
                                                           "Consolidation": 0.35, "Nodule": 0.6, "Fracture": 0.9,
                                                           "Hernia": 0.8, "Edema": 0.55, "Atelectasis": 0.4}])
def test_template_text_is_consistent_with_its_own_calls(probs):
    cs = calls(probs)
    en = template_report(cs, ("en",))["en"]
    issues = check_consistency([(c.concept.observation, c.band) for c in cs], en.findings + "\n" + en.impression)
    assert issues == []


def test_threshold_stated_next_to_the_probability():
    """The number is the raw sigmoid; the operating threshold it was compared with stands beside it."""
    cs = calls({"Effusion": 0.62, "Pneumothorax": 0.05}, present=0.5)
    for c in cs:
        c.threshold = {"Effusion": 0.51, "Pneumothorax": 0.0098}.get(c.label)
    cs = [c if c.label != "Pneumothorax" else LabelCall(c.label, c.concept, c.probability, "present", True, 0.0098)
          for c in cs]
    n = template_report(cs, ("en", "zh"))
    assert "(model probability 0.62, threshold 0.51)" in n["en"].findings
    assert "(model probability 0.05, threshold 0.0098)" in n["en"].findings  # not "0.01": small thresholds keep digits
    assert "模型概率0.62，阈值0.51" in n["zh"].findings
    assert "threshold 0.0098" in n["en"].critical
