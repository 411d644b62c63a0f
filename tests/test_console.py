"""The console's access control, audit log and Prometheus metrics, against a real ``ainode run``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.dcmtk import echo
from support.dicomgen import ct_series
from support.node import TEST_PLUGINS, base_config, free_port, storescu, wait_for

from node.web.auth import hash_password

TOKEN = "s3cret-token-for-prometheus"


def users() -> list[dict[str, str]]:
    return [{"name": "ada", "role": "admin", "password_hash": hash_password("ada-pw")},
            {"name": "vic", "role": "viewer", "password_hash": hash_password("vic-pw")}]


def status_of(url: str) -> int:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.ConnectionError:
        return 0


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "page carries no CSRF token"
    return m.group(1)


def login(base: str, name: str, password: str) -> requests.Session:
    s = requests.Session()
    page = s.get(base + "/login", timeout=10)
    r = s.post(base + "/login", data={"name": name, "password": password, "csrf": csrf_of(page.text), "next": "/"},
               timeout=10)
    assert r.status_code == 200 and "Dashboard" in r.text, (r.status_code, r.text[:300])
    return s


def test_beyond_loopback_without_credentials_refuses_to_start(tmp_path: Path) -> None:
    cfg = base_config(tmp_path / "var", free_port(), web_port=free_port(), web_host="0.0.0.0")
    path = tmp_path / "ainode.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TEST_PLUGINS), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "node.cli", "run", "--config", str(path)], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "node.web_host" in r.stderr and "console.users" in r.stderr and "AINODE_CONSOLE__TOKEN" in r.stderr
    assert not (tmp_path / "var" / "state.db").exists(), "nothing may start before the refusal"


def test_access_control_audit_and_metrics(node_factory, tmp_path: Path) -> None:
    web = free_port()
    cfg = base_config(tmp_path / "var", free_port(), web_port=web, web_host="0.0.0.0")
    cfg["console"] = {"users": users()}
    node = node_factory(config=cfg, env={"AINODE_CONSOLE__TOKEN": TOKEN})
    base = f"http://127.0.0.1:{web}"
    wait_for(lambda: status_of(base + "/healthz") == 200, 30, 0.2, "healthz")

    # nothing but /healthz without credentials
    assert requests.get(base + "/metrics", timeout=5).status_code == 401
    assert requests.get(base + "/api/status", timeout=5).status_code == 401
    assert requests.get(base + "/metrics", headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"},
                        timeout=5).status_code == 401
    r = requests.get(base + "/", timeout=5, allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    assert requests.get(base + "/api/status", auth=("vic", "wrong"), timeout=5).status_code == 401
    assert requests.get(base + "/api/status", auth=("vic", "vic-pw"), timeout=5).status_code == 200

    # a wrong password is refused, and both attempts are audited without the password
    s = requests.Session()
    page = s.get(base + "/login", timeout=5)
    bad = s.post(base + "/login", data={"name": "ada", "password": "nope", "csrf": csrf_of(page.text)}, timeout=10)
    assert bad.status_code == 401 and "Wrong name or password" in bad.text
    ada = login(base, "ada", "ada-pw")
    vic = login(base, "vic", "vic-pw")

    files = ct_series(tmp_path / "ct", 3, size=16, patient_id="SECRET-PID-77")
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert not echo(node.port, "AINODE", calling_aet="STRANGER")  # rejected: calling AE unknown
    storescu(node.port, files)
    node.wait_study(uid)

    # the viewer reads, but cannot act; the admin can, only with the CSRF token
    page = vic.get(f"{base}/studies/{uid}", timeout=10)
    assert page.status_code == 200 and uid in page.text and "Re-run" not in page.text
    assert "SECRET-PID-77" not in page.text
    r = vic.post(base + "/actions/rerun", data={"study_uid": uid, "csrf": csrf_of(page.text)}, timeout=10)
    assert r.status_code == 403
    page = ada.get(f"{base}/studies/{uid}", timeout=10)
    assert "Re-run" in page.text
    assert ada.post(base + "/actions/rerun", data={"study_uid": uid}, timeout=10).status_code == 403
    assert ada.post(base + "/actions/rerun", data={"study_uid": uid, "csrf": "forged"}, timeout=10).status_code == 403
    confirm = ada.post(base + "/actions/rerun", data={"study_uid": uid, "csrf": csrf_of(page.text)}, timeout=10)
    assert confirm.status_code == 200 and "Yes, do it" in confirm.text
    action_id = re.search(r'name="action_id" value="([^"]+)"', confirm.text).group(1)
    form = {"study_uid": uid, "csrf": csrf_of(confirm.text), "confirmed": "yes", "action_id": action_id}
    done = ada.post(base + "/actions/rerun", data=form, timeout=10)
    assert done.status_code == 200 and "1 job(s) queued again" in done.text, done.text[-2000:]
    again = ada.post(base + "/actions/rerun", data=form, timeout=10)  # the same confirmed action twice
    assert "already done" in again.text
    wait_for(lambda: len([j for j in node.study(uid)["jobs"] if j["state"] == "done"]) == 2, 60, 0.3, "re-run")

    # Prometheus: the token scrapes, the exposition parses with prometheus_client's own parser
    text = requests.get(base + "/metrics", headers={"Authorization": "Bearer " + TOKEN}, timeout=10).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}

    def value(name: str, **labels: str) -> float:
        found = [s.value for f in fams.values() for s in f.samples
                 if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        assert found, f"no sample {name} {labels}"
        return sum(found)

    wait_for(lambda: requests.get(base + "/metrics", headers={"Authorization": "Bearer " + TOKEN}, timeout=10)
             .text.count('ainode_jobs_finished_total{outcome="done",pipeline="probe"} 2.0'), 20, 0.5, "2 jobs counted")
    text = requests.get(base + "/metrics", headers={"Authorization": "Bearer " + TOKEN}, timeout=10).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["ainode_instances_received"].type == "counter" and value("ainode_instances_received_total") == 3
    assert value("ainode_bytes_received_total") == value("ainode_spool_bytes") > 0
    assert value("ainode_associations_total", outcome="accepted") >= 1
    assert value("ainode_associations_total", outcome="calling_ae") == 1
    assert value("ainode_jobs_finished_total", pipeline="probe", outcome="done") == 2
    assert fams["ainode_stage_seconds"].type == "histogram"
    assert value("ainode_stage_seconds_count", stage="receive_to_complete") >= 1
    assert value("ainode_stage_seconds_count", stage="complete_to_result") == 2
    assert value("ainode_inference_seconds_count", pipeline="probe") == 2
    assert value("ainode_studies", state="done") == 1 and value("ainode_instances_stored") == 3
    assert "ainode_queue_depth" in fams and value("ainode_disk_free_bytes") > 0
    assert value("ainode_studies_received_total") == 1

    # every series the shipped Grafana dashboard plots is one the node exports
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    used = {re.sub(r"_(total|bucket|count|sum)$", "", m)
            for m in re.findall(r"ainode_[a-z_]+", (deploy / "grafana-dashboard.json").read_text())}
    assert len(used) >= 10 and used <= set(fams), used - set(fams)
    job = yaml.safe_load((deploy / "prometheus.yml").read_text())["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"

    # the audit log: logins (failed too), refusals, the action once plus its repeat; never a password
    entries = [json.loads(line) for line in (tmp_path / "var" / "audit.jsonl").read_text().splitlines()]
    logins = [(e["who"], e["outcome"]) for e in entries if e["action"] == "login"]
    # the wrong token, the wrong Basic password, the wrong form password, then the two good sign-ins
    assert logins[:5] == [("token", "failed"), ("basic", "failed"), ("ada", "failed"), ("ada", "ok"), ("vic", "ok")]
    assert all(e["from"] == "127.0.0.1" and e["at"] for e in entries)
    kinds = [(e["who"], e["action"], e["outcome"]) for e in entries]
    assert ("vic", "denied", "forbidden") in kinds and ("ada", "csrf-refused", "refused") in kinds
    assert kinds.count(("ada", "rerun", "ok")) == 1 and kinds.count(("ada", "rerun", "repeat")) == 1
    raw = (tmp_path / "var" / "audit.jsonl").read_text()
    assert "ada-pw" not in raw and "nope" not in raw and "SECRET-PID-77" not in raw
    assert "SECRET-PID-77" not in node.log_text()
    audit_page = vic.get(base + "/audit", timeout=10)
    assert audit_page.status_code == 200 and "csrf-refused" in audit_page.text


def test_guessing_passwords_is_throttled_per_address(node_factory, tmp_path: Path) -> None:
    """Failed sign-ins from one address make it wait (HTTP 429, Retry-After), whatever it then sends, the
    right password included; the wait ends, success clears the count, and every step is audited."""
    web = free_port()
    cfg = base_config(tmp_path / "var", free_port(), web_port=web)
    cfg["console"] = {"users": users(), "max_failed_logins": 3, "lockout_seconds": 2}
    node_factory(config=cfg)
    base = f"http://127.0.0.1:{web}"
    wait_for(lambda: status_of(base + "/healthz") == 200, 30, 0.2, "healthz")

    s = requests.Session()
    for i in range(3):
        page = s.get(base + "/login", timeout=5)
        bad = s.post(base + "/login", data={"name": "ada", "password": f"guess{i}", "csrf": csrf_of(page.text)},
                     timeout=10)
        assert bad.status_code == 401
    assert "must wait 2 s" in bad.text  # the third failure starts the wait, and says so
    page = s.get(base + "/login", timeout=5)
    held = s.post(base + "/login", data={"name": "ada", "password": "ada-pw", "csrf": csrf_of(page.text)},
                  timeout=10)
    assert held.status_code == 429 and "Too many failed sign-ins" in held.text
    assert 1 <= int(held.headers["Retry-After"]) <= 3
    api = requests.get(base + "/api/status", auth=("vic", "vic-pw"), timeout=5)
    assert api.status_code == 429 and "Retry-After" in api.headers  # the same address, another way in

    time.sleep(2.2)
    login(base, "ada", "ada-pw")  # the wait is over; success clears the count
    page = s.get(base + "/login", timeout=5)
    assert s.post(base + "/login", data={"name": "ada", "password": "again", "csrf": csrf_of(page.text)},
                  timeout=10).status_code == 401  # one failure after a success is not a lockout

    entries = [json.loads(line) for line in (tmp_path / "var" / "audit.jsonl").read_text().splitlines()]
    outcomes = [e["outcome"] for e in entries if e["action"] == "login"]
    assert outcomes[:5] == ["failed", "failed", "failed; address waits 2 s", "throttled", "ok"], outcomes
    assert not any("guess" in json.dumps(e) or "ada-pw" in json.dumps(e) for e in entries)
