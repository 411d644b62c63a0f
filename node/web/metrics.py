"""Prometheus metrics with ``prometheus_client``: counters and histograms of what happened since the
listener started, gauges of what is there now.

Why derived from the state database: every stage (SCP threads, scheduler, delivery, notifier) already
records its transitions there with timestamps, durably. A tracker reads rows that changed since its last
pass (a look-back window plus a set of keys already counted, so a row committed late is still counted,
and none twice) and feeds counters and histograms. Receiving, routing and delivery code stay free of
metrics calls; only association refusals, which leave no row, are counted at the SCP's policy hook.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from node.service import Listener

log = logging.getLogger(__name__)

WINDOW_S = 120.0  # rows are looked for this far back; must exceed the longest commit delay
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# the tracker and the dashboard look rows up by time: without these every pass would scan whole tables
INDEXES = """
CREATE INDEX IF NOT EXISTS instances_received ON instances(received);
CREATE INDEX IF NOT EXISTS studies_first_received ON studies(first_received);
CREATE INDEX IF NOT EXISTS studies_completed ON studies(completed);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished);
CREATE INDEX IF NOT EXISTS associations_started ON associations(started);
"""
DELIVERY_INDEXES = """
CREATE INDEX IF NOT EXISTS deliveries_sent ON deliveries(sent);
CREATE INDEX IF NOT EXISTS deliveries_last_attempt ON deliveries(last_attempt);
"""


def _tables(listener: Listener) -> set[str]:
    return {r["name"] for r in listener.state.query("SELECT name FROM sqlite_master WHERE type='table'")}


class _StateGauges:
    """Gauges computed at scrape time from the state database and the disk."""

    def __init__(self, listener: Listener):
        self.listener = listener

    def describe(self) -> list[Any]:
        return []  # no eager collection at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        st = self.listener.state
        tables = _tables(self.listener)
        g = GaugeMetricFamily("ainode_studies", "Studies by state.", labels=["state"])
        for r in st.query("SELECT state, COUNT(*) n FROM studies GROUP BY state"):
            g.add_metric([r["state"]], r["n"])
        yield g
        g = GaugeMetricFamily("ainode_jobs", "Jobs by pipeline and state.", labels=["pipeline", "state"])
        for r in st.query("SELECT pipeline, state, COUNT(*) n FROM jobs GROUP BY pipeline, state"):
            g.add_metric([r["pipeline"], r["state"]], r["n"])
        yield g
        g = GaugeMetricFamily("ainode_queue_depth", "Jobs waiting for a worker (pending or queued), per queue.",
                              labels=["queue"])
        depth = {"cpu": 0, "gpu": 0}
        for r in st.query("SELECT COALESCE(queue, 'unassigned') q, COUNT(*) n FROM jobs"
                          " WHERE state IN ('pending','queued') GROUP BY q"):
            depth[r["q"]] = r["n"]
        for q, n in sorted(depth.items()):
            g.add_metric([q], n)
        yield g
        running = st.one("SELECT COUNT(*) n FROM jobs WHERE state='started'")
        yield GaugeMetricFamily("ainode_jobs_running", "Jobs a worker is running now.", value=running["n"])
        n = st.one("SELECT COUNT(*) n, COALESCE(SUM(size),0) b FROM instances")
        yield GaugeMetricFamily("ainode_instances_stored", "Instances in the spool.", value=n["n"])
        yield GaugeMetricFamily("ainode_spool_bytes", "Bytes of instances in the spool.", value=n["b"])
        g = GaugeMetricFamily("ainode_deliveries", "Result deliveries by destination and state.",
                              labels=["destination", "state"])
        if "deliveries" in tables:
            for r in st.query("SELECT destination, state, COUNT(*) n FROM deliveries GROUP BY destination, state"):
                g.add_metric([r["destination"], r["state"]], r["n"])
        yield g
        g = GaugeMetricFamily("ainode_notifications", "Critical-finding notifications by channel and state.",
                              labels=["channel", "state"])
        if "notify_deliveries" in tables:
            for r in st.query("SELECT channel, state, COUNT(*) n FROM notify_deliveries GROUP BY channel, state"):
                g.add_metric([r["channel"], r["state"]], r["n"])
        yield g
        g = GaugeMetricFamily("ainode_critical_findings",
                              "Findings flagged critical by finished jobs, by pipeline and finding.",
                              labels=["pipeline", "finding"])
        for r in st.query("SELECT j.pipeline, json_extract(f.value, '$.label') AS finding, COUNT(*) n FROM jobs j,"
                          " json_each(j.summary, '$.findings') f WHERE j.summary IS NOT NULL"
                          " AND json_extract(f.value, '$.critical') AND json_extract(f.value, '$.present')"
                          " GROUP BY j.pipeline, finding"):
            g.add_metric([str(r["pipeline"]), str(r["finding"])], r["n"])
        yield g
        du = shutil.disk_usage(self.listener.spool.root)
        yield GaugeMetricFamily("ainode_disk_free_bytes", "Free bytes on the storage volume.", value=du.free)
        yield GaugeMetricFamily("ainode_disk_total_bytes", "Size of the storage volume.", value=du.total)


class NodeMetrics:
    def __init__(self, listener: Listener, poll_s: float = 2.0):
        self.listener = listener
        self.poll_s = poll_s
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.instances = Counter("ainode_instances_received", "Instances received and stored.", registry=r)
        self.studies = Counter("ainode_studies_received", "Studies whose first instance arrived.", registry=r)
        self.bytes = Counter("ainode_bytes_received", "Bytes of instances received and stored.", registry=r)
        self.associations = Counter("ainode_associations", "Associations by outcome (accepted, or the reason "
                                    "for rejecting).", ["outcome"], registry=r)
        self.jobs = Counter("ainode_jobs_finished", "Jobs finished, by pipeline and outcome.",
                            ["pipeline", "outcome"], registry=r)
        self.deliveries = Counter("ainode_deliveries_finished", "Result objects delivered or given up, by "
                                  "destination and outcome.", ["destination", "outcome"], registry=r)
        self.notifications = Counter("ainode_notifications_finished", "Notifications sent or given up, by "
                                     "channel and outcome.", ["channel", "outcome"], registry=r)
        self.stage = Histogram("ainode_stage_seconds", "Latency per stage: receive_to_complete (first instance "
                               "to study complete), complete_to_result, result_to_delivered, end_to_end (first "
                               "instance to result delivered).", ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.inference = Histogram("ainode_inference_seconds", "Time a worker spent running a pipeline's "
                                   "model(s) on one study.", ["pipeline"], buckets=STAGE_BUCKETS, registry=r)
        for outcome in ("accepted", "called_ae", "calling_ae"):
            self.associations.labels(outcome)
        for s in ("receive_to_complete", "complete_to_result", "result_to_delivered", "end_to_end"):
            self.stage.labels(s)
        r.register(_StateGauges(listener))  # type: ignore[arg-type]
        listener.state.ensure_schema(INDEXES)
        if "deliveries" in _tables(listener):
            listener.state.ensure_schema(DELIVERY_INDEXES)
        self._seen: dict[str, dict[Any, float]] = {}
        self._since = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ hooks
    def instrument_scp(self) -> None:
        """Count refused associations (they leave no row) by wrapping the SCP's policy decision."""
        scp = self.listener.scp
        original = scp.policy

        def policy(assoc: Any) -> Any:
            decision = original(assoc)
            if decision is not None:
                reason = {3: "calling_ae", 7: "called_ae"}.get(decision[2], f"reason_{decision[2]}")
                self.associations.labels(reason).inc()
            return decision

        scp.policy = policy  # type: ignore[method-assign]

    # ------------------------------------------------------------------ tracking
    def _fresh(self, name: str, rows: list[Any], key: str, ts: str) -> Iterator[Any]:
        seen = self._seen.setdefault(name, {})
        for row in rows:
            k = row[key]
            if k in seen or row[ts] is None or row[ts] < self._since:
                continue
            seen[k] = row[ts]
            yield row
        cutoff = time.time() - 2 * WINDOW_S
        for k in [k for k, t in seen.items() if t < cutoff]:
            del seen[k]

    def update(self) -> None:
        with self._lock:
            try:
                self._update()
            except Exception:
                log.exception("metrics update failed")

    def _update(self) -> None:
        st = self.listener.state
        since = max(self._since, time.time() - WINDOW_S)
        tables = _tables(self.listener)
        for r in self._fresh("inst", st.query("SELECT sop_uid, size, received FROM instances WHERE received>=?",
                                              (since,)), "sop_uid", "received"):
            self.instances.inc()
            self.bytes.inc(r["size"] or 0)
        for _ in self._fresh("study", st.query("SELECT study_uid, first_received FROM studies WHERE first_received>=?",
                                               (since,)), "study_uid", "first_received"):
            self.studies.inc()
        for _ in self._fresh("assoc", st.query("SELECT assoc_id, started FROM associations WHERE started>=?",
                                               (since,)), "assoc_id", "started"):
            self.associations.labels("accepted").inc()
        for r in self._fresh("complete", st.query(
                "SELECT study_uid || ':' || generation k, completed, first_received FROM studies WHERE completed>=?",
                (since,)), "k", "completed"):
            self.stage.labels("receive_to_complete").observe(max(0.0, r["completed"] - r["first_received"]))
        for r in self._fresh("jobs", st.query(
                "SELECT j.job_id, j.pipeline, j.state, j.finished, j.summary, s.completed FROM jobs j"
                " JOIN studies s USING(study_uid) WHERE j.finished>=?", (since,)), "job_id", "finished"):
            self.jobs.labels(r["pipeline"], r["state"]).inc()
            if r["completed"]:
                self.stage.labels("complete_to_result").observe(max(0.0, r["finished"] - r["completed"]))
            try:
                run = json.loads(r["summary"] or "{}").get("run_seconds")
            except ValueError:
                run = None
            if run is not None:
                self.inference.labels(r["pipeline"]).observe(float(run))
        if "deliveries" in tables:
            for r in self._fresh("sent", st.query(
                    "SELECT d.id, d.destination, d.sent, j.finished, s.first_received FROM deliveries d"
                    " LEFT JOIN jobs j USING(job_id) LEFT JOIN studies s ON s.study_uid=d.study_uid"
                    " WHERE d.sent>=?", (since,)), "id", "sent"):
                self.deliveries.labels(r["destination"], "sent").inc()
                if r["finished"]:
                    self.stage.labels("result_to_delivered").observe(max(0.0, r["sent"] - r["finished"]))
                if r["first_received"]:
                    self.stage.labels("end_to_end").observe(max(0.0, r["sent"] - r["first_received"]))
            for r in self._fresh("gaveup", st.query(
                    "SELECT id || ':' || state k, destination, state, last_attempt FROM deliveries"
                    " WHERE state IN ('failed-permanent','dead-letter') AND last_attempt>=?", (since,)),
                    "k", "last_attempt"):
                self.deliveries.labels(r["destination"], r["state"]).inc()
        if "notify_deliveries" in tables:
            for r in self._fresh("notify", st.query(
                    "SELECT event_id || ':' || channel || ':' || state k, channel, state, last_attempt"
                    " FROM notify_deliveries WHERE state<>'pending' AND last_attempt>=?", (since,)),
                    "k", "last_attempt"):
                self.notifications.labels(r["channel"], r["state"]).inc()

    def exposition(self) -> bytes:
        self.update()
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.instrument_scp()
        self._thread = threading.Thread(target=self._loop, name="ainode-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.update()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
