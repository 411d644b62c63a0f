"""Critical-finding notifications: signed webhooks and HL7 v2.5 ORU^R01 over MLLP, with a delivery log.

A critical AI finding is only useful if a human hears about it before the radiologist reaches the
study in the worklist, so the listener hands every critical result to the ``Notifier`` the moment it
lands. Delivery is at-least-once: each (event, channel) pair is a row in the state database that
survives restarts, is retried with exponential backoff and jitter, and ends either ``sent`` or
``failed`` (and ``failed`` is loud: ERROR log and a state event). Receivers de-duplicate with the
event id (webhook header / JSON) or the MSH-10 control id, which stay the same across retries.

Patient identifiers go only into the HL7 PID segment (RIS/EMR needs them to file the result); the
webhook body carries UIDs and the accession number, and nothing here logs patient name or ID at INFO.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import hl7
import requests
from pydantic import BaseModel, ConfigDict, Field, model_validator

from node.state import State
from pipelines.base import Code, PipelineResult

log = logging.getLogger(__name__)

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
REVIEW_NOTE = "AI-generated, requires physician review"
UNVERIFIED_NOTE = ("UNVERIFIED: the model that produced this result has not been verified for clinical use "
                   "at this site")

# DICOM coding scheme designators and their HL7 table 0396 equivalents (most are the same string).
_HL7_SCHEMES = {"SRT": "SCT", "SCT": "SCT", "DCM": "DCM", "LN": "LN", "UCUM": "UCUM"}


# =========================================================================== configuration
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _ChannelBase(_Strict):
    name: str = Field(min_length=1, max_length=64)
    enabled: bool = True
    #: Send events produced by models whose manifest says ``verified: false`` (they are marked UNVERIFIED).
    include_unverified: bool = True
    timeout_s: float = Field(10.0, gt=0, le=300)
    max_attempts: int = Field(20, ge=1, le=1000)
    max_hours: float = Field(24.0, gt=0)
    backoff_base_s: float = Field(5.0, gt=0)
    backoff_max_s: float = Field(600.0, gt=0)
    #: Fraction of each delay drawn at random, so channels that failed together do not retry in lock-step.
    jitter: float = Field(0.25, ge=0, le=1)


class WebhookChannel(_ChannelBase):
    """POST JSON to ``url``; signed with HMAC-SHA256 when a secret is configured."""

    kind: Literal["webhook"]
    url: str
    secret: str | None = None
    #: Read the secret from this environment variable instead of keeping it in the config file.
    secret_env: str | None = None
    headers: dict[str, str] = {}
    verify_tls: bool = True
    #: CA bundle (PEM) for an https endpoint signed by the hospital's own CA.
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> WebhookChannel:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url {self.url!r} must start with http:// or https://")
        if self.secret and self.secret_env:
            raise ValueError("give secret or secret_env, not both")
        return self

    def resolved_secret(self) -> str | None:
        if self.secret_env:
            value = os.environ.get(self.secret_env)
            if not value:
                raise RuntimeError(f"environment variable {self.secret_env} (secret_env of channel "
                                   f"{self.name!r}) is not set")
            return value
        return self.secret


class HL7Channel(_ChannelBase):
    """HL7 v2.5 ORU^R01 over MLLP to a RIS / EMR / interface engine, waiting for the ACK."""

    kind: Literal["hl7"]
    host: str
    port: int = Field(ge=1, le=65535)
    sending_application: str = "AINODE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: Literal["P", "T", "D"] = "P"
    #: OBR-4 universal service identifier as code, text, coding system.
    service_code: str = "18748-4"
    service_text: str = "Diagnostic imaging study"
    service_scheme: str = "LN"
    #: Where the accession number goes: OBR-2 placer order number, OBR-3 filler order number, or both.
    accession_in: Literal["placer", "filler", "both"] = "both"
    #: Issuer (assigning authority) for PID-3 when the study has no IssuerOfPatientID.
    patient_id_authority: str = ""
    #: AR (application reject) means the receiver will never take this message; retrying is usually pointless.
    retry_on_reject: bool = False
    encoding: str = "utf-8"
    #: MLLP over TLS ("MLLP/S"): verify the receiver against ``ca_file`` (or the system CAs), optionally
    #: present a client certificate.
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        ctx.check_hostname = self.check_hostname
        if self.cert_file:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        return ctx


ChannelConfig = Annotated[WebhookChannel | HL7Channel, Field(discriminator="kind")]


class NotifyConfig(_Strict):
    """The ``notify:`` section of the node config."""

    enabled: bool = True
    channels: list[ChannelConfig] = []
    #: How often the background thread looks for due retries when nothing wakes it.
    poll_interval_s: float = Field(2.0, gt=0, le=300)
    #: ``study``: one notification per study, finding and model, however often the study is re-processed;
    #: ``job``: one per processing job (a re-sent series pages again).
    dedupe: Literal["study", "job"] = "study"

    @model_validator(mode="after")
    def _unique(self) -> NotifyConfig:
        names = [c.name for c in self.channels]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate notify channel names {dupes}; give each channel a unique name")
        return self


# =========================================================================== events
@dataclass
class CriticalEvent:
    """One critical finding of one result, with what receivers need to find the study and act on it."""

    study_uid: str
    series_uids: list[str]
    accession_number: str
    patient_id: str  # HL7 only; never logged at INFO, never in the webhook
    finding: str
    code: Code
    probability: float | None
    model_name: str
    model_version: str
    unverified: bool
    received_at: float
    completed_at: float
    detected_at: float
    patient_name: str = ""  # DICOM PN (Family^Given^...), HL7 only
    patient_birth_date: str = ""
    patient_sex: str = ""
    patient_id_issuer: str = ""
    study_datetime: str = ""  # DICOM DA+TM, for OBR-7
    pipeline: str = ""
    job_id: str = ""

    def key(self, per_job: bool = False) -> str:
        """The event id: one notification per (study, finding, model) by default, so a re-sent series
        that reproduces the same critical finding does not page anyone twice; ``per_job`` gives one per job."""
        parts = [self.study_uid, self.code.scheme, self.code.value, self.model_name]
        if per_job:
            parts += [self.job_id, self.model_version, ",".join(sorted(self.series_uids))]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CriticalEvent:
        d = json.loads(text)
        d["code"] = Code(**d["code"])
        return cls(**d)


def events_from_result(result: PipelineResult, study_tags: dict[str, Any],
                       times: dict[str, Any]) -> list[CriticalEvent]:
    """Critical events of a result: one per present critical finding (and per critical evaluation).

    ``study_tags`` holds DICOM keywords (StudyInstanceUID, AccessionNumber, PatientID, PatientName,
    PatientBirthDate, PatientSex, IssuerOfPatientID, StudyDate, StudyTime) and optionally
    ``SeriesInstanceUIDs``: the series processed, used when a finding names no key image.
    ``times`` holds ``received`` (first instance), ``completed`` (study complete) and ``detected``
    (result available; defaults to now) as UNIX times, and optionally ``job_id``.
    A non-critical, refused or unavailable result gives no events.
    """
    if result.status != "ok" or not result.critical:
        return []
    now = time.time()
    study_uid = str(study_tags.get("StudyInstanceUID") or "")
    fallback_series = [str(s) for s in (study_tags.get("SeriesInstanceUIDs") or [])]
    model_name = result.model.name if result.model else result.pipeline
    model_version = result.model.version if result.model else result.pipeline_version
    detected = float(times.get("detected") or now)
    completed = float(times.get("completed") or detected)
    received = float(times.get("received") or completed)
    study_dt = f"{study_tags.get('StudyDate') or ''}{str(study_tags.get('StudyTime') or '').split('.')[0]}"

    def make(label: str, code: Code, probability: float | None, series: list[str]) -> CriticalEvent:
        return CriticalEvent(
            study_uid=study_uid, series_uids=series or fallback_series,
            accession_number=str(study_tags.get("AccessionNumber") or ""),
            patient_id=str(study_tags.get("PatientID") or ""), finding=label, code=code,
            probability=None if probability is None else float(probability), model_name=model_name,
            model_version=model_version, unverified=result.unverified, received_at=received,
            completed_at=completed, detected_at=detected, patient_name=str(study_tags.get("PatientName") or ""),
            patient_birth_date=str(study_tags.get("PatientBirthDate") or ""),
            patient_sex=str(study_tags.get("PatientSex") or ""),
            patient_id_issuer=str(study_tags.get("IssuerOfPatientID") or ""), study_datetime=study_dt,
            pipeline=result.pipeline, job_id=str(times.get("job_id") or ""))

    events = []
    for f in result.findings:
        if f.critical and f.present:
            series = sorted({r.series_uid for r in f.key_images} | {r.image.series_uid for r in f.regions})
            events.append(make(f.label or f.code.meaning, f.code, f.probability, series))
    for e in result.evaluations:
        if e.critical:
            events.append(make(f"{e.name.meaning}: {e.value.meaning}", e.value, None, []))
    return events


# =========================================================================== formatting
def iso_utc(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def webhook_body(event: CriticalEvent, event_id: str, attempt: int, sent_at: float) -> bytes:
    """The JSON the webhook receives; ``sent_at`` is inside the signed body so receivers can reject replays."""
    body = {
        "type": "critical_finding",
        "event_id": event_id,
        "attempt": attempt,
        "study_instance_uid": event.study_uid,
        "series_instance_uids": list(event.series_uids),
        "accession_number": event.accession_number,
        "finding": event.finding,
        "code": {"value": event.code.value, "scheme": event.code.scheme, "meaning": event.code.meaning},
        "probability": event.probability,
        "model": {"name": event.model_name, "version": event.model_version},
        "unverified": event.unverified,
        "note": REVIEW_NOTE + (". " + UNVERIFIED_NOTE if event.unverified else ""),
        "received_at": iso_utc(event.received_at),
        "completed_at": iso_utc(event.completed_at),
        "detected_at": iso_utc(event.detected_at),
        "sent_at": iso_utc(sent_at),
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sign(body: bytes, secret: str) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the exact bytes sent, as GitHub-style receivers verify it."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def _hl7_ts(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y%m%d%H%M%S+0000")


def _esc(value: Any) -> str:
    """Escape HL7 delimiters; non-ASCII text stays as is (the message declares UTF-8 in MSH-18)."""
    out = []
    for c in str(value or ""):
        if c == "\\":
            out.append("\\E\\")
        elif c == "|":
            out.append("\\F\\")
        elif c == "^":
            out.append("\\S\\")
        elif c == "&":
            out.append("\\T\\")
        elif c == "~":
            out.append("\\R\\")
        elif c in "\r\n":
            out.append("\\.br\\")
        else:
            out.append(c)
    return "".join(out)


def _cwe(code: str, text: str, scheme: str) -> str:
    return "^".join([_esc(code), _esc(text), _esc(_HL7_SCHEMES.get(scheme, scheme))])


def _xpn(dicom_pn: str) -> str:
    """DICOM PN (family^given^middle^prefix^suffix, '=' groups) -> HL7 XPN (family^given^middle^suffix^prefix)."""
    groups = dicom_pn.split("=")
    alpha = groups[0] if groups[0] else next((g for g in groups[1:] if g), "")
    parts = (alpha.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    return "^".join(_esc(p) for p in (family, given, middle, suffix, prefix)).rstrip("^")


def build_oru(event: CriticalEvent, channel: HL7Channel, control_id: str, now: float | None = None) -> hl7.Message:
    """An ORU^R01 (v2.5) with one OBR for the study and OBX lines for the finding and its provenance."""
    now = time.time() if now is None else now
    msh = ["MSH", "^~\\&", _esc(channel.sending_application), _esc(channel.sending_facility),
           _esc(channel.receiving_application), _esc(channel.receiving_facility), _hl7_ts(now), "",
           "ORU^R01^ORU_R01", _esc(control_id), channel.processing_id, "2.5", "", "", "", "", "", "UNICODE UTF-8"]
    issuer = event.patient_id_issuer or channel.patient_id_authority
    sex = event.patient_sex if event.patient_sex in ("M", "F", "O") else ("U" if event.patient_sex else "")
    pid = ["PID", "1", "", f"{_esc(event.patient_id)}^^^{_esc(issuer)}".rstrip("^"), "", _xpn(event.patient_name), "",
           _esc(event.patient_birth_date), sex]
    placer = _esc(event.accession_number) if channel.accession_in in ("placer", "both") else ""
    filler = _esc(event.accession_number) if channel.accession_in in ("filler", "both") else ""
    obr = ["OBR", "1", placer, filler, _cwe(channel.service_code, channel.service_text, channel.service_scheme)]
    obr += [""] * 2 + [_esc(event.study_datetime) or _hl7_ts(event.received_at)]  # OBR-7 observation date/time
    obr += [""] * 14 + [_hl7_ts(event.detected_at), "", "", "P"]  # OBR-22 status change, OBR-25 result status
    obs_time = _hl7_ts(event.detected_at)

    def obx(i: int, vtype: str, ident: str, sub: str, value: str, units: str = "", flag: str = "") -> list[str]:
        return ["OBX", str(i), vtype, ident, sub, value, units, "", flag, "", "", "P", "", "", obs_time]

    finding = _cwe(event.code.value, event.code.meaning or event.finding, event.code.scheme)
    rows = [obx(1, "CWE", "121071^Finding^DCM", "1", finding, flag="AA")]
    if event.probability is not None:
        rows.append(obx(len(rows) + 1, "NM", "122157^Probability^DCM", "1", f"{event.probability:.4f}",
                        units="1^no units^UCUM"))
    rows.append(obx(len(rows) + 1, "ST", "111001^Algorithm Name^DCM", "1", _esc(event.model_name)))
    rows.append(obx(len(rows) + 1, "ST", "111003^Algorithm Version^DCM", "1", _esc(event.model_version)))
    rows.append(obx(len(rows) + 1, "ST", "110180^Study Instance UID^DCM", "1", _esc(event.study_uid)))
    rows.append(obx(len(rows) + 1, "TX", "121106^Comment^DCM", "1", _esc(REVIEW_NOTE)))
    if event.unverified:
        rows.append(obx(len(rows) + 1, "TX", "121106^Comment^DCM", "2", _esc(UNVERIFIED_NOTE)))
    # MSH-1 is the field separator itself, so joining gives "MSH|^~\&|..." with MSH-2 as the second item.
    return hl7.parse("\r".join("|".join(seg).rstrip("|") for seg in [msh, pid, obr, *rows]))


# =========================================================================== MLLP transport
SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"


class DeliveryError(Exception):
    """A failed attempt; ``permanent`` ones are not retried."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def mllp_exchange(host: str, port: int, message: bytes, timeout_s: float,
                  ssl_context: ssl.SSLContext | None = None) -> bytes:
    """Send one framed message and return the first framed reply (the ACK), within ``timeout_s`` overall.

    ``hl7.client.MLLPClient`` returns whatever one ``recv`` yields, which may be half an ACK, and has
    no timeout; a RIS that accepts the connection and never answers must not hold a delivery forever.
    """
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=timeout_s) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = ssl_context.wrap_socket(raw, server_hostname=host) if ssl_context is not None else raw
        sock.sendall(SB + message + EB + CR)
        buf = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no ACK within {timeout_s:g} s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError as exc:
                raise TimeoutError(f"no ACK within {timeout_s:g} s") from exc
            if not chunk:
                raise ConnectionError("connection closed before a complete ACK arrived")
            buf += chunk
            end = buf.find(EB)
            if end >= 0:
                start = buf.find(SB)
                return buf[start + 1 if start >= 0 else 0:end]


# =========================================================================== notifier
@dataclass
class _Due:
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
        from pipelines.base import PipelineResult

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
                due = _Due(r["event_id"], r["channel"], r["attempts"], r["control_id"], r["payload"], r["ev_created"])
                try:
                    futures.append(self._pool.submit(self._attempt, due))
                except RuntimeError:  # pool shut down (stopping): leave it for the next start
                    self.state.execute("UPDATE notify_deliveries SET state='pending' WHERE event_id=? AND channel=?",
                                       (due.event_id, due.channel))
        if wait:
            for f in futures:
                f.result()
        return len(futures)

    def _attempt(self, due: _Due) -> None:
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
