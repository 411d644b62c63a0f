"""The status page, health check and metrics IT staff point their monitoring at."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
from support.dicomgen import ct_series
from support.node import base_config, free_port, storescu, wait_for


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except urllib.error.URLError:
        return 0, ""


def test_health_metrics_and_status_page(node_factory, tmp_path: Path) -> None:
    web = free_port()
    cfg = base_config(tmp_path / "var", free_port(), web_port=web)
    node = node_factory(config=cfg)
    base = f"http://127.0.0.1:{web}"
    code, body = wait_for(lambda: (r := get(base + "/healthz"))[0] and r, 20)
    assert code == 200, body
    checks = json.loads(body)
    assert checks["broker"] == "ok" and checks["state_db"] == "ok" and checks["listener"] == "ok"
    files = ct_series(tmp_path / "ct", 3, size=16, patient_id="SECRET-PID-42")
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    storescu(node.port, files)
    node.wait_study(uid)
    code, text = get(base + "/metrics")
    assert code == 200
    assert 'ainode_studies{state="done"} 1' in text and "ainode_instances_stored 3" in text
    assert 'ainode_jobs{pipeline="probe",state="done"} 1' in text
    code, page = get(base + "/")
    assert code == 200 and uid in page and "DONE" in page
    assert "SECRET-PID-42" not in page, "patient IDs must not appear on the status page"
    code, api = get(base + "/api/status")
    assert json.loads(api)["studies"][0]["study_uid"] == uid
    assert "SECRET-PID-42" not in node.log_text(), "patient IDs must not be logged at INFO"
    assert get(base + "/nope")[0] == 404
