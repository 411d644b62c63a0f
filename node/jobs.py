"""From a complete study to Celery jobs, and from finished jobs back to the state database.

A job is one (study, pipeline, set of instances). The set is hashed, and the hash is unique per
study and pipeline, so a restarted listener, a re-sent study or a repeated completion never runs
the same work twice. Workers report through files under ``storage_dir/results/<job_id>/``
(``started.json``, ``summary.json``, ``failed.json``): the listener only has to look at the disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from node.assembly import CompletionRule
from node.config import Config, RouteConfig
from node.duplicates import replaced_counts
from node.faults import fault_point
from node.lease import expired as lease_expired
from node.lease import redis_client
from node.policy import job_options, job_policy
from node.routing import route
from node.state import State
from node.tasks import JobSpec, send_job

log = logging.getLogger(__name__)

KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # SR storage classes (and KOS, excluded below)
ACTIVE = ("pending", "queued", "started")


def instances_hash(sop_uids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(sop_uids)).encode()).hexdigest()


class JobManager:
    def __init__(self, cfg: Config, state: State, celery_app: Any,
                 on_job_finished: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
                 on_critical_result: Callable[[dict[str, Any], dict[str, Any]], None] | None = None):
        self.cfg = cfg
        self.state = state
        self.app = celery_app
        self.storage = Path(cfg.node.storage_dir).resolve()
        # stable across restarts and workers, different for each node (AE title + storage location)
        self.device_uid = str(generate_uid(entropy_srcs=[cfg.node.ae_title, str(self.storage)]))
        self.on_job_finished = on_job_finished
        self.on_critical_result = on_critical_result
        self._announced: set[str] = set()
        self._routes = {r.name: r for r in cfg.routes}
        self._redis: Any = None
        self._last_lease_check = 0.0
        self._lease_warning = 0.0

    # ------------------------------------------------------------------ routing / completion
    def series_tags(self, study_uid: str) -> list[dict[str, Any]]:
        out = []
        calling = {r["calling_ae"] for r in self.state.query(
            "SELECT DISTINCT calling_ae FROM instances WHERE study_uid=?", (study_uid,))}
        for s in self.state.study_series(study_uid):
            tags = json.loads(s["tags"] or "{}")
            tags.setdefault("Modality", s["modality"])
            tags.setdefault("SOPClassUID", s["sop_class_uid"])
            tags["calling_ae"] = sorted(c for c in calling if c)
            tags["called_ae"] = self.cfg.node.ae_title
            out.append(tags)
        return out

    def routes_for(self, study_uid: str) -> list[RouteConfig]:
        return route(self.cfg.routes, self.series_tags(study_uid)).routes

    def rule_for(self, study: Any) -> CompletionRule:
        r = self._routes.get(study["route"] or "")
        if r is None:
            return CompletionRule()
        return CompletionRule(r.complete_on, r.quiet_seconds, r.max_wait_seconds)

    def complete(self, study_uid: str, reason: str) -> list[str]:
        """Mark complete and create jobs; returns the new job ids (none if nothing new to do)."""
        now = time.time()
        routes = self.routes_for(study_uid)
        instances = self.state.study_instances(study_uid)
        replaced = replaced_counts(self.state, study_uid)  # a replaced instance is new content: run again
        ihash = instances_hash([f"{r['sop_uid']}#{replaced[r['sop_uid']]}" if r["sop_uid"] in replaced
                                else r["sop_uid"] for r in instances])
        created: list[str] = []
        with self.state.tx() as c:
            c.execute("UPDATE studies SET state=?, completed=?, complete_reason=?, route=?,"
                      " generation=generation+1, updated=? WHERE study_uid=?",
                      ("no_route" if not routes else "complete", now, reason,
                       ",".join(r.name for r in routes) or None, now, study_uid))
            gen = c.execute("SELECT generation FROM studies WHERE study_uid=?", (study_uid,)).fetchone()[0]
            for r in routes:
                for p in r.pipelines:
                    job_id = uuid.uuid4().hex
                    n = c.execute(
                        "INSERT OR IGNORE INTO jobs(job_id, study_uid, pipeline, route, generation, instances_hash,"
                        " n_instances, state, priority, created) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (job_id, study_uid, p, r.name, gen, ihash, len(instances), "pending", r.priority, now)).rowcount
                    if n:
                        created.append(job_id)
        if not routes:
            log.info("study %s complete (%s): no route matched", study_uid, reason)
            self.state.event("no_route", "no routing rule matched", study_uid)
        else:
            log.info("study %s complete (%s): %d instances, routes %s, %d new job(s)", study_uid, reason,
                     len(instances), [r.name for r in routes], len(created))
            if not created:
                self._refresh_study(study_uid)
        self.publish_pending()
        return created

    # ------------------------------------------------------------------ publishing
    def _predecessors(self, study_uid: str, pipeline: str, job_id: str) -> list[dict[str, str]]:
        row = self.state.one("SELECT summary FROM jobs WHERE study_uid=? AND pipeline=? AND state='done'"
                             " AND job_id<>? ORDER BY finished DESC LIMIT 1", (study_uid, pipeline, job_id))
        if not row or not row["summary"]:
            return []
        if "sr_refs" in (kept := json.loads(row["summary"])):  # the outbox files are gone (node/lifecycle)
            return list(kept["sr_refs"])
        return sr_references(json.loads(row["summary"]).get("outbox_files", []))

    def spec_for(self, job: Any) -> tuple[JobSpec, str]:
        from pipelines.registry import pipeline_class

        r = self._routes.get(job["route"])
        options = job_options(self.cfg, r, job["pipeline"])
        policy = job_policy(self.cfg, r, job["pipeline"], options)  # decided once, here, for every output
        language = r.language if r else "en"
        sr_class = "comprehensive"
        if r is not None:
            dests = [d for d in self.cfg.destinations if d.name in r.destinations]
            if dests and dests[0].language:
                language = dests[0].language
            if dests and dests[0].sr_class:
                sr_class = dests[0].sr_class
        paths = [row["path"] for row in self.state.study_instances(job["study_uid"])]
        try:
            queue = pipeline_class(job["pipeline"]).device
        except Exception:
            queue = "cpu"
        spec = JobSpec(
            job_id=job["job_id"], study_uid=job["study_uid"], pipeline=job["pipeline"], paths=paths,
            result_dir=str(self.storage / "results" / job["job_id"]),
            outbox_dir=str(self.storage / "outbox" / job["job_id"]),
            options=options, language=language, sr_class=sr_class, encode=bool(r and r.destinations),
            device_uid=self.device_uid, critical=dict(r.critical) if r else {},
            thresholds=dict(r.thresholds) if r else {}, policy=policy.to_dict() if policy else None,
            predecessors=self._predecessors(job["study_uid"], job["pipeline"], job["job_id"]),
            lease_s=float(self.cfg.workers.lease_seconds), min_free_mb=int(self.cfg.node.min_free_disk_mb))
        return spec, queue

    def publish_pending(self) -> int:
        n = 0
        for job in self.state.query("SELECT * FROM jobs WHERE state='pending' ORDER BY priority='stat' DESC, created"):
            spec, queue = self.spec_for(job)
            try:
                send_job(self.app, spec, queue, job["priority"])
            except Exception as exc:  # broker down: stays pending, retried by the scheduler
                log.error("cannot queue job %s: %s", job["job_id"], exc)
                break
            self.state.execute("UPDATE jobs SET state='queued', queue=?, queued=?, celery_id=? WHERE job_id=?",
                               (queue, time.time(), job["job_id"], job["job_id"]))
            self._set_study_state(job["study_uid"], "queued")
            n += 1
        return n

    def recover(self) -> int:
        """After a restart: jobs without a summary are sent again (the task is idempotent per job)."""
        n = 0
        for job in self.state.query("SELECT * FROM jobs WHERE state IN ('queued','started')"):
            if (self.storage / "results" / job["job_id"] / "summary.json").exists():
                continue
            spec, queue = self.spec_for(job)
            send_job(self.app, spec, queue, job["priority"])
            n += 1
        if n:
            log.info("re-queued %d unfinished job(s) after restart", n)
        return n + self.publish_pending()

    def undelivered(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Done jobs with result files but no delivery row: the listener died between marking the job done and
        queueing its results. Recovery queues them (delivery rows are keyed by destination and SOP Instance UID,
        so queueing twice sends once)."""
        try:
            rows = self.state.query("SELECT * FROM jobs j WHERE state='done' AND summary IS NOT NULL AND NOT EXISTS"
                                    " (SELECT 1 FROM deliveries d WHERE d.job_id=j.job_id)")
        except Exception:  # no deliveries table: no destination was ever configured
            return []
        out = []
        for row in rows:
            summary = json.loads(row["summary"])
            files = summary.get("outbox_files") or []
            if files and all(Path(f).exists() for f in files):
                out.append((dict(row), summary))
        return out

    # ------------------------------------------------------------------ monitoring
    def check_leases(self, every: float = 1.0) -> int:
        """Started jobs whose worker stopped renewing its lease (node.lease) are queued again; returns how many."""
        now = time.monotonic()
        if now - self._last_lease_check < every:
            return 0
        self._last_lease_check = now
        running = [j for j in self.state.query("SELECT * FROM jobs WHERE state='started'")
                   if not any((self.storage / "results" / j["job_id"] / f).exists()
                              for f in ("summary.json", "failed.json"))]
        if not running:
            return 0
        try:
            if self._redis is None:
                self._redis = redis_client(str(self.app.conf.broker_url))
            gone = set(lease_expired(self._redis, [j["job_id"] for j in running]))
        except Exception as exc:  # broker down: no news is not bad news
            if now - self._lease_warning > 60:
                self._lease_warning = now
                log.warning("cannot check job leases: %s", exc)
            return 0
        n = 0
        for job in running:
            d = self.storage / "results" / job["job_id"]
            if job["job_id"] not in gone or (d / "summary.json").exists():
                continue
            started = d / "started.json"
            if started.exists():  # keep it for post-mortems; the next attempt writes its own
                started.rename(d / f"started.lost-{int(time.time())}.json")
            spec, queue = self.spec_for(job)
            try:
                send_job(self.app, spec, queue, job["priority"])
            except Exception as exc:
                log.error("cannot re-queue job %s: %s", job["job_id"], exc)
                continue
            self.state.execute("UPDATE jobs SET state='queued', queued=? WHERE job_id=?", (time.time(), job["job_id"]))
            self._set_study_state(job["study_uid"], "queued")
            log.warning("job %s (%s) for study %s: its worker stopped renewing the lease for %.0f s "
                        "(workers.lease_seconds): queued again", job["job_id"], job["pipeline"], job["study_uid"],
                        self.cfg.workers.lease_seconds)
            self.state.event("job_requeued", f"job {job['job_id']}: worker lost, queued again", job["study_uid"])
            n += 1
        return n

    def poll(self) -> int:
        """Fold worker reports on disk into the state database; returns how many jobs finished."""
        self.check_leases()
        finished = 0
        for job in self.state.query("SELECT * FROM jobs WHERE state IN ('queued','started')"):
            d = self.storage / "results" / job["job_id"]
            summary = d / "summary.json"
            failed = d / "failed.json"
            ready = d / "result_ready.json"
            if job["job_id"] not in self._announced and ready.exists():
                self._announced.add(job["job_id"])
                info = json.loads(ready.read_text(encoding="utf-8"))
                if info.get("critical"):
                    self.state.execute("UPDATE studies SET critical=1 WHERE study_uid=?", (job["study_uid"],))
                    if self.on_critical_result:
                        self.on_critical_result({**dict(job), "result_dir": str(d)}, {"finished": info["at"]})
            if summary.exists():
                data = json.loads(summary.read_text(encoding="utf-8"))
                state = {"ok": "done"}.get(data["status"], data["status"])
                if data["status"] == "invalid_output":
                    state = "failed"
                self.state.execute(
                    "UPDATE jobs SET state=?, finished=?, started=COALESCE(started, ?), reason=?, summary=?,"
                    " result_dir=?, error=? WHERE job_id=?",
                    (state, data.get("finished", time.time()), data.get("started"), data.get("reason") or None,
                     json.dumps(data), str(d), data.get("reason") if state == "failed" else None, job["job_id"]))
                if data.get("critical"):
                    self.state.execute("UPDATE studies SET critical=1 WHERE study_uid=?", (job["study_uid"],))
                log.info("job %s (%s) for study %s: %s%s", job["job_id"], job["pipeline"], job["study_uid"],
                         state, f" ({data.get('reason')})" if data.get("reason") else "")
                self._refresh_study(job["study_uid"])
                finished += 1
                fault_point("after_job_done")  # crash window: done, results not yet queued (see undelivered())
                if self.on_job_finished:
                    row = self.state.one("SELECT * FROM jobs WHERE job_id=?", (job["job_id"],))
                    self.on_job_finished(dict(row), data)
            elif failed.exists():
                data = json.loads(failed.read_text(encoding="utf-8"))
                self.state.execute("UPDATE jobs SET state='failed', finished=?, error=?, attempts=? WHERE job_id=?",
                                   (data.get("at", time.time()), data.get("error"), data.get("attempts"),
                                    job["job_id"]))
                log.error("job %s (%s) for study %s failed: %s", job["job_id"], job["pipeline"], job["study_uid"],
                          data.get("error"))
                self._refresh_study(job["study_uid"])
                finished += 1
            elif job["state"] == "queued" and (d / "started.json").exists():
                st = json.loads((d / "started.json").read_text(encoding="utf-8"))
                self.state.execute("UPDATE jobs SET state='started', started=?, attempts=? WHERE job_id=?",
                                   (st.get("at"), st.get("attempt", 1), job["job_id"]))
                self._set_study_state(job["study_uid"], "processing")
        return finished

    def _set_study_state(self, study_uid: str, state: str) -> None:
        self.state.execute("UPDATE studies SET state=?, updated=? WHERE study_uid=? AND state<>'receiving'",
                           (state, time.time(), study_uid))

    def _refresh_study(self, study_uid: str) -> None:
        """Study state follows its current generation's jobs."""
        row = self.state.one("SELECT generation, state FROM studies WHERE study_uid=?", (study_uid,))
        if row is None or row["state"] == "receiving":
            return
        jobs = self.state.query("SELECT state FROM jobs WHERE study_uid=? AND generation=?",
                                (study_uid, row["generation"]))
        states = {j["state"] for j in jobs}
        if not jobs:
            # every job of this set of instances already existed: the study is as it was
            prev = self.state.query("SELECT state FROM jobs WHERE study_uid=?", (study_uid,))
            states = {j["state"] for j in prev}
        if states & set(ACTIVE):
            new = "processing" if "started" in states else "queued"
        elif "failed" in states:
            new = "failed"
        elif states and states <= {"refused", "model_unavailable"}:
            new = "refused"
        else:
            new = "done"
        self._set_study_state(study_uid, new)


def sr_references(files: list[str]) -> list[dict[str, str]]:
    """The SR objects among a job's results, as a later job needs them to say which report it replaces."""
    import pydicom

    refs = []
    for f in files:
        try:
            h = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:
            continue
        if str(h.SOPClassUID).startswith(SR_CLASS_PREFIX) and str(h.SOPClassUID) != KOS_CLASS:
            refs.append({"study_uid": str(h.StudyInstanceUID), "series_uid": str(h.SeriesInstanceUID),
                         "sop_instance_uid": str(h.SOPInstanceUID), "sop_class_uid": str(h.SOPClassUID)})
    return refs
