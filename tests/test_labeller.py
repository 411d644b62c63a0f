"""The negation-aware report labeller and the text-vs-classifier consistency check."""

from __future__ import annotations

import pytest

from pipelines.cxr.labeller import check_consistency, label_report


@pytest.mark.parametrize("text,expected", [
    ("No pleural effusion or pneumothorax.", {"Pleural Effusion": "negative", "Pneumothorax": "negative"}),
    ("There is a small right pleural effusion.", {"Pleural Effusion": "positive"}),
    ("Small left pleural effusion cannot be excluded.", {"Pleural Effusion": "uncertain"}),
    ("Right basilar opacity may represent atelectasis or pneumonia.",
     {"Lung Opacity": "positive", "Atelectasis": "uncertain", "Pneumonia": "uncertain"}),
    ("Heart size is normal. The mediastinum is unremarkable.",
     {"Cardiomegaly": "negative", "Enlarged Cardiomediastinum": "negative"}),
    ("The heart is mildly enlarged.", {"Cardiomegaly": "positive"}),
    ("No pneumothorax, but there is a moderate left effusion.",
     {"Pneumothorax": "negative", "Pleural Effusion": "positive"}),
    ("Previously seen nodule is no longer visualized.", {"Lung Lesion": "negative"}),
    ("Small pericardial effusion.", {}),
    ("Pacemaker leads in good position.", {"Support Devices": "positive"}),
    ("Evaluation for pneumothorax is limited.", {"Pneumothorax": "uncertain"}),
])
def test_statuses(text, expected):
    st = label_report(text).status
    for obs, s in expected.items():
        assert st.get(obs) == s, (obs, st)
    if not expected:
        assert "Pleural Effusion" not in st


def test_no_finding_only_when_nothing_abnormal():
    assert label_report("The lungs are clear. No effusion. Pacemaker in place.").get("No Finding") == "positive"
    assert label_report("Possible atelectasis.").get("No Finding") is None


def test_consistency_flags_omission_negation_and_invention():
    text = "The lungs are clear. No pneumothorax. There is a large pleural effusion."
    issues = {i.observation: i for i in check_consistency(
        [("Pneumothorax", "present"), ("Consolidation", "possible"), ("Pleural Effusion", "absent"),
         ("Cardiomegaly", "absent")], text)}
    assert issues["Pneumothorax"].text == "negative" and "negates" in issues["Pneumothorax"].message
    assert issues["Consolidation"].text == "not mentioned" and "omits" in issues["Consolidation"].message
    assert issues["Pleural Effusion"].classifier == "absent" and "asserts" in issues["Pleural Effusion"].message
    assert "Cardiomegaly" not in issues  # an absent finding the text does not mention is fine


def test_shared_observation_takes_the_strongest_label():
    # nodule absent but mass present both map to Lung Lesion: the text must mention a lesion
    assert check_consistency([("Lung Lesion", "absent"), ("Lung Lesion", "present")], "There is a 3 cm mass.") == []
    assert len(check_consistency([("Lung Lesion", "absent"), ("Lung Lesion", "present")], "Lungs are clear.")) == 1
