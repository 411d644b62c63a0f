"""Console actions and tools against a real node: cancel a queued job, retry what a destination
dead-lettered once it is back, the route tester on a stored study and on uploaded files, and secrets
never sent back. The node listens on loopback without credentials: the local administrator."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import requests
import yaml
from support.dcmtk import StoreSCP
from support.dicomgen import copy_with_new_uids, ct_series, sample_file
from support.node import base_config, free_port, storescu, wait_for


def up(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


class Console:
    def __init__(self, base: str):
        self.base = base
        self.s = requests.Session()

    def csrf(self, path: str = "/") -> str:
        m = re.search(r'name="csrf-token" content="([^"]+)"', self.s.get(self.base + path, timeout=30).text)
        assert m
        return m.group(1)

    def act(self, kind: str, **fields: str) -> str:
        """Ask, read the confirmation, confirm; returns the message shown afterwards."""
        r = self.s.post(f"{self.base}/actions/{kind}", data={"csrf": self.csrf(), **fields}, timeout=30)
        assert r.status_code == 200 and "Yes, do it" in r.text, r.text[-1000:]
        action_id = re.search(r'name="action_id" value="([^"]+)"', r.text).group(1)
        r = self.s.post(f"{self.base}/actions/{kind}", data={"csrf": self.csrf(), "confirmed": "yes",
                                                              "action_id": action_id, **fields}, timeout=60)
        m = re.search(r'id="msg">([^<]*)<', r.text)
        assert m, r.text[-1500:]
        return m.group(1).replace("&#39;", "'")


def test_cancel_retry_dead_letters_route_tester_and_secrets(node_factory, tmp_path: Path) -> None:
    web, late_port = free_port(), free_port()
    cfg = base_config(tmp_path / "var", free_port(), web_port=web)
    cfg["pipelines"] = {"probe": {"sleep": 4}}
    cfg["routes"][0]["match"] = {"Modality": "CT"}
    cfg["routes"][0]["destinations"] = ["late"]
    cfg["destinations"] = [
        {"name": "late", "ae_title": "LATE", "host": "127.0.0.1", "port": late_port, "retry_max_hours": 0.0005},
        {"name": "web", "kind": "dicomweb", "url": "http://127.0.0.1:9/dicom-web", "bearer_token": "TOPSECRET-42"}]
    cfg["delivery"] = {"retry_base_seconds": 0.3, "retry_max_delay_seconds": 0.5, "poll_seconds": 0.3}
    node = node_factory(config=cfg)
    base = f"http://127.0.0.1:{web}"
    wait_for(lambda: up(base + "/healthz"), 30, 0.2, "console")
    c = Console(base)

    a = ct_series(tmp_path / "a", 2, size=16)
    b = ct_series(tmp_path / "b", 2, size=16)
    ua, ub = (str(pydicom.dcmread(x[0], stop_before_pixels=True).StudyInstanceUID) for x in (a, b))
    storescu(node.port, a)
    wait_for(lambda: (s := node.study(ua)) and s["jobs"] and s["jobs"][0]["state"] == "started", 60, 0.2, "A runs")
    storescu(node.port, b)
    job_b = wait_for(lambda: (s := node.study(ub)) and s["jobs"] and s["jobs"][0]["state"] == "queued"
                     and s["jobs"][0]["job_id"], 30, 0.1, "B queued behind A")

    # cancel B while it waits; a second cancel changes nothing
    assert c.act("cancel", study_uid=ub, job_id=job_b) == "job cancelled"
    assert c.act("cancel", study_uid=ub, job_id=job_b).startswith("nothing done: the job is cancelled")
    node.wait_study(ua, timeout=120)
    wait_for(lambda: node.study(ua)["delivery"]["late"]["states"].get("dead-letter"), 60, 0.3, "dead-lettered")
    s = node.study(ub)
    assert s["state"] == "CANCELLED" and s["jobs"][0]["state"] == "cancelled", s

    # the destination comes back: retry its dead letters from the console
    n_dead = node.study(ua)["delivery"]["late"]["states"]["dead-letter"]
    page = c.s.get(base + "/config", timeout=30).text
    assert f"Retry {n_dead} failed" in page
    with StoreSCP(tmp_path / "late-out", aet="LATE", port=late_port) as scp:
        msg = c.act("retry-dead", destination="late")
        assert msg == f"{n_dead} failed or dead-lettered object(s) queued again for late"
        wait_for(lambda: len(scp.files()) == n_dead, 60, 0.3, "dead letters delivered")
        assert c.act("retry-dead", destination="late").startswith("nothing done")
    timeline = c.s.get(f"{base}/studies/{ua}", timeout=30).text
    assert f"{n_dead} result object(s) delivered to late" in timeline

    # route tester: a stored study, an uploaded CT, an uploaded CR that no route takes
    r = c.s.post(base + "/config/route-test", data={"csrf": c.csrf(), "study_uid": ua}, timeout=30)
    assert re.search(r"stored study [0-9.]+: <b>everything</b> → probe → late", r.text), r.text[-1500:]
    r = c.s.post(base + "/config/route-test", data={"csrf": c.csrf(), "calling_ae": "MODALITY1"},
                 files={"file": ("ct.dcm", a[0].read_bytes())}, timeout=30)
    assert "uploaded file: <b>everything</b>" in r.text
    cr = copy_with_new_uids(sample_file("RG1_UNCR.dcm"), tmp_path / "cr.dcm")
    r = c.s.post(base + "/config/route-test", data={"csrf": c.csrf()}, files={"file": ("cr.dcm", cr.read_bytes())},
                 timeout=30)
    assert "uploaded file: <b>no route</b>" in r.text
    r = c.s.post(base + "/config/route-test", data={"study_uid": ua}, timeout=30)
    assert r.status_code == 403, "without the CSRF token even the local administrator is refused"

    # secrets are never sent back, and an empty secret field keeps the secret
    for path in ("/config", "/config/destinations/1"):
        assert "TOPSECRET-42" not in c.s.get(base + path, timeout=30).text
    form = {"csrf": c.csrf("/config/destinations/1"), "name": "web", "kind": "dicomweb",
            "url": "http://127.0.0.1:10/dicom-web", "bearer_token": ""}
    r = c.s.post(base + "/config/destinations/1", data=form, timeout=60)
    assert "saved destinations[1] and reloaded" in r.text, r.text[-1500:]
    dest = yaml.safe_load(node.config_path.read_text())["destinations"][1]
    assert dest["url"].endswith(":10/dicom-web") and dest["bearer_token"] == "TOPSECRET-42"
    audit = (tmp_path / "var" / "audit.jsonl").read_text()
    assert "TOPSECRET-42" not in audit and '"bearer_token": "***"' in audit

    # the console refuses an unknown pipeline option at its field, and writes nothing
    before = node.config_path.read_bytes()
    form = {"csrf": c.csrf("/config/routes/0"), "name": "everything", "match": "{Modality: CT}",
            "pipelines": "echo", "destinations": "late", "options": "{modle: x}"}
    r = c.s.post(base + "/config/routes/0", data=form, timeout=60)
    assert r.status_code == 422 and 'id="err-options"' in r.text, r.text[-1500:]
    assert "unknown option &#39;modle&#39; for pipeline(s) echo" in r.text and "valid options:" in r.text
    assert node.config_path.read_bytes() == before
