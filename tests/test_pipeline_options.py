"""Pipeline options are checked against each pipeline's declared model: config check and start-up refuse
an unknown or mistyped option with its key path and the valid names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from node.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", "config", "check", str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_unknown_pipeline_option_is_refused_with_path_and_valid_names(tmp_path: Path) -> None:
    path = tmp_path / "ainode.yaml"
    path.write_text(yaml.safe_dump({"pipelines": {"cxr": {"language": "zh"}}}))
    r = check(path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "pipelines.cxr.language: unknown option 'language' for pipeline cxr" in r.stdout
    assert "routes[].language" in r.stdout and "valid options:" in r.stdout and "report_backend" in r.stdout


def test_route_options_are_checked_against_the_route_pipelines(tmp_path: Path) -> None:
    data = {"routes": [{"name": "cr", "match": {"Modality": "CR"}, "pipelines": ["cxr"],
                        "options": {"modle": "x", "cam_level": 7, "weights_dir": "/w"}},
                       {"name": "ct", "match": {"Modality": "CT"}, "pipelines": ["ct_quality"],
                        "options": {"gnl_kernel_mm": 5.0, "ct_quality": {"roi_slices": 3}}}]}
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    problems = {p.path: p.message for p in err.value.problems}
    assert set(problems) == {"routes[0].options.modle", "routes[0].options.cam_level"}, problems
    assert "valid options:" in problems["routes[0].options.modle"] and "model" in problems["routes[0].options.modle"]
    assert "less than or equal to 1" in problems["routes[0].options.cam_level"]


def test_declared_options_pass_and_undeclared_plugins_take_anything(tmp_path: Path) -> None:
    data = {"pipelines": {"cxr": {"report_backend": "template", "languages": ["en"]},
                          "classifier": {"model": "ich", "providers": ["CPUExecutionProvider"]}},
            "routes": [{"name": "cr", "match": {"Modality": "CR"}, "pipelines": ["cxr", "classifier"],
                        "options": {"model": "m", "allow_unverified_models": True}}]}
    cfg = load_config(_write(tmp_path, data))
    assert cfg.pipelines["cxr"]["languages"] == ["en"]
    # a site's own pipeline that declares no Options model keeps accepting its own keys
    load_config(_write(tmp_path, {"pipelines": {"probe": {"sleep": 1}}}), known_pipelines={"probe", "cxr"})
    for example in ("config/ainode.yaml", "config/compose.yaml"):
        assert check(ROOT / example).returncode == 0


def test_start_up_refuses_unknown_option(tmp_path: Path) -> None:
    path = _write(tmp_path, {"node": {"storage_dir": str(tmp_path / "var"), "web_port": None},
                             "pipelines": {"cxr": {"language": "zh"}}})
    r = subprocess.run([sys.executable, "-m", "node.cli", "run", "--config", str(path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and "pipelines.cxr.language: unknown option" in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "var" / "state.db").exists()


def _write(tmp: Path, data: dict) -> Path:
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
