"""The delivery loop: due rows per destination, outcomes recorded as they happen, commitment, audit."""


from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from node import scu
from node.config import DestinationConfig
from node.delivery.dicom import DimseSender
from node.delivery.model import (
    COMMITTED,
    DEAD,
    FAILED,
    PENDING,
    PRIORITY,
    SCHEMA,
    SENT,
    STATES,
    STORAGE_COMMITMENT_PUSH,
    BackoffPolicy,
    Batch,
    Item,
    Outcome,
    Sender,
    all_outcomes,
    status_text,
    wants_commitment,
)
from node.delivery.stow import StowSender
from node.state import State

log = logging.getLogger("ainode.delivery")

class DeliveryService:
    """Owns the ``deliveries`` table and the thread that works it off.

    The listener calls ``enqueue`` when a job's results are in the outbox, ``wake`` is implied for stat
    items, ``summary``/``all_pending`` feed ``ainode status`` and ``/metrics``.
    """

    def __init__(self, state: State, destinations: list[DestinationConfig], storage_dir: str | Path,
                 ae_title: str, *, backoff: BackoffPolicy | None = None, poll_interval_s: float = 5.0,
                 batch_size: int = 50, senders: dict[str, Sender] | None = None,
                 commitment_timeout_s: float = 600.0, commitment_port: int | None = None) -> None:
        self.state = state
        self.destinations = {d.name: d for d in destinations}
        self.storage_dir = Path(storage_dir)
        self.outbox = self.storage_dir / "outbox"
        self.ae_title = ae_title
        self.backoff = backoff or BackoffPolicy()
        self.poll_interval_s = poll_interval_s
        self.batch_size = batch_size
        self.senders: dict[str, Sender] = senders or {"dicom": DimseSender(ae_title), "dicomweb": StowSender()}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._run_lock = threading.Lock()
        self._unknown_warned: set[str] = set()
        self.commitment_timeout_s = commitment_timeout_s
        self.commitment_port = commitment_port
        self._commit_server: Any = None
        self._txn_events: dict[str, threading.Event] = {}
        state.ensure_schema(SCHEMA)

    def _due_clause(self) -> tuple[str, tuple[Any, ...]]:
        """Rows the loop must look at: pending ones, and stored-but-uncommitted ones where commitment is wanted."""
        commit = [d.name for d in self.destinations.values() if wants_commitment(d)]
        marks = ",".join("?" * len(commit))
        if not commit:
            return "state=?", (PENDING,)
        return f"(state=? OR (state=? AND destination IN ({marks})))", (PENDING, SENT, *commit)

    # ------------------------------------------------------------------ paths
    def _store_path(self, path: Path) -> str:
        """Relative to storage_dir when inside it, so a moved storage volume keeps working."""
        p = Path(path).resolve()
        try:
            return str(p.relative_to(self.storage_dir.resolve()))
        except ValueError:
            return str(p)

    def _abs_path(self, stored: str) -> Path:
        p = Path(stored)
        return p if p.is_absolute() else self.storage_dir / p

    # ------------------------------------------------------------------ enqueue
    def enqueue(self, study_uid: str, job_id: str | None, files: Iterable[str | Path], destinations: Iterable[str],
                priority: str = "routine") -> int:
        """Record one delivery per (destination, SOP instance); returns how many are new.

        Re-enqueueing a SOP Instance UID for a destination adds nothing (a stat request only raises
        the priority of a still-pending row).  Files must already be complete in the outbox.
        """
        prio = PRIORITY.get(priority, PRIORITY["routine"])
        destinations = list(destinations)
        metas = []
        for f in files:
            meta = dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).file_meta
            metas.append((str(meta.MediaStorageSOPInstanceUID), str(meta.MediaStorageSOPClassUID),
                          str(meta.TransferSyntaxUID), self._store_path(Path(f))))
        now = time.time()
        new = 0
        with self.state.tx() as c:
            for dest in destinations:
                known = dest in self.destinations
                for sop_uid, sop_class, ts, path in metas:
                    new += c.execute(
                        "INSERT INTO deliveries(destination, sop_uid, sop_class_uid, transfer_syntax, study_uid,"
                        " job_id, path, priority, state, next_attempt, last_error, created)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(destination, sop_uid) DO NOTHING",
                        (dest, sop_uid, sop_class, ts, study_uid, job_id, path, prio, PENDING if known else FAILED,
                         now, None if known else f"destination {dest!r} is not configured", now)).rowcount
                    c.execute("UPDATE deliveries SET priority=MIN(priority, ?) WHERE destination=? AND sop_uid=?"
                              " AND state=?", (prio, dest, sop_uid, PENDING))
        log.info("delivery: enqueued %d new row(s) for %d result(s) of job %s to %s", new, len(metas), job_id,
                 ", ".join(destinations))
        if new:
            self.state.event("delivery", f"{new} result object(s) queued for delivery", study_uid)
            self.wake()
        return new

    def retry_failed(self, destination: str | None = None, study_uid: str | None = None) -> int:
        """Operator action after fixing a peer: put failed-permanent and dead-letter rows back in the queue."""
        sql = "UPDATE deliveries SET state=?, next_attempt=?, attempts=0, created=? WHERE state IN (?, ?)"
        params: list[Any] = [PENDING, time.time(), time.time(), FAILED, DEAD]
        if destination:
            sql += " AND destination=?"
            params.append(destination)
        if study_uid:
            sql += " AND study_uid=?"
            params.append(study_uid)
        n = self.state.execute(sql, tuple(params))
        if n:
            self.wake()
        return n

    # ------------------------------------------------------------------ work
    def _due(self, destination: str, now: float, limit: int) -> list[Item]:
        """Rows to attempt now, stat first. Pending stat rows ride on every attempt to their destination,
        even before their own backoff ends: when a PACS comes back, the first association carries the
        critical results ahead of routine ones that were queued (and due) earlier."""
        rows = self.state.query(
            "SELECT * FROM deliveries WHERE state=? AND destination=? AND (next_attempt<=? OR priority=?)"
            " ORDER BY priority, next_attempt, id LIMIT ?", (PENDING, destination, now, PRIORITY["stat"], limit))
        return [Item(r["id"], r["destination"], r["sop_uid"], r["sop_class_uid"], r["transfer_syntax"], r["study_uid"],
                     self._abs_path(r["path"]), r["priority"], r["attempts"], r["created"]) for r in rows]

    def run_once(self) -> int:
        """Attempt everything due now (each destination on its own thread); returns how many were sent."""
        with self._run_lock:
            now = time.time()
            clause, params = self._due_clause()
            dests = [r["destination"] for r in self.state.query(
                f"SELECT DISTINCT destination FROM deliveries WHERE {clause} AND next_attempt<=?", (*params, now))]
            work = []
            for name in dests:
                if name in self.destinations:
                    work.append(self.destinations[name])
                elif name not in self._unknown_warned:
                    self._unknown_warned.add(name)
                    log.warning("delivery: destination %r has pending results but is not configured", name)
            if not work:
                return 0
            if len(work) == 1:
                return self._deliver(work[0], now)
            with ThreadPoolExecutor(max_workers=min(4, len(work)), thread_name_prefix="delivery") as pool:
                return sum(pool.map(lambda d: self._deliver(d, now), work))

    def _deliver(self, dest: DestinationConfig, now: float) -> int:
        sent = 0
        seen: set[int] = set()
        while not self._stop.is_set():
            items = [it for it in self._due(dest.name, now, self.batch_size) if it.id not in seen]
            if not items:
                break
            seen.update(it.id for it in items)
            batch = Batch(dest, {it.id: it for it in items})
            try:
                outcomes = self.senders[dest.kind].send(dest, items, lambda o, b=batch: self._record(b, o))
            except Exception as exc:  # a bug in a sender must not kill the delivery thread
                log.exception("delivery %s: sender failed", dest.name)
                outcomes = all_outcomes(items, Outcome("transient", f"internal error: {exc}"))
            self._record(batch, outcomes)  # whatever the sender did not report as it went
            self._batch_events(batch)
            sent += batch.sent
            if not batch.sent:
                break  # destination unreachable or refusing: do not open another association now
        if wants_commitment(dest) and not self._stop.is_set():
            self._request_commitments(dest)
        return sent

    def _record(self, batch: Batch, outcomes: dict[int, Outcome]) -> None:
        """Persist outcomes as they happen, so a process killed mid-batch re-sends only what it had not recorded."""
        dest = batch.dest
        todo = {k: v for k, v in outcomes.items() if k in batch.items and k not in batch.recorded}
        if not todo:
            return
        batch.recorded.update(todo)
        now = time.time()
        deadline_s = dest.retry_max_hours * 3600.0
        with self.state.tx() as c:
            for item_id, o in todo.items():
                it = batch.items[item_id]
                attempts = it.attempts + 1
                if o.kind == "sent":
                    batch.sent += 1
                    c.execute("UPDATE deliveries SET state=?, attempts=?, sent=?, last_attempt=?, last_error=NULL,"
                              " first_attempt=COALESCE(first_attempt, ?), next_attempt=?, commit_txn=NULL WHERE id=?",
                              (SENT, attempts, now, now, now, now, it.id))
                    log.info("delivery %s: sent %s", dest.name, it.sop_uid)
                    batch.per_study[it.study_uid][SENT] += 1
                    continue
                if o.kind == "permanent":
                    new_state, next_at = FAILED, now
                    log.error("delivery %s: %s failed permanently: %s", dest.name, it.sop_uid, o.error)
                elif now - it.created >= deadline_s:
                    new_state, next_at = DEAD, now
                    log.error("delivery %s: %s dead-lettered after %d attempts over %.1f h: %s", dest.name,
                              it.sop_uid, attempts, dest.retry_max_hours, o.error)
                else:
                    new_state = PENDING
                    delay = batch.delays.setdefault(attempts, self.backoff.delay(attempts))
                    next_at = min(now + delay, it.created + deadline_s)
                    log.warning("delivery %s: %s attempt %d failed (%s); next in %.1f s", dest.name, it.sop_uid,
                                attempts, o.error, next_at - now)
                c.execute("UPDATE deliveries SET state=?, attempts=?, next_attempt=?, last_attempt=?, last_error=?,"
                          " first_attempt=COALESCE(first_attempt, ?) WHERE id=?",
                          (new_state, attempts, next_at, now, o.error, now, it.id))
                if new_state != PENDING:
                    batch.per_study[it.study_uid][new_state] += 1
                    batch.errors[it.study_uid] = o.error or ""

    def _batch_events(self, batch: Batch) -> None:
        """One event per study and batch, not per instance: the events table is for people to read."""
        for study_uid, counts in batch.per_study.items():
            parts = ", ".join(f"{n} {s}" for s, n in counts.items())
            err = batch.errors.get(study_uid)
            self.state.event("delivery", f"{batch.dest.name}: {parts}" + (f" ({err})" if err else ""), study_uid)

    def cleanup_outbox(self, min_age_s: float = 7 * 24 * 3600.0) -> list[str]:
        """Remove ``outbox/<job_id>/`` of jobs delivered everywhere at least ``min_age_s`` ago; returns the job ids.

        Jobs with anything pending, failed or dead-lettered keep their files: an operator's ``retry_failed``
        must re-send the very same objects."""
        cutoff = time.time() - min_age_s
        jobs = [r["job_id"] for r in self.state.query(
            "SELECT job_id FROM deliveries WHERE job_id IS NOT NULL GROUP BY job_id"
            " HAVING SUM(CASE WHEN state IN (?, ?) THEN 0 ELSE 1 END)=0 AND MAX(COALESCE(committed, sent)) < ?",
            (SENT, COMMITTED, cutoff))]
        removed = []
        for job_id in jobs:
            unfinished_commitment = [d for d, dest in self.destinations.items() if wants_commitment(dest)]
            if unfinished_commitment and self.state.one(
                    f"SELECT 1 FROM deliveries WHERE job_id=? AND state=? AND destination IN"
                    f" ({','.join('?' * len(unfinished_commitment))})", (job_id, SENT, *unfinished_commitment)):
                continue  # stored but not yet committed: a failure report would need the file again
            d = self.outbox / job_id
            if d.is_dir() and d.resolve().parent == self.outbox.resolve():
                shutil.rmtree(d)
                removed.append(job_id)
        if removed:
            log.info("delivery: removed outbox files of %d delivered job(s)", len(removed))
        return removed

    # ------------------------------------------------------------------ storage commitment
    def _request_commitments(self, dest: DestinationConfig) -> None:
        """Ask for commitment of stored rows that have none requested, or whose request timed out."""
        sender = self.senders.get("dicom")
        if not isinstance(sender, DimseSender):
            return
        now = time.time()
        rows = self.state.query("SELECT * FROM deliveries WHERE state=? AND destination=? AND next_attempt<=?"
                                " ORDER BY priority, id LIMIT 500", (SENT, dest.name, now))
        if not rows:
            return
        deadline_s = dest.retry_max_hours * 3600.0
        expired = [r["id"] for r in rows if now - r["created"] >= deadline_s]
        if expired:
            marks = ",".join("?" * len(expired))
            self.state.execute(f"UPDATE deliveries SET state=?, last_error=? WHERE id IN ({marks})",
                               (DEAD, f"stored at {dest.name} but never committed within {dest.retry_max_hours} h",
                                *expired))
            log.error("delivery %s: %d result(s) dead-lettered without storage commitment", dest.name, len(expired))
        rows = [r for r in rows if r["id"] not in expired]
        if not rows:
            return
        items = [Item(r["id"], r["destination"], r["sop_uid"], r["sop_class_uid"], r["transfer_syntax"],
                      r["study_uid"], self._abs_path(r["path"]), r["priority"], r["attempts"], r["created"])
                 for r in rows]
        txn = f"2.25.{uuid.uuid4().int}"
        ids = [it.id for it in items]
        marks = ",".join("?" * len(ids))
        # Recorded before asking, so a report that races back on another association finds its rows.
        self.state.execute(f"UPDATE deliveries SET commit_txn=?, commit_requested=?, next_attempt=? WHERE id IN"
                           f" ({marks})", (txn, now, now + self.commitment_timeout_s, *ids))
        resolved = self._txn_events.setdefault(txn, threading.Event())
        outcome = sender.request_commitment(dest, txn, items, self.handle_n_event_report, resolved=resolved)
        self._txn_events.pop(txn, None)
        if outcome.kind == "sent":
            log.info("delivery %s: storage commitment requested for %d result(s), transaction %s", dest.name,
                     len(items), txn)
            return
        if outcome.kind == "permanent":
            self.state.execute(f"UPDATE deliveries SET state=?, last_error=? WHERE id IN ({marks}) AND state=?",
                               (FAILED, outcome.error, *ids, SENT))
            log.error("delivery %s: %s", dest.name, outcome.error)
        else:
            delay = self.backoff.delay(max(1, items[0].attempts))
            self.state.execute(f"UPDATE deliveries SET commit_txn=NULL, next_attempt=?, last_error=? WHERE id IN"
                               f" ({marks}) AND state=?", (now + delay, outcome.error, *ids, SENT))
            log.warning("delivery %s: storage commitment request failed (%s); next in %.1f s", dest.name,
                        outcome.error, delay)

    def handle_n_event_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """pynetdicom EVT_N_EVENT_REPORT handler (returns status and event reply, as pynetdicom requires): bind it
        on the node's SCP as well, because most PACS send the storage commitment result on an association of
        their own."""
        if str(event.request.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
            return 0x0112, None  # no such SOP instance: we only take commitment reports
        try:
            info = event.event_information
        except Exception:
            log.exception("delivery: undecodable storage commitment report")
            return 0x0110, None
        self.commitment_report(info, int(event.event_type or 0))
        return 0x0000, None

    def commitment_report(self, info: Dataset, event_type: int = 1) -> tuple[int, int]:
        """Apply a Storage Commitment result; returns (committed, failed) row counts.

        Failed instances go back to pending and are re-sent with the same SOP Instance UID (PS3.4 J.3.3.1),
        except for failures that a re-send cannot cure."""
        txn = str(getattr(info, "TransactionUID", ""))
        now = time.time()
        ok = [str(x.ReferencedSOPInstanceUID) for x in getattr(info, "ReferencedSOPSequence", [])]
        bad = {str(x.ReferencedSOPInstanceUID): int(getattr(x, "FailureReason", 0x0110))
               for x in getattr(info, "FailedSOPSequence", [])}
        committed = failed = 0
        with self.state.tx() as c:
            for sop in ok:
                committed += c.execute("UPDATE deliveries SET state=?, committed=?, last_error=NULL WHERE commit_txn=?"
                                       " AND sop_uid=? AND state=?", (COMMITTED, now, txn, sop, SENT)).rowcount
            for sop, reason in bad.items():
                err = f"storage commitment failed: reason 0x{reason:04X} ({status_text(reason)})"
                if reason in (0x0119, 0x0122, 0x0131):  # class/instance conflict, class unsupported, dup txn
                    n = c.execute("UPDATE deliveries SET state=?, last_error=? WHERE commit_txn=? AND sop_uid=?"
                                  " AND state=?", (FAILED, err, txn, sop, SENT)).rowcount
                else:
                    n = c.execute("UPDATE deliveries SET state=?, last_error=?, next_attempt=?, commit_txn=NULL"
                                  " WHERE commit_txn=? AND sop_uid=? AND state=?",
                                  (PENDING, err, now + self.backoff.delay(1), txn, sop, SENT)).rowcount
                failed += n
        log.info("delivery: storage commitment transaction %s: %d committed, %d failed (event type %d)", txn,
                 committed, failed, event_type)
        if committed or failed:
            ev = self._txn_events.get(txn)
            if ev is not None:
                ev.set()
            if failed:
                self.wake()
        return committed, failed

    def start_commitment_listener(self) -> None:
        """(Called by ``start``.) A listener for N-EVENT-REPORTs, for running delivery on its own
        (``python -m node.delivery``, tests); inside ``ainode run`` the node's main SCP should route them to
        ``handle_n_event_report`` instead."""
        if self.commitment_port is None or self._commit_server is not None:
            return
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH, [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                                 scu_role=True, scp_role=True)
        ae.add_supported_context("1.2.840.10008.1.1")
        self._commit_server = ae.start_server(("0.0.0.0", self.commitment_port), block=False,
                                              evt_handlers=[(evt.EVT_N_EVENT_REPORT, self.handle_n_event_report),
                                                            (evt.EVT_CONN_OPEN, scu.set_nodelay)])

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        if self._thread and self._thread.is_alive():
            return
        self.start_commitment_listener()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="delivery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
            self._thread = None
        if self._commit_server is not None:
            self._commit_server.shutdown()
            self._commit_server = None

    def wake(self) -> None:
        """Deliver now rather than at the next poll (a stat result must not wait out the interval)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.run_once()
            except Exception:
                log.exception("delivery: run failed; retrying after the poll interval")
            clause, params = self._due_clause()
            row = self.state.one(f"SELECT MIN(next_attempt) AS t FROM deliveries WHERE {clause}", params)
            wait = self.poll_interval_s
            if row and row["t"] is not None:
                wait = max(0.05, min(wait, row["t"] - time.time()))
            self._wake.wait(wait)

    # ------------------------------------------------------------------ status
    def summary(self, study_uid: str) -> dict[str, dict[str, Any]]:
        """Per destination: counts per state, last error, first/last sent time, next retry."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.state.query(
                "SELECT destination, state, COUNT(*) AS n, MIN(sent) AS first_sent, MAX(sent) AS last_sent,"
                " MIN(next_attempt) AS next_attempt FROM deliveries WHERE study_uid=? GROUP BY destination, state",
                (study_uid,)):
            d = out.setdefault(r["destination"], {"counts": dict.fromkeys(STATES, 0), "last_error": None,
                                                  "first_sent": None, "last_sent": None, "next_attempt": None})
            d["counts"][r["state"]] = r["n"]
            if r["first_sent"] is not None:
                d["first_sent"] = min(x for x in (d["first_sent"], r["first_sent"]) if x is not None)
                d["last_sent"] = max(x for x in (d["last_sent"], r["last_sent"]) if x is not None)
            if r["state"] == PENDING:
                d["next_attempt"] = r["next_attempt"]
        for r in self.state.query(
                "SELECT destination, last_error FROM deliveries WHERE study_uid=? AND last_error IS NOT NULL"
                " ORDER BY last_attempt", (study_uid,)):
            out[r["destination"]]["last_error"] = r["last_error"]
        for name, d in out.items():
            dest = self.destinations.get(name)
            done = d["counts"][COMMITTED] if dest and wants_commitment(dest) else d["counts"][SENT]
            d["delivered"] = done == sum(d["counts"].values())
        return out

    def all_pending(self) -> dict[str, int]:
        """Undelivered rows per destination (pending, plus sent-but-uncommitted where commitment is required)."""
        out: dict[str, int] = {name: 0 for name in self.destinations}
        for r in self.state.query("SELECT destination, state, COUNT(*) AS n FROM deliveries WHERE state IN (?, ?)"
                                  " GROUP BY destination, state", (PENDING, SENT)):
            dest = self.destinations.get(r["destination"])
            if r["state"] == PENDING or (dest is not None and wants_commitment(dest)):
                out[r["destination"]] = out.get(r["destination"], 0) + r["n"]
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per destination and state, for Prometheus gauges."""
        out: dict[str, dict[str, int]] = {}
        for r in self.state.query("SELECT destination, state, COUNT(*) AS n FROM deliveries GROUP BY destination,"
                                  " state"):
            out.setdefault(r["destination"], dict.fromkeys(STATES, 0))[r["state"]] = r["n"]
        return out
