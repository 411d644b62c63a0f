"""`ainode config check`: every problem is printed with its key path and a fix, exit 2; valid is exit 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from node.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def check(tmp_path: Path, data: dict | str) -> subprocess.CompletedProcess:
    p = tmp_path / "c.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return subprocess.run([sys.executable, "-m", "node.cli", "config", "check", str(p)],
                          capture_output=True, text=True, cwd=ROOT)


def test_shipped_example_config_is_valid(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "node.cli", "config", "check", "config/ainode.yaml"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout


def test_defaults_match_the_documented_keys() -> None:
    cfg = load_config(None, environ={})
    n = cfg.node
    assert (n.ae_title, n.host, n.port, str(n.storage_dir), n.min_free_disk_mb, n.accept_any_peer,
            n.max_associations) == ("AINODE", "0.0.0.0", 11112, "var", 1024, False, 32)
    assert cfg.broker.url is None and cfg.workers.concurrency == 2


@pytest.mark.parametrize("data, path, words", [
    ({"node": {"ae_tittle": "X"}}, "node.ae_tittle", "unknown key"),
    ({"nodes": {}}, "nodes", "unknown key"),
    ({"node": {"ae_title": "A" * 17}}, "node.ae_title", "at most 16"),
    ({"node": {"ae_title": "BAD\\AE"}}, "node.ae_title", "backslash"),
    ({"node": {"port": 70000}}, "node.port", "1-65535"),
    ({"node": {"port": 0}}, "node.port", "out of range"),
    ({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 99999}]},
     "destinations[0]", "1-65535"),
    ({"peers": [{"ae_title": "THIS_AE_IS_WAY_TOO_LONG"}]}, "peers[0].ae_title", "at most 16"),
    ({"routes": [{"name": "r", "pipelines": ["nope"]}]}, "routes[0].pipelines[0]", "unknown pipeline 'nope'"),
    ({"routes": [{"name": "r", "pipelines": ["echo"], "destinations": ["ghost"]}]},
     "routes[0].destinations[0]", "unknown destination 'ghost'"),
    ({"destinations": [{"name": "a", "ae_title": "A", "host": "h", "port": 104},
                       {"name": "a", "ae_title": "B", "host": "h", "port": 104}]},
     "destinations[1].name", "duplicate name 'a'"),
    ({"routes": [{"name": "r", "pipelines": ["echo"]}, {"name": "r", "pipelines": ["echo"]}]},
     "routes[1].name", "duplicate name 'r'"),
    ({"routes": [{"name": "r", "pipelines": ["echo"], "match": {"Modalty": "CT"}}]}, "routes[0].match",
     "not a DICOM keyword"),
    ({"routes": [{"name": "r", "pipelines": ["echo"], "match": {"Modality": {"regex": "("}}}]},
     "routes[0].match", "invalid regular expression"),
    ({"broker": {"url": "amqp://x"}}, "broker.url", "redis://"),
])
def test_each_error_class_is_reported_with_its_key_path(tmp_path: Path, data: dict, path: str, words: str) -> None:
    r = check(tmp_path, data)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if path in ln]
    assert lines, f"no line names {path!r}:\n{r.stdout}"
    assert any(words in ln for ln in lines), f"{words!r} not in {lines}"


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    r = check(tmp_path, {"routes": [{"name": "r", "pipelines": ["nope"], "destinations": ["ghost"]}],
                         "destinations": [{"name": "d", "ae_title": "D", "host": "h", "port": 1},
                                          {"name": "d", "ae_title": "D", "host": "h", "port": 1}]})
    assert r.returncode == 2
    assert "routes[0].pipelines[0]" in r.stdout and "routes[0].destinations[0]" in r.stdout
    assert "destinations[1].name" in r.stdout


def test_not_yaml_and_missing_file_exit_2(tmp_path: Path) -> None:
    r = check(tmp_path, "node: [unclosed")
    assert r.returncode == 2 and "not valid YAML" in r.stdout
    r = subprocess.run([sys.executable, "-m", "node.cli", "config", "check", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "cannot read" in r.stdout


def test_environment_overrides_any_key(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"node": {"port": 104}}))
    cfg = load_config(p, environ={"AINODE_NODE__PORT": "11113", "AINODE_NODE__ACCEPT_ANY_PEER": "true",
                                  "AINODE_BROKER__URL": "redis://127.0.0.1:6379/0",
                                  "AINODE_WORKERS__CONCURRENCY": "4"})
    assert cfg.node.port == 11113 and cfg.node.accept_any_peer is True
    assert cfg.broker.url == "redis://127.0.0.1:6379/0" and cfg.workers.concurrency == 4
    with pytest.raises(ConfigError) as exc:
        load_config(p, environ={"AINODE_NODE__PORT": "99999"})
    assert exc.value.problems[0].path == "node.port"
