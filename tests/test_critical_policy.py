"""The route's critical policy overrides the manifest per label; unnamed labels keep the manifest's call."""

from __future__ import annotations

from node.tasks import apply_critical_policy
from pipelines.base import Code, Finding, PipelineResult


def result() -> PipelineResult:
    return PipelineResult("cxr", "1", findings=[
        Finding(Code("36118008", "SCT", "Pneumothorax"), "Pneumothorax", True, 0.62, critical=False),
        Finding(Code("4147007", "SCT", "Mass"), "Mass", True, 0.91, critical=True),
        Finding(Code("60046008", "SCT", "Pleural effusion"), "Effusion", False, 0.97, critical=False),
        Finding(Code("233604007", "SCT", "Pneumonia"), "Pneumonia", True, 0.55, critical=True),
    ])


def test_route_thresholds_replace_the_manifest_for_named_labels_only() -> None:
    r = result()
    apply_critical_policy(r, {"Pneumothorax": 0.5, "Mass": None, "Effusion": 0.1})
    calls = {f.label: f.critical for f in r.findings}
    assert calls == {"Pneumothorax": True,  # 0.62 >= 0.5 on this route
                     "Mass": False,  # null: this route never pages for a mass
                     "Effusion": False,  # absent findings are never critical, whatever the threshold
                     "Pneumonia": True}  # not named: the manifest's call stands
    assert r.critical


def test_threshold_above_the_probability_is_not_critical_and_empty_policy_changes_nothing() -> None:
    r = result()
    apply_critical_policy(r, {"Pneumothorax": 0.7})
    assert not r.findings[0].critical
    r2 = result()
    apply_critical_policy(r2, {})
    assert [f.critical for f in r2.findings] == [f.critical for f in result().findings]
