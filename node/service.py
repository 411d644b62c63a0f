"""The listener process: SCP, state database, study assembly, job bookkeeping, delivery.

It is the only process that opens the state database. One scheduler thread does the periodic
work (completion rules, worker reports, retention); the SCP threads only store and index. Its tick
(50 ms) is how late, at most, a finished result or a critical finding is noticed; one pass costs a
few small indexed queries and file stats, well under a millisecond.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pydicom

from node.assembly import completion_reason
from node.config import Config
from node.jobs import JobManager
from node.routing import keywords_used
from node.scp import SERIES_KEYWORDS, InstanceEvent, StorageSCP, expected_count, series_tags
from node.spool import Spool
from node.state import State
from node.tasks import make_app

log = logging.getLogger(__name__)


class Listener:
    def __init__(self, cfg: Config, broker_url: str, tick: float = 0.05):
        self.cfg = cfg
        self.storage = Path(cfg.node.storage_dir).resolve()
        self.state = State(self.storage)
        self.spool = Spool(self.storage, cfg.node.min_free_disk_mb)
        self.app = make_app(broker_url, task_time_limit=cfg.workers.task_time_limit_s,
                            max_retries=cfg.workers.max_retries)
        self.delivery: Any = None
        self.notifier: Any = None
        self.jobs = JobManager(cfg, self.state, self.app, on_job_finished=self._job_finished,
                               on_critical_result=self._critical_result)
        self.scp = StorageSCP(cfg, self.state, self.spool, on_instance=self._on_instance,
                              on_association_end=self._on_association_end,
                              route_keywords=keywords_used(cfg.routes) - {"calling_ae", "called_ae"})
        from node.lifecycle import Lifecycle

        self.lifecycle = Lifecycle(cfg, self.state, self.spool, self.storage, scp=self.scp, jobs=self.jobs)
        self.tick = tick
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_housekeeping = 0.0
        self._reload_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.recover()
        self.spool.start()
        self._start_delivery()
        self._queue_undelivered()
        self._start_notifier()
        self.scp.start()
        self._thread = threading.Thread(target=self._loop, name="ainode-scheduler", daemon=True)
        self._thread.start()
        self.lifecycle.start()

    def stop(self) -> None:
        self.scp.stop()
        self.spool.stop()
        self._stop.set()
        self._wake.set()
        self.lifecycle.stop()
        if self._thread:
            self._thread.join(10)
        if self.delivery is not None:
            self.delivery.stop()
        if self.notifier is not None:
            self.notifier.stop()
        self.state.close()

    def reload(self, cfg: Config) -> list[str]:
        """Use ``cfg`` for new associations and new work (see node.reload); returns keys needing a restart."""
        from node.reload import apply

        with self._reload_lock:
            return apply(self, cfg)

    def _start_delivery(self) -> None:
        if not self.cfg.destinations:
            return
        from node.delivery import BackoffPolicy, DeliveryService

        d = self.cfg.delivery
        self.delivery = DeliveryService(self.state, self.cfg.destinations, self.storage, self.cfg.node.ae_title,
                                        backoff=BackoffPolicy(d.retry_base_seconds, d.retry_max_delay_seconds),
                                        poll_interval_s=d.poll_seconds)
        self.delivery.start()

    def _start_notifier(self) -> None:
        if not (self.cfg.notify.enabled and self.cfg.notify.channels):
            return
        from node.notify import Notifier

        self.notifier = Notifier(self.state, self.cfg.notify)
        self.notifier.start()

    def recover(self) -> None:
        """Make the state database agree with the spool after any kind of stop."""
        linked, removed = self.spool.recover_incoming()
        closed = self.state.close_open_associations()
        indexed = self.reconcile_spool()
        # senders could not reach us while we were down: quiet timers start again from now
        self.state.execute("UPDATE studies SET last_received=? WHERE state='receiving'", (time.time(),))
        if linked or removed or closed or indexed:
            log.info("recovery: %d flushed instance(s) re-linked, %d partial file(s) removed, %d association(s)"
                     " closed, %d instance(s) re-indexed", linked, removed, closed, indexed)
        try:
            self.jobs.recover()
        except Exception as exc:
            log.error("could not re-queue jobs (broker unreachable?): %s", exc)

    def _queue_undelivered(self) -> None:
        """Results of jobs finished just before a crash, never queued for delivery (issue 10, item 7)."""
        if self.delivery is None:
            return
        for job, summary in self.jobs.undelivered():
            log.info("recovery: queueing the results of finished job %s for delivery", job["job_id"])
            self._job_finished(job, summary)

    def reconcile_spool(self) -> int:
        known = {r["path"] for r in self.state.query("SELECT path FROM instances")}
        n = 0
        for path in self.spool.iter_instances():
            if str(path) in known:
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                if self.state.one("SELECT 1 FROM instances WHERE sop_uid=?", (str(ds.SOPInstanceUID),)):
                    # the UID is indexed under another study or series (written by a version before
                    # node.duplicates): set aside for IT staff, out of the spool, never processed as this study
                    aside = self.storage / "quarantine" / path.relative_to(self.spool.root)
                    aside.parent.mkdir(parents=True, exist_ok=True)
                    path.rename(aside)
                    log.warning("spool file %s reuses a SOP Instance UID stored elsewhere: moved to %s", path, aside)
                    continue
                self.state.record_instance(
                    study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
                    sop_uid=str(ds.SOPInstanceUID), path=str(path), size=path.stat().st_size,
                    calling_ae="", assoc_id="recovered", modality=str(ds.get("Modality", "")),
                    sop_class_uid=str(ds.SOPClassUID), expected=expected_count(ds),
                    series_tags=series_tags(ds, set(SERIES_KEYWORDS)))
                n += 1
            except Exception as exc:
                log.warning("spool file %s cannot be indexed: %s", path.name, exc)
        return n

    # ------------------------------------------------------------------ events from the SCP
    def _on_instance(self, ev: InstanceEvent) -> None:
        if ev.new_series:
            routes = self.jobs.routes_for(ev.study_uid)
            self.state.execute("UPDATE studies SET route=? WHERE study_uid=?",
                               (",".join(r.name for r in routes) or None, ev.study_uid))

    def _on_association_end(self, studies: list[str]) -> None:
        if studies:
            self._wake.set()

    def _job_finished(self, job: dict[str, Any], summary: dict[str, Any]) -> None:
        files = summary.get("outbox_files") or []
        route = next((r for r in self.cfg.routes if r.name == job["route"]), None)
        if files and route and route.destinations and self.delivery is not None:
            self.delivery.enqueue(job["study_uid"], job["job_id"], [Path(f) for f in files], route.destinations,
                                  "stat" if summary.get("critical") else job["priority"])
        if summary.get("critical"):
            self._critical_result(job, summary)

    def _critical_result(self, job: dict[str, Any], info: dict[str, Any]) -> None:
        """Called as soon as the result exists, and again when the job ends: events are de-duplicated."""
        if self.notifier is not None:
            self.notifier.notify_job(job, info)

    # ------------------------------------------------------------------ scheduler
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.tick)
            self._wake.clear()
            try:
                self.check_completion()
                self.jobs.poll()
                self.lifecycle.on_tick()
                if time.time() - self._last_housekeeping > self.cfg.node.housekeeping_seconds:
                    self._last_housekeeping = time.time()
                    self.jobs.publish_pending()
                    self.housekeeping()
            except Exception:
                log.exception("scheduler error")

    def check_completion(self) -> list[str]:
        now = time.time()
        done = []
        for study in self.state.query("SELECT * FROM studies WHERE state='receiving'"):
            series = self.state.study_series(study["study_uid"])
            reason = completion_reason(study, series, self.state.released_by_senders(study["study_uid"]),
                                       self.jobs.rule_for(study), now)
            if reason:
                self.jobs.complete(study["study_uid"], reason)
                done.append(study["study_uid"])
        return done

    def housekeeping(self) -> None:
        """Retention, outbox clean-up and the state database are the storage lifecycle's (node/lifecycle),
        which runs on a thread of its own; this only nudges it."""
        self.lifecycle.wake()
