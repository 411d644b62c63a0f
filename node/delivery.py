"""Deliver result objects from the durable outbox to every destination, exactly once as far as the PACS can tell.

Why it is shaped this way:

* The outbox files are written (validated, atomically) before ``enqueue`` is called, and they are never
  regenerated: a re-send carries the same SOP Instance UIDs, which is what makes re-sending after a crash
  harmless (a PACS stores a known SOP Instance UID once).
* One row per (destination, SOP Instance UID) in the listener's SQLite database holds the whole schedule
  (state, attempts, next attempt, last error), so a killed process resumes where it stopped; nothing about
  the schedule lives only in memory.
* A transient failure (connection refused, timeout, A-ASSOCIATE-RJ transient, 0xA7xx out of resources) is
  retried with exponential backoff and jitter until the destination's ``retry_max_hours``; then the row is
  dead-lettered.  A permanent refusal (A-ASSOCIATE-RJ permanent, presentation context rejected, a C-STORE
  failure that is not about resources, HTTP 4xx) is recorded once as ``failed-permanent`` and shown in
  status: retrying would only hammer a peer that has already said no.
* One association per destination per batch, proposing only the SOP classes and transfer syntaxes the batch
  needs (plus explicit and implicit little endian, so a peer that refuses our syntax still gets the object,
  re-encoded); stat items are picked first.

Run standalone (tests use this as "the process that delivers" and ``kill -9`` it)::

    python -m node.delivery --storage-dir DIR --config FILE
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from node import scu
from node.config import DestinationConfig, TLSConfig
from node.state import State

log = logging.getLogger("ainode.delivery")

PENDING = "pending"
SENT = "sent"  # stored at the destination; for storage-commitment destinations: awaiting commitment
COMMITTED = "committed"
FAILED = "failed-permanent"
DEAD = "dead-letter"
STATES = (PENDING, SENT, COMMITTED, FAILED, DEAD)

PRIORITY = {"stat": 0, "routine": 1}
STORAGE_COMMITMENT_PUSH = UID("1.2.840.10008.1.20.1")
STORAGE_COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")
MAX_CONTEXTS = 128  # DICOM PS3.8: presentation context ids are odd numbers 1..255

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    job_id TEXT,
    path TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error TEXT,
    created REAL NOT NULL,
    first_attempt REAL, last_attempt REAL, sent REAL, committed REAL,
    commit_txn TEXT, commit_requested REAL,
    UNIQUE (destination, sop_uid)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, destination, next_attempt);
CREATE INDEX IF NOT EXISTS deliveries_study ON deliveries(study_uid);
CREATE INDEX IF NOT EXISTS deliveries_txn ON deliveries(commit_txn);
"""

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C): warnings still mean "stored".
_WARNINGS = {0xB000: "coercion of data elements", 0xB006: "elements discarded",
             0xB007: "data set does not match SOP class"}
_FAILURES = {0x0110: "processing failure", 0x0117: "invalid SOP instance", 0x0122: "SOP class not supported",
             0x0124: "not authorised", 0x0210: "duplicate invocation", 0x0211: "unrecognised operation",
             0x0212: "mistyped argument", 0x0213: "resource limitation"}


def _status_text(status: int) -> str:
    if status in _FAILURES:
        return _FAILURES[status]
    if 0xA700 <= status <= 0xA7FF:
        return "out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return "data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return "cannot understand"
    return "unknown status"


def is_transient_status(status: int) -> bool:
    """Only "out of resources" says the same request may succeed later; every other failure is the peer's answer."""
    return 0xA700 <= status <= 0xA7FF or status == 0x0213


# --------------------------------------------------------------------------------------------- data model
@dataclass(frozen=True)
class Item:
    """One (destination, SOP instance) delivery as read from the database."""

    id: int
    destination: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_uid: str
    path: Path
    priority: int
    attempts: int
    created: float


@dataclass(frozen=True)
class Outcome:
    kind: Literal["sent", "transient", "permanent"]
    error: str | None = None


@dataclass(frozen=True)
class BackoffPolicy:
    """Exponential backoff with jitter; jitter keeps many nodes from reconnecting to a recovered PACS in lockstep."""

    base_s: float = 30.0
    max_s: float = 3600.0
    jitter: float = 0.3

    def delay(self, attempts: int) -> float:
        raw = min(self.max_s, self.base_s * (2 ** max(0, attempts - 1)))
        return raw * (1.0 - self.jitter * random.random())


Record = Callable[[dict[int, Outcome]], None]


class Sender(Protocol):
    def send(self, dest: DestinationConfig, items: Sequence[Item], record: Record | None = None) -> dict[int, Outcome]:
        """Attempt ``items`` on one connection, calling ``record`` as outcomes become known (so progress survives
        a crash mid-batch); returns all outcomes.  An item missing from the result was not attempted."""
        ...


@dataclass
class _Batch:
    """What one association (or STOW request series) to one destination has done so far."""

    dest: DestinationConfig
    items: dict[int, Item]
    recorded: set[int] = field(default_factory=set)
    sent: int = 0
    delays: dict[int, float] = field(default_factory=dict)  # one jitter per batch: it retries as one association
    per_study: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    errors: dict[str, str] = field(default_factory=dict)


def wants_commitment(dest: DestinationConfig) -> bool:
    """Storage commitment is a DIMSE service; for STOW-RS the HTTP response is the commitment we get."""
    return dest.storage_commitment and dest.kind == "dicom"


def _all(items: Iterable[Item], outcome: Outcome) -> dict[int, Outcome]:
    return {it.id: outcome for it in items}


# --------------------------------------------------------------------------------------------- DIMSE
def tls_context(tls: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls.ca else None)
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


def propose_contexts(items: Sequence[Item]) -> tuple[list[PresentationContext], list[Item]]:
    """Contexts for the batch: each file's own syntax, then explicit and implicit little endian as separate
    contexts (so the peer can refuse one and accept another).  Items whose SOP class does not fit in the
    128-context limit are returned unproposed, to go on the next association."""
    by_class: dict[str, set[str]] = {}
    fitting: list[Item] = []
    used = 0
    for it in items:
        tss = by_class.get(it.sop_class_uid)
        if tss is not None and it.transfer_syntax in tss | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}:
            tss.add(it.transfer_syntax)
            fitting.append(it)
            continue
        extra = 0 if tss is not None else 2
        native = it.transfer_syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        need = extra + (1 if native else 0)
        if used + need > MAX_CONTEXTS:
            continue
        used += need
        by_class.setdefault(it.sop_class_uid, set()).add(it.transfer_syntax)
        fitting.append(it)
    contexts: list[PresentationContext] = []
    for sop_class, tss in by_class.items():
        for ts in sorted(tss - {ExplicitVRLittleEndian, ImplicitVRLittleEndian}):
            contexts.append(build_context(sop_class, [ts]))
        contexts.append(build_context(sop_class, [ExplicitVRLittleEndian]))
        contexts.append(build_context(sop_class, [ImplicitVRLittleEndian]))
    return contexts, fitting


def association_failure(assoc: Association, dest: DestinationConfig) -> Outcome:
    """Why an association did not come up, and whether asking again later can help."""
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        kind = scu.rejection_kind(rsp)
        return Outcome(kind, f"association rejected {kind}ly by {where}: {scu.rejection_reason(rsp)}")
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        classes = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
        return Outcome("permanent", f"{where} accepted no presentation context (SOP classes not supported: "
                                    f"{', '.join(UID(c).name for c in classes)})")
    if assoc.is_aborted and getattr(assoc, "ainode_connected", False):
        return Outcome("transient", f"association with {where} aborted during negotiation")
    return Outcome("transient", f"could not connect to {where}: {_probe(dest)}")


def _probe(dest: DestinationConfig, timeout: float = 3.0) -> str:
    """pynetdicom only logs why connect() failed; one plain TCP probe recovers the reason for the status page
    (refused, timed out, no route) or shows that TCP works and the TLS handshake was the problem."""
    try:
        with socket.create_connection((str(dest.host), int(dest.port or 104)), timeout=timeout):
            pass
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            return "timed out"
        return exc.strerror or type(exc).__name__
    return "TLS handshake failed" if dest.tls else "connection closed before the association was negotiated"


@dataclass
class DimseSender:
    """C-STORE SCU: one association per batch."""

    ae_title: str
    connection_timeout: float = 10.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 120.0
    network_timeout: float = 60.0

    def _ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.connection_timeout = self.connection_timeout
        ae.acse_timeout = self.acse_timeout
        ae.dimse_timeout = self.dimse_timeout
        ae.network_timeout = self.network_timeout
        return ae

    def associate(self, dest: DestinationConfig, contexts: list[PresentationContext],
                  handlers: list[Any] | None = None) -> Association:
        tls_args = (tls_context(dest.tls), dest.host) if dest.tls else None
        return scu.associate(self._ae(), dest.host, int(dest.port or 104), contexts=contexts,
                             ae_title=dest.ae_title or "", tls_args=tls_args, handlers=handlers or ())

    def send(self, dest: DestinationConfig, items: Sequence[Item], record: Record | None = None) -> dict[int, Outcome]:
        contexts, fitting = propose_contexts(items)
        if not fitting:
            return {}
        try:
            assoc = self.associate(dest, contexts)
        except Exception as exc:  # bad TLS files, DNS failure: the config's fault, but it may be fixed later
            return _all(fitting, Outcome("transient", f"cannot start association with {dest.name}: {exc}"))
        if not assoc.is_established:
            return _all(fitting, association_failure(assoc, dest))
        out: dict[int, Outcome] = {}
        try:
            for n, it in enumerate(fitting):
                if not assoc.is_established:
                    out.update(_all(fitting[n:], Outcome("transient", f"association with {dest.name} was lost")))
                    break
                out[it.id] = self._store_one(assoc, dest, it, msg_id=n + 1)
                if record is not None:
                    record({it.id: out[it.id]})
        finally:
            if assoc.is_established:
                assoc.release()
        return out

    def _store_one(self, assoc: Association, dest: DestinationConfig, it: Item, msg_id: int) -> Outcome:
        accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == it.sop_class_uid]
        if not accepted:
            return Outcome("permanent", f"{dest.name} rejected the presentation context for SOP class "
                                        f"{UID(it.sop_class_uid).name} ({it.sop_class_uid})")
        try:
            ds = dcmread(it.path)
        except Exception as exc:  # the file was validated when enqueued; if it is gone, no retry brings it back
            return Outcome("permanent", f"cannot read outbox file {it.path}: {exc}")
        ts = UID(ds.file_meta.TransferSyntaxUID)
        accepted_ts = {UID(cx.transfer_syntax[0]) for cx in accepted}
        if ts not in accepted_ts and ts.is_compressed:
            if not any(not t.is_compressed for t in accepted_ts):
                return Outcome("permanent", f"{dest.name} accepts none of our transfer syntaxes for {it.sop_uid}")
            try:
                # pydicom 3 would mint a new SOP Instance UID by default; a re-encoding is the same instance,
                # and a new UID would defeat the PACS's duplicate detection on re-sends.
                ds.decompress(generate_instance_uid=False)  # pynetdicom then encodes as explicit/implicit VR LE
            except Exception as exc:
                return Outcome("permanent", f"cannot decompress {it.sop_uid} for {dest.name}: {exc}")
            log.info("delivery %s: %s re-encoded from %s (peer refused it)", dest.name, it.sop_uid, ts.name)
        prio = 1 if it.priority == PRIORITY["stat"] else 0  # C-STORE priority HIGH / MEDIUM
        try:
            status = assoc.send_c_store(ds, msg_id=msg_id, priority=prio)
        except ValueError as exc:  # no usable context or unencodable dataset
            return Outcome("permanent", f"cannot send {it.sop_uid} to {dest.name}: {exc}")
        except Exception as exc:
            return Outcome("transient", f"C-STORE of {it.sop_uid} to {dest.name} broke: {exc}")
        return self._classify(dest, it, status)

    def request_commitment(self, dest: DestinationConfig, txn_uid: str, items: Sequence[Item],
                           on_report: Any, wait_s: float = 2.0, resolved: threading.Event | None = None) -> Outcome:
        """N-ACTION (Storage Commitment Push Model, action 1) for ``items`` under ``txn_uid``.

        The answer (N-EVENT-REPORT) may come on this association, so ``on_report`` is bound here and the
        association is held up to ``wait_s`` (or until ``resolved`` is set); most PACS, Orthanc included,
        answer later on an association of their own, which the node's SCP hands to the same handler."""
        contexts = [build_context(STORAGE_COMMITMENT_PUSH, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
        try:
            assoc = self.associate(dest, contexts, handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
        except Exception as exc:
            return Outcome("transient", f"cannot start association with {dest.name}: {exc}")
        if not assoc.is_established:
            failure = association_failure(assoc, dest)
            if failure.kind == "permanent":
                return Outcome("permanent", f"stored, but storage commitment refused: {failure.error}")
            return failure
        try:
            req = Dataset()
            req.TransactionUID = txn_uid
            req.ReferencedSOPSequence = []
            for it in items:
                ref = Dataset()
                ref.ReferencedSOPClassUID = it.sop_class_uid
                ref.ReferencedSOPInstanceUID = it.sop_uid
                req.ReferencedSOPSequence.append(ref)
            status, _ = assoc.send_n_action(req, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE)
            if "Status" not in status:
                return Outcome("transient", f"no N-ACTION response from {dest.name}")
            code = int(status.Status)
            if code != 0x0000:
                kind: Literal["transient", "permanent"] = "transient" if is_transient_status(code) else "permanent"
                return Outcome(kind, f"storage commitment request refused by {dest.name}: status 0x{code:04X}")
            if resolved is not None:
                resolved.wait(wait_s)
            return Outcome("sent")
        except Exception as exc:
            return Outcome("transient", f"storage commitment request to {dest.name} broke: {exc}")
        finally:
            if assoc.is_established:
                assoc.release()

    @staticmethod
    def _classify(dest: DestinationConfig, it: Item, status: Dataset) -> Outcome:
        if "Status" not in status:
            return Outcome("transient", f"no C-STORE response from {dest.name} (timeout or abort)")
        code = int(status.Status)
        comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
        if code == 0x0000:
            return Outcome("sent")
        if code in _WARNINGS:
            log.warning("delivery %s: %s stored with warning 0x%04X (%s)", dest.name, it.sop_uid, code,
                        _WARNINGS[code])
            return Outcome("sent")
        text = f"C-STORE status 0x{code:04X} ({_status_text(code)}){comment} from {dest.name}"
        return Outcome("transient" if is_transient_status(code) else "permanent", text)


# --------------------------------------------------------------------------------------------- STOW-RS
@dataclass
class StowSender:
    """STOW-RS via dicomweb-client; one multipart POST per batch (per study, as STOW URLs are per study)."""

    timeout: float = 60.0
    max_per_request: int = 50

    def send(self, dest: DestinationConfig, items: Sequence[Item], record: Record | None = None) -> dict[int, Outcome]:
        import requests
        from dicomweb_client.api import DICOMwebClient

        headers = {"Authorization": f"Bearer {dest.bearer_token}"} if dest.bearer_token else None
        session = requests.Session()
        if dest.tls:  # HTTPS with a client certificate, verified against the configured CA
            session.cert = (str(dest.tls.cert), str(dest.tls.key))
            session.verify = str(dest.tls.ca) if dest.tls.ca else True
        client = DICOMwebClient(url=str(dest.url).rstrip("/"), session=session, headers=headers, timeout=self.timeout)
        client.set_http_retry_params(retry=False)  # our schedule, not theirs, survives restarts
        out: dict[int, Outcome] = {}
        by_study: dict[str, list[Item]] = defaultdict(list)
        for it in items:
            by_study[it.study_uid].append(it)
        for study_uid, group in by_study.items():
            for start in range(0, len(group), self.max_per_request):
                chunk = group[start:start + self.max_per_request]
                datasets: list[Dataset] = []
                readable: list[Item] = []
                for it in chunk:
                    try:
                        datasets.append(dcmread(it.path))
                        readable.append(it)
                    except Exception as exc:
                        out[it.id] = Outcome("permanent", f"cannot read outbox file {it.path}: {exc}")
                if not readable:
                    continue
                try:
                    rsp = client.store_instances(datasets, study_instance_uid=study_uid)
                except requests.HTTPError as exc:
                    code = exc.response.status_code if exc.response is not None else 0
                    transient = code >= 500 or code in (408, 429) or code == 0
                    out.update(_all(readable, Outcome("transient" if transient else "permanent",
                                                      f"STOW-RS to {dest.url} failed: HTTP {code}")))
                    continue
                except (requests.RequestException, OSError) as exc:
                    out.update(_all(readable, Outcome("transient", f"STOW-RS to {dest.url} failed: {exc}")))
                    continue
                failed = {str(x.ReferencedSOPInstanceUID): int(getattr(x, "FailureReason", 0x0110))
                          for x in getattr(rsp, "FailedSOPSequence", [])}
                for it in readable:
                    if it.sop_uid in failed:
                        code = failed[it.sop_uid]
                        out[it.id] = Outcome("transient" if is_transient_status(code) else "permanent",
                                             f"STOW-RS refused {it.sop_uid}: failure reason 0x{code:04X} "
                                             f"({_status_text(code)})")
                    else:
                        out[it.id] = Outcome("sent")
                if record is not None:
                    record(out)
        return out


# --------------------------------------------------------------------------------------------- service
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
            batch = _Batch(dest, {it.id: it for it in items})
            try:
                outcomes = self.senders[dest.kind].send(dest, items, lambda o, b=batch: self._record(b, o))
            except Exception as exc:  # a bug in a sender must not kill the delivery thread
                log.exception("delivery %s: sender failed", dest.name)
                outcomes = _all(items, Outcome("transient", f"internal error: {exc}"))
            self._record(batch, outcomes)  # whatever the sender did not report as it went
            self._batch_events(batch)
            sent += batch.sent
            if not batch.sent:
                break  # destination unreachable or refusing: do not open another association now
        if wants_commitment(dest) and not self._stop.is_set():
            self._request_commitments(dest)
        return sent

    def _record(self, batch: _Batch, outcomes: dict[int, Outcome]) -> None:
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

    def _batch_events(self, batch: _Batch) -> None:
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
                err = f"storage commitment failed: reason 0x{reason:04X} ({_status_text(reason)})"
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


# --------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    from node.config import load_config

    p = argparse.ArgumentParser(prog="python -m node.delivery", description="Deliver the outbox until SIGTERM.")
    p.add_argument("--config", required=True)
    p.add_argument("--storage-dir", help="defaults to node.storage_dir from the config")
    p.add_argument("--backoff-base", type=float, default=30.0, help="first retry delay in seconds")
    p.add_argument("--backoff-max", type=float, default=3600.0, help="longest retry delay in seconds")
    p.add_argument("--poll-interval", type=float, default=5.0)
    p.add_argument("--commitment-port", type=int, help="listen here for storage commitment reports")
    p.add_argument("--commitment-timeout", type=float, default=600.0, help="re-ask for commitment after (s)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, check_semantics=False)
    storage_dir = Path(args.storage_dir or cfg.node.storage_dir)
    state = State(storage_dir)
    svc = DeliveryService(state, cfg.destinations, storage_dir, cfg.node.ae_title,
                          backoff=BackoffPolicy(args.backoff_base, args.backoff_max),
                          poll_interval_s=args.poll_interval, commitment_port=args.commitment_port,
                          commitment_timeout_s=args.commitment_timeout)
    done = threading.Event()

    def _signal(signum: int, _frame: object) -> None:
        log.info("delivery: signal %d, stopping", signum)
        done.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    svc.start()
    log.info("delivery: running for %s", ", ".join(svc.destinations) or "no destinations")
    while not done.wait(0.5):
        pass
    svc.stop()
    state.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
