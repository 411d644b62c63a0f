"""Storage lifecycle rules on a real state database and real spool files (node/lifecycle).

The rules: what may be deleted and when, what never is, disk watermarks, compaction of purged studies'
rows, outbox clean-up, and re-run after purge. End-to-end versions with real ``ainode run`` processes
are in tests/test_lifecycle_e2e.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from node import lifecycle as lifecycle_pkg
from node.config import Config
from node.delivery import SCHEMA as DELIVERY_SCHEMA
from node.lifecycle import Lifecycle, StudyPurged, rerun_study
from node.lifecycle.policy import assess
from node.spool import Spool
from node.state import State

DAY = 86400.0


def make_cfg(tmp: Path, **node: Any) -> Config:
    data = {
        "node": {"storage_dir": str(tmp / "var"), "min_free_disk_mb": 0, "retention_hours": 24,
                 "failed_retention_hours": 2, **node},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                         {"name": "vna", "ae_title": "VNA", "host": "127.0.0.1", "port": 105,
                          "storage_commitment": True}],
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "pipelines": ["echo"], "destinations": ["pacs"]},
                   {"name": "short", "match": {"Modality": "CR"}, "pipelines": ["echo"], "destinations": ["pacs"],
                    "retention_hours": 1}],
    }
    return Config.model_validate(data)


class World:
    """A state database and spool with studies in whatever state a test needs."""

    def __init__(self, tmp: Path, **node: Any):
        self.cfg = make_cfg(tmp, **node)
        self.storage = Path(self.cfg.node.storage_dir)
        self.state = State(self.storage)
        self.state.ensure_schema(DELIVERY_SCHEMA)
        self.spool = Spool(self.storage, 0)
        self.lc = Lifecycle(self.cfg, self.state, self.spool, self.storage)

    def study(self, state: str, *, finished: float, route: str = "ct", job_state: str | None = "done",
              n: int = 2, size: int = 1000, deliveries: list[tuple[str, str]] = (), outbox: bool = False,
              summary_files: bool = False) -> str:
        uid = generate_uid()
        series = generate_uid()
        for _ in range(n):
            sop = generate_uid()
            p = self.spool.path_for(uid, series, sop)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x" * size)
            self.state.record_instance(study_uid=uid, series_uid=series, sop_uid=sop, path=str(p), size=size,
                                       calling_ae="MOD", assoc_id="a1", modality="CT", sop_class_uid="1.2",
                                       expected=None, series_tags={})
        job_id = generate_uid().replace(".", "")[-24:]
        files = []
        if outbox:
            d = self.storage / "outbox" / job_id
            d.mkdir(parents=True)
            (d / "sr.dcm").write_bytes(b"result")
            files = [str(d / "sr.dcm")]
        self.state.execute("UPDATE studies SET state=?, route=?, completed=?, last_received=? WHERE study_uid=?",
                           (state, route, finished - 10, finished - 20, uid))
        if job_state:
            res = self.storage / "results" / job_id
            res.mkdir(parents=True)
            (res / "summary.json").write_text("{}")
            summary = {"status": "ok", "outbox_files": files if summary_files or outbox else []}
            self.state.execute("INSERT INTO jobs(job_id, study_uid, pipeline, route, generation, instances_hash,"
                               " state, created, finished, summary) VALUES (?,?,?,?,?,?,?,?,?,?)",
                               (job_id, uid, "echo", route, 1, "h" + job_id, job_state, finished - 5,
                                finished if job_state not in ("queued", "started", "pending") else None,
                                json.dumps(summary)))
        for i, (dest, st) in enumerate(deliveries):
            self.state.execute(
                "INSERT INTO deliveries(destination, sop_uid, sop_class_uid, transfer_syntax, study_uid, job_id,"
                " path, state, next_attempt, created, sent, committed) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (dest, f"{uid}.{i + 1}", "1.2", "1.2.840.10008.1.2.1", uid, job_id, files[0] if files else "x",
                 st, finished, finished - 4, finished if st in ("sent", "committed") else None,
                 finished if st == "committed" else None))
        self.state.event("test", "an event", uid)
        return uid

    def spool_dir(self, uid: str) -> Path:
        return self.spool.root / uid

    def job_ids(self, uid: str) -> list[str]:
        return [r["job_id"] for r in self.state.query("SELECT job_id FROM jobs WHERE study_uid=?", (uid,))]


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    yield w
    w.state.close()


def test_deletable_and_never_deletable_states(world: World) -> None:
    now = time.time()
    old = now - 30 * DAY
    w = world
    never = {
        w.study("receiving", finished=old, job_state=None): "receiving",
        w.study("queued", finished=old, job_state="queued"): "queued",
        w.study("processing", finished=old, job_state="started"): "processing",
        w.study("done", finished=old, deliveries=[("pacs", "pending")]): "results not yet delivered",
        w.study("done", finished=old, deliveries=[("pacs", "dead-letter")]): "results refused or dead-lettered",
        w.study("done", finished=old, deliveries=[("pacs", "failed-permanent")]): "results refused or dead-lettered",
        w.study("done", finished=old, deliveries=[("pacs", "sent"), ("vna", "sent")]): "awaiting storage commitment",
        # finished a moment ago, results in the outbox, delivery not told yet: not "delivered"
        w.study("done", finished=old, outbox=True): "results not yet delivered",
    }
    done = w.study("done", finished=now - 25 * 3600, deliveries=[("pacs", "sent"), ("vna", "committed")])
    fresh = w.study("done", finished=now - 3600, deliveries=[("pacs", "sent")])
    short = w.study("done", finished=now - 2 * 3600, route="short", deliveries=[("pacs", "sent")])
    refused = w.study("refused", finished=now - 3 * 3600, job_state="refused")
    failed_recent = w.study("failed", finished=now - 3600, job_state="failed")
    no_route = w.study("no_route", finished=now - 25 * 3600, route=None, job_state=None)

    found = assess(w.state.query, w.cfg, now)
    assert {u: found.kept[u] for u in never} == never
    by_uid = {c.study_uid: c for c in found.candidates}
    assert set(by_uid) == {done, fresh, short, refused, failed_recent, no_route}
    assert by_uid[fresh].retention_hours == 24 and by_uid[short].retention_hours == 1  # the route's own
    assert by_uid[refused].retention_hours == 2 and by_uid[failed_recent].retention_hours == 2
    assert {c.study_uid for c in found.expired(now)} == {done, short, refused, no_route}

    status = w.lc.run_once(now)
    for uid in (done, short, refused, no_route):
        assert not w.spool_dir(uid).exists(), uid
        assert w.state.one("SELECT 1 FROM studies WHERE study_uid=?", (uid,)) is None
    for uid in [*never, fresh, failed_recent]:
        assert len(list(w.spool_dir(uid).rglob("*.dcm"))) == 2, uid
        assert w.state.one("SELECT state FROM studies WHERE study_uid=?", (uid,))["state"] != "purged"
    assert status["purged_total"] == 4 and status["state"] == "ok"
    assert status["held"]["results not yet delivered"] == 2


def test_compaction_keeps_a_summary_and_drops_the_rows(world: World) -> None:
    w = world
    now = time.time()
    uid = w.study("done", finished=now - 2 * DAY, n=3, size=500, deliveries=[("pacs", "sent"), ("pacs", "sent")],
                  outbox=True)
    jobs = w.job_ids(uid)
    w.lc.run_once(now)
    for table in ("instances", "series", "jobs", "deliveries", "events", "assoc_studies", "studies"):
        assert w.state.one(f"SELECT COUNT(*) n FROM {table} WHERE study_uid=?", (uid,))["n"] == 0, table
    s = dict(w.state.one("SELECT * FROM study_summaries WHERE study_uid=?", (uid,)))
    assert s["n_instances"] == 3 and s["bytes"] == 1500 and s["outcome"] == "done"
    assert s["first_received"] is not None and s["completed"] is not None and s["purged"] >= now
    assert "retention 24 h after delivery" in s["purge_reason"]
    assert [j["job_id"] for j in json.loads(s["jobs"])] == jobs
    assert json.loads(s["deliveries"])["pacs"]["states"] == {"sent": 2}
    assert not (w.storage / "outbox" / jobs[0]).exists() and not (w.storage / "results" / jobs[0]).exists()
    # the WAL is checkpointed and truncated by the maintenance round
    out = w.lc.maintain_db()
    assert out["checkpoint"][0] == 0, out  # not busy
    assert (w.storage / "state.db-wal").stat().st_size == 0


def test_late_instance_arriving_during_a_purge_is_kept(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing acknowledged is lost: an instance stored for the study while its purge runs survives it."""
    w = world
    now = time.time()
    uid = w.study("done", finished=now - 2 * DAY, deliveries=[("pacs", "sent")])
    series = w.state.query("SELECT series_uid FROM series WHERE study_uid=?", (uid,))[0]["series_uid"]
    late = {}
    import node.lifecycle.purge as purge_mod

    real = purge_mod._forget_dirs

    def arrive_meanwhile(spool: Spool, study_uid: str) -> None:
        sop = generate_uid()
        p = spool.path_for(uid, series, sop)
        p.write_bytes(b"late")
        w.state.record_instance(study_uid=uid, series_uid=series, sop_uid=sop, path=str(p), size=4,
                                calling_ae="MOD", assoc_id="a2", modality="CT", sop_class_uid="1.2", expected=None,
                                series_tags={})
        late["path"] = p
        real(spool, study_uid)

    monkeypatch.setattr(purge_mod, "_forget_dirs", arrive_meanwhile)
    w.lc.run_once(now)
    assert late["path"].read_bytes() == b"late"
    assert [p.name for p in w.spool_dir(uid).rglob("*.dcm")] == [late["path"].name]
    row = w.state.one("SELECT state, n_instances FROM studies WHERE study_uid=?", (uid,))
    assert row["state"] == "receiving" and row["n_instances"] == 1
    assert w.state.one("SELECT COUNT(*) n FROM instances WHERE study_uid=?", (uid,))["n"] == 1


def test_watermarks_delete_oldest_deletable_first_down_to_low_water(world: World,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A 100 kB 'disk' made of the spool's own bytes: high water 80 %, low 50 %. Retention (24 h) has not
    run out for anyone, so only the watermark can delete, and only what is finished and delivered."""
    w = world
    now = time.time()

    def spool_disk(path: Path) -> tuple[int, int]:
        return 100_000, sum(p.stat().st_size for p in w.spool.root.rglob("*.dcm"))

    monkeypatch.setattr(lifecycle_pkg, "disk_usage", spool_disk)
    w.cfg.node.disk_high_water_percent, w.cfg.node.disk_low_water_percent = 80, 50
    busy = w.study("processing", finished=now, job_state="started", n=2, size=10_000)  # 20 %
    undelivered = w.study("done", finished=now - 9000, deliveries=[("pacs", "pending")], n=1, size=10_000)
    oldest = w.study("done", finished=now - 7200, deliveries=[("pacs", "sent")], n=2, size=10_000)
    middle = w.study("done", finished=now - 3600, deliveries=[("pacs", "sent")], n=2, size=10_000)
    newest = w.study("done", finished=now - 60, deliveries=[("pacs", "sent")], n=2, size=10_000)  # 90 % in all
    st = w.lc.run_once(now)
    assert not w.spool_dir(oldest).exists() and not w.spool_dir(middle).exists()  # 90 -> 70 -> 50 %
    for uid in (busy, undelivered, newest):
        assert w.spool_dir(uid).exists()
    assert st["disk_used_percent"] == 50 and st["state"] == "purging" and st["reason"] is None
    assert not w.spool.low_on_space()
    s = w.state.one("SELECT purge_reason FROM study_summaries WHERE study_uid=?", (oldest,))
    assert "above high water 80%" in s["purge_reason"]
    # nothing deletable left and above high water again: "full", and the reason names what holds the space
    w.study("processing", finished=now, job_state="started", n=4, size=10_000)
    w.lc.run_once(now)  # newest goes (the only deletable one), then nothing is left
    assert not w.spool_dir(newest).exists()
    w.study("queued", finished=now, job_state="queued", n=3, size=10_000)
    st = w.lc.run_once(now)
    assert st["state"] == "full" and st["disk_used_percent"] == 100
    assert w.spool.low_on_space() and "answers 0xA700" in w.spool.refusal()  # the SCP refuses now
    assert "no study may be deleted" in st["reason"] and "results not yet delivered" in st["reason"]
    assert "processing" in st["reason"] and "queued" in st["reason"]
    assert w.spool_dir(busy).exists() and w.spool_dir(undelivered).exists()


def test_outbox_goes_once_every_destination_confirmed(world: World) -> None:
    w = world
    now = time.time()
    sent = w.study("done", finished=now, deliveries=[("pacs", "sent")], outbox=True)
    pending = w.study("done", finished=now, deliveries=[("pacs", "sent"), ("pacs", "pending")], outbox=True)
    uncommitted = w.study("done", finished=now, deliveries=[("vna", "sent")], outbox=True)
    committed = w.study("done", finished=now, deliveries=[("vna", "committed")], outbox=True)
    w.lc.run_once(now)
    gone = {uid: not (w.storage / "outbox" / w.job_ids(uid)[0]).exists()
            for uid in (sent, pending, uncommitted, committed)}
    assert gone == {sent: True, pending: False, uncommitted: False, committed: True}
    # the study itself stays for its retention; the job remembers which SR a re-run would supersede
    assert w.spool_dir(sent).exists()
    assert "sr_refs" in json.loads(w.state.one("SELECT summary FROM jobs WHERE study_uid=?", (sent,))["summary"])


def test_outbox_audit_period_keeps_files_past_the_purge(tmp_path: Path) -> None:
    w = World(tmp_path, outbox_audit_hours=1, retention_hours=0)
    now = time.time()
    recent = w.study("done", finished=now - 2 * DAY + 10, deliveries=[("pacs", "sent")], outbox=True)
    w.state.execute("UPDATE deliveries SET sent=? WHERE study_uid=?", (now - 60, recent))
    job = w.job_ids(recent)[0]
    w.lc.run_once(now)  # retention over: instances go, but the outbox is audited for an hour after delivery
    assert not w.spool_dir(recent).exists() and (w.storage / "outbox" / job).is_dir()
    w.lc.run_once(now + 3700)
    assert not (w.storage / "outbox" / job).exists()
    w.state.close()


def test_rerun_after_purge_says_when(world: World) -> None:
    w = world
    now = time.time()
    uid = w.study("done", finished=now - 2 * DAY, deliveries=[("pacs", "sent")])
    w.lc.run_once(now)

    class Jobs:
        cfg = w.cfg

        def publish_pending(self) -> int:
            return 0

    with pytest.raises(StudyPurged) as exc:
        rerun_study(w.state, Jobs(), uid)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(now))
    assert f"instances purged at {when}" in str(exc.value) and "retention 24 h" in str(exc.value)
    # a study that is still here runs again: new jobs, one more generation
    kept = w.study("done", finished=now - 60, deliveries=[("pacs", "sent")])
    created = rerun_study(w.state, Jobs(), kept)
    assert len(created) == 1
    row = w.state.one("SELECT state, generation FROM studies WHERE study_uid=?", (kept,))
    assert row["state"] == "complete"
    assert w.state.one("SELECT state FROM jobs WHERE job_id=?", (created[0],))["state"] == "pending"
