"""kill -9 at awkward moments: nothing acknowledged is lost and no study is processed twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pydicom
from support.dicomgen import ct_series
from support.node import STORESCU, base_config, free_port, storescu, wait_for


def test_listener_killed_mid_series_loses_nothing_and_runs_one_job(node_factory, tmp_path: Path) -> None:
    port = free_port()
    cfg = base_config(tmp_path / "var", port)
    node = node_factory(config=cfg)
    files = ct_series(tmp_path / "ct", 200, size=128, shuffle=False)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    sender = subprocess.Popen([STORESCU, "-aet", "MODALITY1", "-aec", "AINODE", "127.0.0.1", str(port),
                               *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=dict(os.environ, TCP_NODELAY="1"))
    spool = tmp_path / "var" / "spool" / study_uid
    wait_for(lambda: spool.exists() and len(list(spool.rglob("*.dcm"))) >= 40, 60, 0.01, "40 instances stored")
    node.kill9()
    sender.wait(60)
    on_disk = {p.name for p in spool.rglob("*.dcm")}
    assert 40 <= len(on_disk) < 200, "the kill must land while the series is arriving"

    node.start()  # same storage dir; recovery runs before the port opens
    pool = tmp_path / "var" / "spool" / ".incoming"
    assert not [p for p in pool.iterdir() if p.stat().st_size and p.stat().st_nlink == 1], \
        "partial writes left after recovery"
    assert all(pydicom.dcmread(p).pixel_array.shape == (128, 128) for p in spool.rglob("*.dcm")), \
        "every instance under its final name is whole"
    storescu(port, files)  # the modality resends everything, as a modality does after a failure
    study = node.wait_study(study_uid, timeout=120)
    assert study["instances"] == 200
    assert {p.name for p in spool.rglob("*.dcm")} >= on_disk
    assert len(list(spool.rglob("*.dcm"))) == 200
    assert len(study["jobs"]) == 1 and study["jobs"][0]["state"] == "done"
    (series,) = node.result(study["jobs"][0]["job_id"])["details"]["series"]
    assert series["frames"] == 200


def test_worker_killed_mid_task_runs_the_task_again_to_completion(node_factory, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    cfg = base_config(tmp_path / "var", free_port())
    cfg["pipelines"] = {"probe": {"sleep": 4, "marker_dir": str(markers)}}
    node = node_factory(config=cfg)
    files = ct_series(tmp_path / "ct", 3, size=32)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    storescu(node.port, files)
    # straight from the disk: `ainode status` can take longer than the task on a loaded machine
    started_path = wait_for(lambda: next((node.storage / "results").glob("*/started.json"), None), 60, 0.05,
                            "job started")
    wait_for(lambda: list(markers.glob("attempt-*")), 10, 0.05)
    started = json.loads(started_path.read_text())
    os.kill(started["pid"], signal.SIGKILL)  # the pool process running the pipeline, mid-sleep
    study = node.wait_study(study_uid, timeout=90)
    attempts = sorted(markers.glob("attempt-*"))
    assert len(attempts) == 2, [a.name for a in attempts]
    pids = {a.name.split("-")[1] for a in attempts}
    assert len(pids) == 2 and str(started["pid"]) in pids, "second run must be in a new worker process"
    (job,) = study["jobs"]
    assert job["state"] == "done" and job["attempts"] >= 1
    assert node.result(job["job_id"])["details"]["pid"] != started["pid"]
    time.sleep(1)
    assert len(list(markers.glob("attempt-*"))) == 2, "the task ran a third time"
