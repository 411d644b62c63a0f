"""The route's critical policy: resolved against the model's names once, checked by ``ainode config check``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.classifier import ClassifierPipeline
from pipelines.cxr import CXRPipeline
from pipelines.policy import LabelNames, PolicyError, Vocabulary, resolve

ROOT = Path(__file__).resolve().parent.parent


def vocab() -> Vocabulary:
    return Vocabulary("m", [
        LabelNames("Pneumothorax", "Pneumothorax", "36118008", ["气胸"]),
        LabelNames("Mass", "Pulmonary mass", "4147007"),
        LabelNames("Lung Opacity", "Airspace opacity", "CXR-LUNGOPAC"),
        LabelNames("Pneumonia", "Pneumonia", "233604007"),
    ], critical={"Pneumothorax": 0.7, "Mass": 0.5, "Pneumonia": 0.4},
        thresholds={"Pneumothorax": (0.2, 0.3), "Lung Opacity": (0.4, 0.6)})


def test_route_keys_by_label_display_name_or_code_override_the_manifest() -> None:
    policy, problems = resolve(vocab(), {"36118008": 0.5, "pulmonary_mass": None, "airspace opacity": 0.8},
                               {"Lung Opacity": {"present": 0.55}, "233604007": 0.1})
    assert problems == []
    assert policy.critical == {"Pneumothorax": 0.5, "Mass": None, "Pneumonia": 0.4, "Lung Opacity": 0.8}
    assert policy.thresholds["Lung Opacity"] == (0.4, 0.55)  # possible kept from the manifest
    assert policy.thresholds["Pneumonia"] == (0.1, 0.1)
    assert policy.source["Pneumothorax"] == "route 36118008" and policy.source["Pneumonia"] == "manifest"
    # the decision, made once: present and at/above the threshold; null never; absent never
    assert policy.is_critical("Pneumothorax", True, 0.62)  # 0.62 >= 0.5 on this route (manifest said 0.7)
    assert not policy.is_critical("Mass", True, 0.99)
    assert not policy.is_critical("Pneumonia", False, 0.9)
    assert policy.band(0.56, "Lung Opacity") == "present" and policy.band(0.45, "Lung Opacity") == "possible"
    assert policy.band(0.2, "Mass") == "absent"  # no bands anywhere: the neutral 0.5 / 0.5


def test_no_route_keys_is_the_manifest_and_roundtrips() -> None:
    from pipelines.policy import CriticalPolicy

    policy, _ = resolve(vocab())
    assert policy.critical == {"Pneumothorax": 0.7, "Mass": 0.5, "Pneumonia": 0.4}
    assert CriticalPolicy.from_dict(policy.to_dict()) == policy


def test_unknown_key_names_its_path_and_the_valid_names() -> None:
    with pytest.raises(PolicyError) as exc:
        resolve(vocab(), {"NoSuchLabel": 0.5}, path="routes[0]")
    (where, message), = exc.value.problems
    assert where == "routes[0].critical.NoSuchLabel"
    assert "Lung Opacity" in message and "Airspace opacity" in message and "36118008" in message
    _, problems = resolve(vocab(), {}, {"Pneumothorax": {"possible": 0.9, "present": 0.2}}, strict=False)
    assert problems and "possible" in problems[0][1]


def test_shipped_manifests_answer_to_all_three_names() -> None:
    cxr = CXRPipeline({}).vocabulary({})
    assert cxr.match("Lung Opacity") == cxr.match("Airspace opacity") == ["Lung Opacity"]
    assert cxr.match("36118008") == ["Pneumothorax"] and cxr.match("NoSuchLabel") == []
    ich = ClassifierPipeline({}).vocabulary({})
    assert ich.match("any") == ich.match("Intracranial haemorrhage") == ich.match("1386000") == ["any"]


def _check(tmp_path: Path, critical: dict, thresholds: dict | None = None) -> subprocess.CompletedProcess:
    cfg = yaml.safe_load((ROOT / "config" / "ainode.yaml").read_text())
    cfg["routes"][0]["critical"] = critical
    cfg["routes"][0]["thresholds"] = thresholds or {}
    cfg["node"]["storage_dir"] = str(tmp_path / "var")
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "node.cli", "config", "check", str(path)], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def test_config_check_rejects_unknown_route_keys(tmp_path: Path) -> None:
    bad = _check(tmp_path, {"Pneumothorax": 0.5, "NoSuchLabel": 0.5})
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "routes[0].critical.NoSuchLabel" in bad.stdout
    assert "Lung Opacity" in bad.stdout and "Airspace opacity" in bad.stdout  # the valid names are listed
    bad_t = _check(tmp_path, {}, {"Pneumothorx": {"present": 0.4}})
    assert bad_t.returncode == 2 and "routes[0].thresholds.Pneumothorx" in bad_t.stdout


def test_config_check_accepts_label_display_name_and_code(tmp_path: Path) -> None:
    ok = _check(tmp_path, {"Lung Opacity": 0.4, "Airspace opacity": 0.4, 36118008: 0.5, "Consolidation": None},
                {"Fracture": {"possible": 0.2, "present": 0.3}})
    assert ok.returncode == 0, ok.stdout + ok.stderr
