"""Storage lifecycle with real ``ainode run`` processes, DCMTK storescu/storescp, and a real full disk.

* A study whose results have not reached the PACS is never purged, however short its retention; once
  they arrive it is, with a summary in ``ainode status``, and ``ainode rerun`` then says when its
  instances went. A study still within its retention re-runs.
* On a small tmpfs with nothing deletable the node answers 0xA700 and ``/healthz`` and ``ainode status``
  say why; when the PACS comes back the watermark frees the disk and the node accepts again.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from support.dcmtk import StoreSCP
from support.dicomgen import copy_with_new_uids, ct_series, sample_file
from support.node import NodeProcess, base_config, free_port, storescu, wait_for
from support.tmpfs import tmpfs

pytestmark = pytest.mark.slow
RESULTS_PER_STUDY = 3  # echo: measurement SR, narrative SR, summary SC


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _status(node: NodeProcess) -> dict[str, Any]:
    r = node.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _passes_after(node: NodeProcess, t: float, n: int = 3, timeout: float = 60) -> None:
    """Wait until the lifecycle has made a pass that started ``n`` intervals after ``t``."""
    step = float(node.config["node"]["lifecycle_seconds"])
    wait_for(lambda: ((_status(node).get("storage") or {}).get("at") or 0) > t + n * step, timeout, 0.5,
             f"{n} lifecycle passes")


def _config(tmp: Path, storage: Path, pacs_port: int, **node: Any) -> dict[str, Any]:
    cfg = base_config(storage, free_port(), lifecycle_seconds=0.5, **node)
    cfg["destinations"] = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
    cfg["delivery"] = {"poll_seconds": 0.5, "retry_base_seconds": 1, "retry_max_delay_seconds": 2}
    cfg["routes"] = [
        {"name": "ct", "match": {"Modality": "CT"}, "pipelines": ["echo"], "destinations": ["pacs"]},
        {"name": "cr-kept", "match": {"Modality": "CR"}, "pipelines": ["echo"], "destinations": ["pacs"],
         "retention_hours": 1},
    ]
    return cfg


def test_purged_only_after_delivery_then_rerun_says_when(node_factory, tmp_path: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs", aet="PACS")  # down at first
    cfg = _config(tmp_path, tmp_path / "var", pacs.port, retention_hours=0)
    node = node_factory(config=cfg)
    try:
        ct = ct_series(tmp_path / "ct", 3, size=32)
        uid = _uid(ct[0])
        storescu(node.port, ct)
        node.wait_study(uid, ("DONE",))
        t = time.time()
        _passes_after(node, t)
        # retention 0 h, but the PACS has not got the results: kept, and status says why
        s = node.study(uid)
        assert s["state"] == "DONE" and s["retention"] == {"kept": "results not yet delivered"}
        assert len(list((node.storage / "spool" / uid).rglob("*.dcm"))) == 3
        job = s["jobs"][0]["job_id"]
        assert (node.storage / "outbox" / job).is_dir()

        pacs.start()
        s = node.wait_study(uid, ("PURGED",), timeout=120)
        assert s["delivery"]["pacs"]["states"] == {"sent": RESULTS_PER_STUDY} and s["delivery"]["pacs"]["delivered"]
        assert s["instances"] == 3 and "retention 0 h after delivery" in s["purge_reason"]
        assert [j["state"] for j in s["jobs"]] == ["done"]
        assert not (node.storage / "spool" / uid).exists()
        assert not (node.storage / "outbox" / job).exists() and not (node.storage / "results" / job).exists()
        received = pacs.sop_uids()
        assert len(received) == RESULTS_PER_STUDY == len(set(received))  # each result once

        r = node.cli("rerun", uid)
        assert r.returncode == 1
        assert f"study {uid}: instances purged at {time.strftime('%Y-%m-%d', time.localtime())}" in r.stderr
        assert "retention 0 h after delivery" in r.stderr

        # a study within its route's retention (1 h) re-runs; its outbox went as soon as the PACS had it all
        cr = copy_with_new_uids(sample_file("RG1_UNCR.dcm"), tmp_path / "cr.dcm")
        cr_uid = _uid(cr)
        storescu(node.port, [cr])
        first = node.wait_study(cr_uid, ("DONE",))
        cr_job = first["jobs"][0]["job_id"]
        wait_for(lambda: not (node.storage / "outbox" / cr_job).exists(), 60, 0.3, "outbox cleaned after delivery")
        assert node.study(cr_uid)["retention"]["retention_hours"] == 1
        r = node.cli("rerun", cr_uid)
        assert r.returncode == 0, r.stderr + node.log_text()[-3000:]
        assert "re-run queued, 1 job(s)" in r.stdout
        wait_for(lambda: len(node.study(cr_uid)["jobs"]) == 2 and node.study(cr_uid)["state"] == "DONE", 90, 0.5,
                 "re-run finished")
        wait_for(lambda: len(pacs.files()) == 3 * RESULTS_PER_STUDY, 60, 0.3, "re-run results at the PACS")
        assert len(set(pacs.sop_uids())) == 3 * RESULTS_PER_STUDY  # new objects, none sent twice
        assert (node.storage / "spool" / cr_uid).is_dir()
    finally:
        pacs.stop()


def _healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_full_disk_says_why_and_the_watermark_frees_it(node_factory, tmp_path: Path) -> None:
    storage = tmp_path / "var"
    pacs = StoreSCP(tmp_path / "pacs", aet="PACS")  # down: nothing can be delivered, so nothing is deletable
    web = free_port()
    with tmpfs(storage, 160):
        cfg = _config(tmp_path, storage, pacs.port, retention_hours=24, min_free_disk_mb=32,
                      disk_high_water_percent=60, disk_low_water_percent=35, web_port=web)
        node = node_factory(config=cfg)
        try:
            sent: list[str] = []
            refused = None
            # 21 MB a study, and 3-4 MB of results in the outbox (the SC is 1024 pixels wide): above the high
            # watermark after ~4, and with nothing deletable the node refuses there, keeping the rest for results.
            # Each study is processed before the next is sent, so the test knows what the node holds.
            for i in range(12):
                files = ct_series(tmp_path / f"ct{i}", 40, size=512, seed=i, shuffle=False)
                uid = _uid(files[0])
                r = storescu(node.port, files, check=False)
                shutil.rmtree(tmp_path / f"ct{i}")
                if r.returncode == 0xA7 or "0xa700" in (r.stdout + r.stderr).lower():  # storescu: status >> 8
                    refused = i
                    break
                assert r.returncode == 0, r.stderr
                sent.append(uid)
                wait_for(lambda: len(list((storage / "outbox").glob("*/*.dcm"))) >= RESULTS_PER_STUDY * len(sent),
                         120, 0.3, "results of the study in the outbox")
            assert refused is not None, "the node never answered 0xA700 on a full disk"
            for uid in sent:
                node.wait_study(uid, ("DONE",))
            refusal = [ln for ln in node.log_text().splitlines() if "C-STORE from MODALITY1 refused" in ln]
            assert refusal and "above high water 60%, and no study may be deleted" in refusal[0]
            assert "results not yet delivered" in refusal[0]
            top_up = iter(range(100, 120))

            def full() -> tuple[int, dict[str, Any]] | None:
                """The disk hovers at the watermark (a WAL checkpoint frees a little): top it up until full."""
                h = _healthz(web)
                if h[1].get("storage", "ok") != "ok":
                    return h
                storescu(node.port, ct_series(tmp_path / f"top{next(top_up)}", 4, size=512), check=False)
                return None

            code, checks = wait_for(full, 120, 1.0, "healthz reporting a full disk")
            assert code == 503
            assert checks["storage"].startswith("full: disk ") and "above high water 60%" in checks["storage"]
            assert "no study may be deleted" in checks["storage"] and "answers 0xA700" in checks["storage"]
            assert "results not yet delivered" in checks["storage"]
            text = node.cli("status").stdout
            assert "storage: full" in text and "results not yet delivered" in text
            assert all((storage / "spool" / u).is_dir() for u in sent)  # nothing deleted that is not delivered

            pacs.start()  # results go out (and their outbox files with them): the node accepts again
            wait_for(lambda: _healthz(web)[1].get("storage") == "ok", 120, 0.5, "storage ok again")

            def purged_now() -> list[dict[str, Any]]:
                return [s for s in _status(node)["studies"] if s["state"] == "PURGED"]

            # delivery alone may bring the disk under the high watermark; new studies push it over again, and
            # then the oldest delivered studies are deleted (retention 24 h: only the watermark can do it)
            purged = purged_now()
            for i in range(10):
                if purged:
                    break
                files = ct_series(tmp_path / f"more{i}", 40, size=512, seed=200 + i, shuffle=False)
                sent.append(_uid(files[0]))
                r = storescu(node.port, files, check=False)
                shutil.rmtree(tmp_path / f"more{i}")
                assert r.returncode == 0, (r.returncode, r.stderr)
                deadline = time.monotonic() + 30
                while not purged and time.monotonic() < deadline:
                    time.sleep(1.0)
                    purged = purged_now()
            assert purged and all("above high water 60%" in s["purge_reason"] for s in purged)
            code, checks = wait_for(lambda: (h := _healthz(web))[1].get("storage") == "ok" and h, 120, 0.5,
                                    "storage ok after the purge")
            assert code == 200 and checks["storage_detail"]["disk_used_percent"] <= 60
            gone = {s["study_uid"] for s in purged}
            kept = [u for u in sent if u not in gone]
            assert kept and all((storage / "spool" / u).is_dir() for u in kept)  # retention 24 h: only what was needed
            files = ct_series(tmp_path / "again", 40, size=512, seed=99, shuffle=False)
            r = storescu(node.port, files, check=False)
            assert r.returncode == 0, (r.returncode, r.stderr)
        finally:
            node.stop()
            pacs.stop()
