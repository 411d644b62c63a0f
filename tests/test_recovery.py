"""Crashes that used to strand work (issue 10, items 4 and 7), with real processes, Redis, Celery and a real
DCMTK ``storescp`` as the PACS that must get the results exactly once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
from support.dcmtk import StoreSCP
from support.dicomgen import ct_series
from support.node import NodeProcess, base_config, free_port, storescu, wait_for


def _config(tmp_path: Path, pacs: StoreSCP, **workers: object) -> dict:
    cfg = base_config(tmp_path / "var", free_port())
    cfg["destinations"] = [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}]
    cfg["routes"][0]["destinations"] = ["pacs"]
    cfg["delivery"] = {"poll_seconds": 0.5}
    cfg["workers"].update(workers)
    return cfg


def _delivered_once(pacs: StoreSCP, outbox_files: list[str]) -> list[str]:
    uids = pacs.sop_uids()
    assert len(uids) == len(set(uids)), f"a result reached the PACS twice: {uids}"
    return uids


def test_a_listener_killed_between_job_done_and_delivery_queued_delivers_after_restart(node_factory,
                                                                                         tmp_path: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs", aet="PACS").start()
    try:
        node = node_factory(config=_config(tmp_path, pacs), env={"AINODE_FAULT": "after_job_done"})
        files = ct_series(tmp_path / "ct", 2, size=32)
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        storescu(node.port, files)
        assert node.proc is not None
        assert node.proc.wait(120) == -signal.SIGKILL, "the listener must die at the fault point"
        wait_for(lambda: "AINODE_FAULT=after_job_done" in node.log_text(), 5)
        (job,) = node.study(study_uid)["jobs"]
        assert job["state"] == "done", "the crash landed after the job was marked done"
        time.sleep(1)
        assert pacs.files() == [], "nothing was queued for delivery before the crash"

        summary = json.loads((node.storage / "results" / job["job_id"] / "summary.json").read_text())
        outbox = summary["outbox_files"]
        assert outbox, "the job produced result objects to deliver"
        # read now: once delivered and confirmed, the lifecycle deletes outbox files
        expected = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in outbox)
        node.env.pop("AINODE_FAULT")
        node.start()
        wait_for(lambda: len(pacs.files()) >= len(outbox), 60, 0.25, "results at the PACS after the restart")
        time.sleep(2)
        uids = _delivered_once(pacs, outbox)
        assert sorted(uids) == expected
        wait_for(lambda: "recovery: queueing the results of finished job" in node.log_text(), 5)
    finally:
        pacs.stop()


def node_events(node: NodeProcess, kind: str) -> list[float]:
    with sqlite3.connect(f"file:{node.storage / 'state.db'}?mode=ro", uri=True) as conn:
        return [r[0] for r in conn.execute("SELECT at FROM events WHERE kind=? ORDER BY at", (kind,))]


def _worker(node: NodeProcess, log: Path) -> subprocess.Popen[bytes]:
    """``ainode worker`` as a second host would run it: its own process group, one pool process."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "node.cli", "worker", "--config", str(node.config_path),
                                 "--concurrency", "1"], stdout=out, stderr=subprocess.STDOUT, env=node.env,
                                start_new_session=True)


def test_a_whole_worker_killed_mid_task_is_replaced_within_the_lease_and_results_arrive_once(
        node_factory, tmp_path: Path) -> None:
    lease, task = 6, 4
    pacs = StoreSCP(tmp_path / "pacs", aet="PACS").start()
    markers = tmp_path / "markers"
    cfg = _config(tmp_path, pacs, concurrency=0, lease_seconds=lease)  # workers run apart, as on other hosts
    cfg["pipelines"] = {"probe": {"sleep": task, "marker_dir": str(markers)}}
    workers: list[subprocess.Popen[bytes]] = []
    try:
        node = node_factory(config=cfg)
        workers = [_worker(node, tmp_path / f"worker-{i}.log") for i in range(2)]
        files = ct_series(tmp_path / "ct", 2, size=32)
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        storescu(node.port, files)
        job = wait_for(lambda: (s := node.study(study_uid)) and s["jobs"] and s["jobs"][0]["state"] == "started"
                       and s["jobs"][0], 120, 0.1, "job started")
        started = json.loads((node.storage / "results" / job["job_id"] / "started.json").read_text())
        wait_for(lambda: list(markers.glob("attempt-*")), 20)
        victim = next(w for w in workers if os.getpgid(started["pid"]) == w.pid)
        t_kill = time.time()
        os.killpg(victim.pid, signal.SIGKILL)  # the whole worker: main process and pool, as a host dies
        victim.wait(10)
        # the node's part is bounded by the lease: re-queued, and running again on the other worker, within it
        requeued = wait_for(lambda: node_events(node, "job_requeued"), lease + 30, 0.2, "job re-queued")
        assert requeued[0] - t_kill < lease + 5, f"re-queued {requeued[0] - t_kill:.1f} s after the kill"
        wait_for(lambda: len(list(markers.glob("attempt-*"))) == 2, 60, 0.2, "second attempt")
        attempts = sorted(markers.glob("attempt-*"), key=lambda a: float(a.name.split("-")[2]))
        second_at = float(attempts[1].name.split("-")[2])
        assert second_at - t_kill < lease + 10, f"second attempt began {second_at - t_kill:.1f} s after the kill"
        study = node.wait_study(study_uid, timeout=lease + task + 180)  # encoding and validation are slow here
        (done,) = study["jobs"]
        assert done["state"] == "done"
        assert str(started["pid"]) in attempts[0].name, [a.name for a in attempts]
        survivor = next(w for w in workers if w is not victim)
        second_pid = int(attempts[1].name.split("-")[1])
        assert os.getpgid(second_pid) == survivor.pid, "the second attempt ran on the other worker"
        wait_for(lambda: "stopped renewing the lease" in node.log_text(), 5)
        summary = json.loads((node.storage / "results" / done["job_id"] / "summary.json").read_text())
        wait_for(lambda: len(pacs.files()) >= len(summary["outbox_files"]), 60, 0.25, "results at the PACS")
        time.sleep(2 * lease)
        assert len(_delivered_once(pacs, summary["outbox_files"])) == len(summary["outbox_files"])
        assert len(list(markers.glob("attempt-*"))) == 2, "the job ran a third time"
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGTERM)
                try:
                    w.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(w.pid, signal.SIGKILL)
                    w.wait()
        pacs.stop()
