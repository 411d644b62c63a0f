"""The Notifier: each (event, channel) a row that survives restarts, retried until sent or failed."""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import hl7
import requests

from node.notify.config import HL7Channel, NotifyConfig, WebhookChannel
from node.notify.events import CriticalEvent, events_from_result
from node.notify.hl7v2 import build_oru, mllp_exchange
from node.notify.webhook import sign, webhook_body
from node.state import State
from pipelines.base import PipelineResult

log = logging.getLogger("node.notify")


SCHEMA = """
CREATE TABLE IF NOT EXISTS notify_events (
    event_id TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    finding TEXT,
    payload TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS notify_events_study ON notify_events(study_uid);
CREATE TABLE IF NOT EXISTS notify_deliveries (
    event_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL,
    last_error TEXT,
    control_id TEXT,
    created REAL NOT NULL,
    last_attempt REAL,
    sent_at REAL,
    latency_s REAL,
    PRIMARY KEY (event_id, channel)
);
CREATE INDEX IF NOT EXISTS notify_deliveries_due ON notify_deliveries(state, next_attempt);
"""

#: Shown in the HL7 message (and the webhook) so nobody mistakes a draft for a signed report.


class DeliveryError(Exception):
    """A failed attempt; ``permanent`` ones are not retried."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass
class Due:
    event_id: str
    channel: str
    attempts: int
    control_id: str
    payload: str
    created: float


class Notifier:
    """Records critical events and delivers them to every configured channel, retrying until sent or given up.

    ``notify`` only writes rows and wakes the delivery thread, so the listener's result handling never
    waits on a slow RIS. ``run_once`` is the whole delivery step, callable directly in tests.
    """

    def __init__(self, state: State, channels: list[WebhookChannel | HL7Channel] | NotifyConfig, *,
                 poll_interval_s: float | None = None, max_workers: int | None = None,
                 rng: random.Random | None = None):
        cfg = channels if isinstance(channels, NotifyConfig) else NotifyConfig(channels=list(channels))
        self.enabled = cfg.enabled
        self.per_job = cfg.dedupe == "job"
        self.channels = {c.name: c for c in cfg.channels}
        self.poll_interval_s = poll_interval_s if poll_interval_s is not None else cfg.poll_interval_s
        self.state = state
        self.state.ensure_schema(SCHEMA)
        # Only the listener owns this database: anything 'sending' now was cut off by a crash.
        self.state.execute("UPDATE notify_deliveries SET state='pending' WHERE state='sending'")
        self._rng = rng or random.Random()
        # enough threads that every channel can have a couple of hung attempts without starving the others
        workers = max_workers or max(4, 2 * len(self.channels))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="notify")
        self._stopped = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._run_lock = threading.Lock()

    # ------------------------------------------------------------------ recording
    def record(self, event: CriticalEvent) -> str:
        """Write the event and one pending delivery per enabled channel; returns the event id. Idempotent."""
        event_id = event.key(self.per_job)
        now = time.time()
        with self.state.tx() as c:
            new = c.execute("INSERT OR IGNORE INTO notify_events(event_id, study_uid, finding, payload, created)"
                            " VALUES (?,?,?,?,?)",
                            (event_id, event.study_uid, event.finding, event.to_json(), now)).rowcount == 1
            if not new:
                return event_id
            for ch in self.channels.values():
                skip = None
                if not (self.enabled and ch.enabled):
                    skip = "channel disabled"
                elif event.unverified and not ch.include_unverified:
                    skip = "unverified model; channel has include_unverified: false"
                c.execute("INSERT OR IGNORE INTO notify_deliveries(event_id, channel, kind, state, next_attempt,"
                          " last_error, control_id, created) VALUES (?,?,?,?,?,?,?,?)",
                          (event_id, ch.name, ch.kind, "skipped" if skip else "pending", now, skip,
                           hl7.generate_message_control_id(), now))
        log.info("critical event %s recorded: study %s, finding %r, %d channel(s)", event_id, event.study_uid,
                 event.finding, len(self.channels))
        return event_id

    def notify_job(self, job: Mapping[str, Any], summary: Mapping[str, Any]) -> list[str]:
        """Listener hook for a finished job whose summary says critical: load its result, build events, notify.

        Study facts come from the state database and one spooled header (patient ID/name are read here,
        in the listener, and go only to HL7 channels). Returns the event ids (empty when nothing is critical).
        """

        study_uid = str(job["study_uid"])
        result_dir = job.get("result_dir") or summary.get("result_dir")
        try:
            if not result_dir:
                raise ValueError("the job has no result directory")
            result = PipelineResult.load(result_dir)
            tags = self.study_tags(study_uid)
            row = self.state.one("SELECT first_received, completed FROM studies WHERE study_uid=?", (study_uid,))
            times = {"received": row["first_received"] if row else None,
                     "completed": row["completed"] if row else None,
                     "detected": summary.get("finished") or time.time(), "job_id": job.get("job_id") or ""}
            return [self.notify(e) for e in events_from_result(result, tags, times)]
        except Exception as exc:  # never break the caller's job bookkeeping; say loudly that nobody was told
            log.exception("critical result of job %s (study %s) could not be notified", job.get("job_id"), study_uid)
            self.state.event("notify_failed", f"job {job.get('job_id')}: {type(exc).__name__}: {exc}", study_uid)
            return []

    def study_tags(self, study_uid: str) -> dict[str, Any]:
        """Study and patient attributes from the first spooled instance, plus the study's series UIDs."""
        import pydicom

        tags: dict[str, Any] = {"StudyInstanceUID": study_uid,
                                "SeriesInstanceUIDs": [r["series_uid"] for r in self.state.study_series(study_uid)]}
        for inst in self.state.study_instances(study_uid)[:3]:
            try:
                ds = pydicom.dcmread(inst["path"], stop_before_pixels=True)
            except Exception as exc:  # a vanished or unreadable file: try the next one
                log.debug("cannot read %s for notification tags: %s", inst["path"], exc)
                continue
            for kw in ("AccessionNumber", "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                       "IssuerOfPatientID", "StudyDate", "StudyTime"):
                value = ds.get(kw)
                if value not in (None, ""):
                    tags[kw] = str(value)
            break
        return tags

    def notify(self, event: CriticalEvent) -> str:
        """Record and start delivering in the background; returns at once with the event id."""
        event_id = self.record(event)
        if self._thread is not None and self._thread.is_alive():
            self._wake.set()
        else:
            threading.Thread(target=self._run_quietly, name="notify-once", daemon=True).start()
        return event_id

    # ------------------------------------------------------------------ delivery loop
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="notifier", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._stopped = True
        self._pool.shutdown(wait=True, cancel_futures=False)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_quietly()
            wait = self.poll_interval_s
            try:
                row = self.state.one("SELECT MIN(next_attempt) AS t FROM notify_deliveries WHERE state='pending'")
                if row is not None and row["t"] is not None:
                    wait = max(0.01, min(wait, row["t"] - time.time()))
            except Exception as exc:  # database closed under us during shutdown
                log.debug("notifier loop: %s", exc)
            self._wake.wait(wait)
            self._wake.clear()

    def _run_quietly(self) -> None:
        try:
            self.run_once(wait=False)
        except Exception:  # the loop must survive a bad row or a closed database during shutdown
            log.exception("notification delivery pass failed")

    def run_once(self, wait: bool = True) -> int:
        """Start every due delivery (channels in parallel); returns how many were started.

        ``wait=False`` (the background loop) returns once they are handed to the pool, so a RIS that hangs
        until its timeout never delays the next event's webhook; ``wait=True`` (tests, tools) waits for them.
        """
        if self._stopped:
            return 0
        with self._run_lock:
            now = time.time()
            rows = self.state.query(
                "SELECT d.event_id, d.channel, d.attempts, d.control_id, e.payload, e.created AS ev_created"
                " FROM notify_deliveries d JOIN notify_events e USING(event_id)"
                " WHERE d.state='pending' AND d.next_attempt<=? ORDER BY d.next_attempt", (now,))
            futures = []
            for r in rows:
                if self.state.execute("UPDATE notify_deliveries SET state='sending' WHERE event_id=? AND channel=?"
                                      " AND state='pending'", (r["event_id"], r["channel"])) != 1:
                    continue  # another pass took it
                due = Due(r["event_id"], r["channel"], r["attempts"], r["control_id"], r["payload"], r["ev_created"])
                try:
                    futures.append(self._pool.submit(self._attempt, due))
                except RuntimeError:  # pool shut down (stopping): leave it for the next start
                    self.state.execute("UPDATE notify_deliveries SET state='pending' WHERE event_id=? AND channel=?",
                                       (due.event_id, due.channel))
        if wait:
            for f in futures:
                f.result()
        return len(futures)

    def _attempt(self, due: Due) -> None:
        attempt = due.attempts + 1
        started = time.time()
        channel = self.channels.get(due.channel)
        event = CriticalEvent.from_json(due.payload)
        error: str | None = None
        permanent = False
        try:
            if channel is None:
                raise DeliveryError(f"channel {due.channel!r} is no longer configured", permanent=True)
            if isinstance(channel, WebhookChannel):
                self._send_webhook(channel, event, due.event_id, attempt)
            else:
                self._send_hl7(channel, event, due.control_id)
        except DeliveryError as exc:
            error, permanent = str(exc), exc.permanent
        except (OSError, requests.RequestException, hl7.ParseException, RuntimeError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a bug must not leave the row stuck in 'sending'
            log.exception("unexpected error delivering %s to %s", due.event_id, due.channel)
            error = f"{type(exc).__name__}: {exc}"
        now = time.time()
        if error is None:
            latency = now - event.completed_at
            self.state.execute("UPDATE notify_deliveries SET state='sent', attempts=?, last_attempt=?, sent_at=?,"
                               " latency_s=?, last_error=NULL WHERE event_id=? AND channel=?",
                               (attempt, started, now, latency, due.event_id, due.channel))
            log.info("critical event %s sent via %s (attempt %d, %.2f s after study complete)", due.event_id,
                     due.channel, attempt, latency)
            self.state.event("notify_sent", f"{due.event_id} via {due.channel} after {latency:.2f} s", event.study_uid)
            return
        give_up = permanent or channel is None or attempt >= channel.max_attempts or \
            now - due.created >= channel.max_hours * 3600
        if give_up:
            self.state.execute("UPDATE notify_deliveries SET state='failed', attempts=?, last_attempt=?, last_error=?"
                               " WHERE event_id=? AND channel=?", (attempt, started, error, due.event_id, due.channel))
            log.error("critical event %s (study %s) NOT delivered via %s after %d attempt(s): %s", due.event_id,
                      event.study_uid, due.channel, attempt, error)
            self.state.event("notify_failed", f"{due.event_id} via {due.channel}: {error}", event.study_uid)
            return
        delay = self.backoff(channel, attempt)
        self.state.execute("UPDATE notify_deliveries SET state='pending', attempts=?, last_attempt=?, last_error=?,"
                           " next_attempt=? WHERE event_id=? AND channel=?",
                           (attempt, started, error, now + delay, due.event_id, due.channel))
        log.warning("critical event %s via %s: attempt %d failed (%s); retrying in %.1f s", due.event_id,
                    due.channel, attempt, error, delay)
        self._wake.set()  # the loop may be sleeping past this retry's due time

    def backoff(self, channel: WebhookChannel | HL7Channel, attempt: int) -> float:
        """Delay before attempt ``attempt + 1``: base·2^(attempt-1), capped, minus up to ``jitter`` of it."""
        delay = min(channel.backoff_max_s, channel.backoff_base_s * 2 ** (attempt - 1))
        return delay * (1 - channel.jitter * self._rng.random())

    # ------------------------------------------------------------------ channels
    def _send_webhook(self, ch: WebhookChannel, event: CriticalEvent, event_id: str, attempt: int) -> None:
        sent_at = time.time()
        body = webhook_body(event, event_id, attempt, sent_at)
        headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "ainode-notify",
                   "X-AINode-Event": "critical_finding", "X-AINode-Event-Id": event_id,
                   "X-AINode-Timestamp": str(int(sent_at)), **ch.headers}
        secret = ch.resolved_secret()
        if secret:
            headers["X-AINode-Signature"] = sign(body, secret)
        verify: bool | str = str(ch.ca_file) if ch.ca_file and ch.verify_tls else ch.verify_tls
        resp = requests.post(ch.url, data=body, headers=headers, timeout=ch.timeout_s, verify=verify,
                             allow_redirects=False)
        if not 200 <= resp.status_code < 300:
            raise DeliveryError(f"HTTP {resp.status_code}: {resp.text[:200].strip()}")

    def _send_hl7(self, ch: HL7Channel, event: CriticalEvent, control_id: str) -> None:
        msg = build_oru(event, ch, control_id)
        raw = mllp_exchange(ch.host, ch.port, str(msg).encode(ch.encoding), ch.timeout_s, ch.ssl_context())
        try:
            ack = hl7.parse(raw.decode(ch.encoding, errors="replace").strip("\r\n"))
            msa = ack.segment("MSA")
        except (hl7.ParseException, KeyError, IndexError) as exc:
            raise DeliveryError(f"unreadable ACK: {raw[:120]!r}") from exc
        code = str(msa(1)).upper()
        acked_id = str(msa(2))
        text = str(msa(3)) if len(msa) > 3 else ""
        if acked_id and acked_id != control_id:
            raise DeliveryError(f"ACK for control id {acked_id!r}, expected {control_id!r}")
        if code in ("AA", "CA"):
            return
        if code in ("AR", "CR"):
            raise DeliveryError(f"rejected ({code}) {text}".strip(), permanent=not ch.retry_on_reject)
        raise DeliveryError(f"negative ACK ({code}) {text}".strip())

    # ------------------------------------------------------------------ status
    def log(self, study_uid: str | None = None) -> list[dict[str, Any]]:
        """Delivery log rows (newest first), for the status page; no patient data."""
        return notification_log(self.state, study_uid)

    def counts(self) -> dict[str, int]:
        """Deliveries per state, for /metrics."""
        return {r["state"]: r["n"] for r in
                self.state.query("SELECT state, COUNT(*) AS n FROM notify_deliveries GROUP BY state")}


_LOG_COLUMNS = ("event_id", "study_uid", "finding", "channel", "kind", "state", "attempts", "last_error", "control_id",
                "created", "last_attempt", "next_attempt", "sent_at", "latency_s")


def notification_log(db: State | sqlite3.Connection, study_uid: str | None = None) -> list[dict[str, Any]]:
    """Read-only delivery log for other processes (``ainode status``), which must not construct a Notifier:
    its constructor re-queues interrupted deliveries, which only the listener may do.
    ``latency_s`` is the time from study complete to sent."""
    sql = "SELECT d.*, e.study_uid, e.finding FROM notify_deliveries d JOIN notify_events e USING(event_id)"
    params: tuple[Any, ...] = ()
    if study_uid is not None:
        sql += " WHERE e.study_uid=?"
        params = (study_uid,)
    sql += " ORDER BY d.created DESC, d.channel"
    try:
        rows = db.query(sql, params) if isinstance(db, State) else db.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # tables not created yet: no notification was ever configured
        return []
    return [{k: r[k] for k in _LOG_COLUMNS} for r in rows]
