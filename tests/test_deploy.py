"""The deployment files IT staff start from: docker-compose.yml, its config and the Dockerfile.

There is no container engine here, so this checks what can be checked without one: Compose itself
(Debian's docker-compose) parses and validates the file, the services are wired to each other the way
the node's config expects, and the config the containers read passes ``ainode config check``.
"""

from __future__ import annotations

import configparser
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = "/usr/bin/docker-compose"


def compose_config() -> dict:
    r = subprocess.run([COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def test_compose_file_is_valid_and_wires_the_services_together() -> None:
    services = compose_config()["services"]
    assert set(services) == {"redis", "listener", "worker-cpu", "worker-gpu", "orthanc"}
    assert services["listener"]["command"] == ["serve"]
    assert services["worker-cpu"]["command"] == ["worker", "--queues", "cpu"]
    assert services["worker-gpu"]["command"] == ["worker", "--queues", "gpu"]
    gpu = services["worker-gpu"]
    assert gpu["build"]["args"]["EXTRAS"] == "[gpu]"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]

    # every ainode container reads the same config file, from the same shared storage volume
    mounts = {}
    for name in ("listener", "worker-cpu", "worker-gpu"):
        svc = services[name]
        target = svc["environment"]["AINODE_CONFIG"]
        (src,) = [v.split(":")[0] for v in svc["volumes"] if v.split(":")[1] == target]
        mounts[name] = src
        assert any(v.startswith("ainode-data:") for v in svc["volumes"])
    assert len(set(mounts.values())) == 1
    config_file = Path(next(iter(mounts.values())))
    assert config_file.is_file()

    # that config passes the node's own check and points at the compose services
    r = subprocess.run([sys.executable, "-m", "node.cli", "config", "check", str(config_file)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = yaml.safe_load(config_file.read_text())
    storage = cfg["node"]["storage_dir"]
    assert any(v == f"ainode-data:{storage}:rw" for v in services["listener"]["volumes"])
    assert re.fullmatch(r"redis://redis:6379/\d+", cfg["broker"]["url"])
    listener_ports = {p["target"] for p in services["listener"]["ports"]}
    assert {cfg["node"]["port"], cfg["node"].get("web_port", 8080)} <= listener_ports

    # results go to the demo Orthanc, whose AE title and DICOM port match; Orthanc may push to us
    orthanc = services["orthanc"]
    (dest,) = [d for d in cfg["destinations"] if d["host"] == "orthanc"]
    assert dest["ae_title"] == orthanc["environment"]["ORTHANC__DICOM_AET"]
    assert dest["port"] in {p["target"] for p in orthanc["ports"]}
    assert any(p["ae_title"] == dest["ae_title"] and not p.get("host") for p in cfg["peers"])
    modalities = json.loads(orthanc["environment"]["ORTHANC__DICOM_MODALITIES"])
    assert [cfg["node"]["ae_title"], "listener", cfg["node"]["port"]] in modalities.values()


def test_dockerfile_copies_what_exists_and_runs_the_installed_command() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    scripts = setup["options.entry_points"]["console_scripts"]
    assert re.search(r"^ainode\s*=", scripts, re.M)
    assert 'ENTRYPOINT ["ainode"]' in text
    assert "gpu" in setup["options.extras_require"]
    assert "onnxruntime-gpu" in setup["options.extras_require"]["gpu"]


def test_compose_config_differs_from_the_example_only_where_compose_needs_it() -> None:
    """config/compose.yaml is a copy of config/ainode.yaml; a route or pipeline setting changed in one
    and forgotten in the other would make the demo behave differently from the documented example."""
    example = yaml.safe_load((ROOT / "config" / "ainode.yaml").read_text())
    compose = yaml.safe_load((ROOT / "config" / "compose.yaml").read_text())
    for cfg in (example, compose):  # the keys compose legitimately points at its own services
        cfg["node"].pop("storage_dir")
        cfg["node"].pop("web_host")  # a container listens on all interfaces (and so needs the token)
        cfg["broker"].pop("url")
        for peer in cfg["peers"]:
            peer.pop("host", None)
        for dest in cfg["destinations"]:
            if dest["name"] == "pacs":
                dest.pop("host")
                dest.pop("port")
    assert compose == example
