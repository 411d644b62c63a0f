"""Critical-finding notifications over real sockets: a local HTTP server and a local MLLP listener."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from support.mllp import MLLPListener

from node.notify import (
    REVIEW_NOTE,
    UNVERIFIED_NOTE,
    CriticalEvent,
    HL7Channel,
    Notifier,
    NotifyConfig,
    WebhookChannel,
    events_from_result,
)
from node.state import State
from pipelines.base import Code, Evaluation, Finding, ImageRef, ModelIdentity, PipelineResult

ICH = Code("1386000", "SCT", "Intracranial hemorrhage")
SECRET = "s3cret-for-tests"
STUDY_TAGS = {
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1", "AccessionNumber": "ACC0042", "PatientID": "PAT-9876",
    "PatientName": "Doe^Jane^^Dr", "PatientBirthDate": "19500102", "PatientSex": "F", "StudyDate": "20261123",
    "StudyTime": "101500.123", "SeriesInstanceUIDs": ["1.2.826.0.1.3680043.8.498.2"],
}
KEY = ImageRef("1.2.826.0.1.3680043.8.498.3", "1.2.826.0.1.3680043.8.498.4", "1.2.840.10008.5.1.4.1.1.2")


# --------------------------------------------------------------------------- helpers
class _Hook(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int = 0, fail_first: int = 0, status: int = 503):
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        self.fail_status = status
        self.cond = threading.Condition()
        super().__init__(("127.0.0.1", port), _HookHandler)

    def wait_for(self, n: int, timeout: float = 10.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.requests) >= n, timeout), \
                f"expected {n} webhook request(s), got {len(self.requests)}"


class _HookHandler(http.server.BaseHTTPRequestHandler):
    server: _Hook

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.cond:
            self.server.requests.append(({k: v for k, v in self.headers.items()}, body))
            n = len(self.server.requests)
            self.server.cond.notify_all()
        code = self.server.fail_status if n <= self.server.fail_first else 204
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[_Hook]:
    srv = _Hook()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def state(tmp_path) -> Iterator[State]:
    s = State(tmp_path)
    yield s
    s.close()


def _webhook(url: str, **kw: object) -> WebhookChannel:
    base = dict(kind="webhook", name="pager", url=url, secret=SECRET, timeout_s=2, backoff_base_s=0.05,
                backoff_max_s=0.2, jitter=0)
    base.update(kw)
    return WebhookChannel(**base)


def _hl7(port: int, **kw: object) -> HL7Channel:
    base = dict(kind="hl7", name="ris", host="127.0.0.1", port=port, sending_facility="HOSP",
                receiving_application="RIS", receiving_facility="HOSP", timeout_s=2, backoff_base_s=0.05,
                backoff_max_s=0.2, jitter=0)
    base.update(kw)
    return HL7Channel(**base)


def _result(critical: bool = True, present: bool = True, verified: bool = False, probability: float = 0.93
            ) -> PipelineResult:
    return PipelineResult(
        pipeline="classifier", pipeline_version="1.0.0",
        findings=[Finding(code=ICH, label="Intracranial haemorrhage", present=present, probability=probability,
                          critical=critical, key_images=[KEY]),
                  Finding(code=Code("21454007", "SCT", "Subarachnoid hemorrhage"), label="SAH", present=True,
                          probability=0.2, critical=False)],
        model=ModelIdentity("head-ct-ich", "2.1", verified=verified))


def _event(**kw: object) -> CriticalEvent:
    now = time.time()
    [ev] = events_from_result(_result(**kw), STUDY_TAGS, {"received": now - 90, "completed": now - 30,
                                                          "detected": now - 1, "job_id": f"job-{now}"})
    return ev


def _wait_state(notifier: Notifier, study_uid: str, want: str, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = notifier.log(study_uid)
        if rows and all(r["state"] == want for r in rows):
            return rows
        notifier.run_once()
        time.sleep(0.02)
    raise AssertionError(f"deliveries did not reach {want!r}: {notifier.log(study_uid)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- events
def test_events_only_for_present_critical_findings() -> None:
    tags, times = STUDY_TAGS, {"completed": 100.0}
    assert events_from_result(_result(critical=False), tags, times) == []
    assert events_from_result(_result(critical=True, present=False), tags, times) == []
    unavailable = PipelineResult("classifier", "1.0.0", status="model_unavailable", reason="no weights")
    assert events_from_result(unavailable, tags, times) == []
    [ev] = events_from_result(_result(verified=False), tags, {"received": 10.0, "completed": 100.0,
                                                              "detected": 130.0})
    assert (ev.study_uid, ev.accession_number, ev.patient_id) == (tags["StudyInstanceUID"], "ACC0042", "PAT-9876")
    assert ev.series_uids == [KEY.series_uid]  # from the finding's key images, not the fallback
    assert (ev.code, ev.probability, ev.model_name, ev.model_version) == (ICH, 0.93, "head-ct-ich", "2.1")
    assert ev.unverified is True
    assert (ev.received_at, ev.completed_at, ev.detected_at) == (10.0, 100.0, 130.0)
    assert events_from_result(_result(verified=True), tags, times)[0].unverified is False
    quality = PipelineResult("qa", "1", evaluations=[Evaluation(Code("111101", "DCM", "Image quality"),
                                                                Code("F", "99AINODE", "fail"), critical=True)])
    [qe] = events_from_result(quality, tags, times)
    assert qe.series_uids == tags["SeriesInstanceUIDs"] and qe.probability is None


def test_config_schema() -> None:
    text = """
    channels:
      - {kind: webhook, name: pager, url: "https://alerts.example.org/ainode", secret_env: AINODE_HOOK_SECRET}
      - {kind: hl7, name: ris, host: ris.example.org, port: 2575, receiving_application: RIS,
         receiving_facility: HOSP, max_attempts: 50}
    """
    cfg = NotifyConfig.model_validate(yaml.safe_load(text))
    assert [type(c) for c in cfg.channels] == [WebhookChannel, HL7Channel]
    assert cfg.channels[1].max_attempts == 50 and cfg.channels[1].processing_id == "P"
    with pytest.raises(ValidationError, match="extra"):
        NotifyConfig.model_validate({"channels": [{"kind": "hl7", "name": "a", "host": "h", "port": 1, "colour": 1}]})
    with pytest.raises(ValidationError, match="duplicate"):
        NotifyConfig.model_validate({"channels": [{"kind": "webhook", "name": "a", "url": "http://x"}] * 2})
    with pytest.raises(ValidationError):
        NotifyConfig.model_validate({"channels": [{"kind": "email", "name": "a"}]})
    with pytest.raises(ValidationError, match="http"):
        WebhookChannel(kind="webhook", name="a", url="ftp://x")


# --------------------------------------------------------------------------- webhook
def test_webhook_delivered_signed_and_logged(state: State, hook: _Hook, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    notifier = Notifier(state, [_webhook(f"http://127.0.0.1:{hook.server_port}/hook")])
    ev = _event()
    t0 = time.perf_counter()
    event_id = notifier.notify(ev)
    assert time.perf_counter() - t0 < 0.5  # non-blocking for the listener
    hook.wait_for(1)
    headers, body = hook.requests[0]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-AINode-Signature"], expected)
    assert abs(int(headers["X-AINode-Timestamp"]) - time.time()) < 5
    assert headers["X-AINode-Event-Id"] == event_id
    payload = json.loads(body)
    assert payload["study_instance_uid"] == STUDY_TAGS["StudyInstanceUID"]
    assert payload["series_instance_uids"] == [KEY.series_uid]
    assert payload["accession_number"] == "ACC0042"
    assert payload["finding"] == "Intracranial haemorrhage"
    assert payload["code"] == {"value": "1386000", "scheme": "SCT", "meaning": "Intracranial hemorrhage"}
    assert payload["probability"] == pytest.approx(0.93)
    assert payload["model"] == {"name": "head-ct-ich", "version": "2.1"}
    assert payload["unverified"] is True and "UNVERIFIED" in payload["note"]
    for k in ("received_at", "completed_at", "detected_at", "sent_at"):
        assert payload[k].endswith("Z") and payload[k][:4].isdigit()
    assert "PAT-9876" not in body.decode() and "Doe" not in body.decode()  # no patient identifiers
    [row] = _wait_state(notifier, ev.study_uid, "sent")
    assert row["attempts"] == 1 and row["channel"] == "pager" and row["last_error"] is None
    assert row["latency_s"] == pytest.approx(row["sent_at"] - ev.completed_at)
    assert 29 < row["latency_s"] < 60  # completed 30 s before the test sent it
    assert not any("PAT-9876" in r.getMessage() or "Doe^Jane" in r.getMessage() for r in caplog.records)
    notifier.stop()


def test_webhook_503_is_retried_with_backoff_then_delivered(state: State, tmp_path) -> None:
    srv = _Hook(fail_first=2, status=503)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        notifier = Notifier(state, [_webhook(f"http://127.0.0.1:{srv.server_port}/")])
        ev = _event()
        notifier.record(ev)
        assert notifier.run_once() == 1
        [row] = notifier.log(ev.study_uid)
        assert (row["state"], row["attempts"]) == ("pending", 1) and "503" in row["last_error"]
        assert row["next_attempt"] > row["last_attempt"]  # not due at once: backoff
        assert notifier.run_once() == 0
        [row] = _wait_state(notifier, ev.study_uid, "sent")
        assert row["attempts"] == 3 and row["last_error"] is None
        bodies = [json.loads(b) for _, b in srv.requests]
        assert [b["attempt"] for b in bodies] == [1, 2, 3]
        assert len({b["event_id"] for b in bodies}) == 1  # receivers de-duplicate on it
    finally:
        srv.shutdown()
        srv.server_close()


def test_webhook_endpoint_down_then_up(state: State) -> None:
    port = _free_port()
    notifier = Notifier(state, [_webhook(f"http://127.0.0.1:{port}/late", backoff_base_s=0.1)], poll_interval_s=0.05)
    notifier.start()
    ev = _event()
    notifier.notify(ev)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not notifier.log(ev.study_uid)[0]["attempts"]:
        time.sleep(0.02)
    [row] = notifier.log(ev.study_uid)
    assert row["state"] == "pending" and "Connection" in row["last_error"]
    srv = _Hook(port=port)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        srv.wait_for(1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and notifier.log(ev.study_uid)[0]["state"] != "sent":
            time.sleep(0.02)
        [row] = notifier.log(ev.study_uid)
        assert row["state"] == "sent" and row["attempts"] >= 2
    finally:
        notifier.stop()
        srv.shutdown()
        srv.server_close()


def test_webhook_gives_up_after_max_attempts(state: State) -> None:
    srv = _Hook(fail_first=99, status=500)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        notifier = Notifier(state, [_webhook(f"http://127.0.0.1:{srv.server_port}/", max_attempts=3)])
        ev = _event()
        notifier.record(ev)
        [row] = _wait_state(notifier, ev.study_uid, "failed")
        assert row["attempts"] == 3 and "HTTP 500" in row["last_error"] and len(srv.requests) == 3
        assert state.one("SELECT COUNT(*) AS n FROM events WHERE kind='notify_failed'")["n"] == 1
    finally:
        srv.shutdown()
        srv.server_close()


def test_record_is_idempotent_and_respects_channel_filters(state: State, hook: _Hook) -> None:
    url = f"http://127.0.0.1:{hook.server_port}/"
    notifier = Notifier(state, [_webhook(url), _webhook(url, name="verified-only", include_unverified=False),
                                _webhook(url, name="off", enabled=False)])
    ev = _event(verified=False)
    assert notifier.record(ev) == notifier.record(ev)
    rows = {r["channel"]: r for r in notifier.log(ev.study_uid)}
    assert {k: r["state"] for k, r in rows.items()} == {"pager": "pending", "verified-only": "skipped",
                                                         "off": "skipped"}
    assert notifier.run_once() == 1
    hook.wait_for(1)
    assert len(hook.requests) == 1


def test_backoff_is_exponential_capped_and_jittered(state: State) -> None:
    ch = _webhook("http://127.0.0.1:9/", backoff_base_s=2, backoff_max_s=30, jitter=0.25)
    n = Notifier(state, [ch])
    for attempt, full in [(1, 2), (2, 4), (3, 8), (4, 16), (5, 30), (9, 30)]:
        delays = [n.backoff(ch, attempt) for _ in range(50)]
        assert all(0.75 * full <= d <= full for d in delays)
        assert len(set(delays)) > 1


# --------------------------------------------------------------------------- HL7 / MLLP
def _f(seg, field: int, component: int = 1) -> str:
    """Field value (unescaped) of a parsed segment, whether or not it has components."""
    return str(seg.extract_field(1, field, 1, component))


def test_oru_r01_over_mllp(state: State) -> None:
    with MLLPListener() as rx:
        notifier = Notifier(state, [_hl7(rx.port)])
        ev = _event(verified=False)
        notifier.notify(ev)
        [msg] = rx.wait_for(1)
        [row] = _wait_state(notifier, ev.study_uid, "sent")
    msh = msg.segment("MSH")
    assert [_f(msh, 9, i) for i in (1, 2)] == ["ORU", "R01"]
    assert _f(msh, 12) == "2.5" and _f(msh, 11) == "P"
    assert _f(msh, 10) == row["control_id"] and len(row["control_id"]) <= 20
    assert (_f(msh, 3), _f(msh, 5), _f(msh, 6)) == ("AINODE", "RIS", "HOSP")
    pid = msg.segment("PID")
    assert _f(pid, 3) == "PAT-9876"
    assert [_f(pid, 5, i) for i in (1, 2, 5)] == ["Doe", "Jane", "Dr"]
    assert (_f(pid, 7), _f(pid, 8)) == ("19500102", "F")
    obr = msg.segment("OBR")
    assert _f(obr, 2) == "ACC0042" and _f(obr, 3) == "ACC0042"
    assert _f(obr, 4) == "18748-4" and _f(obr, 7) == "20261123101500"
    assert _f(obr, 25) == "P"
    obx = {(_f(o, 3), _f(o, 4)): o for o in msg.segments("OBX")}
    finding = obx[("121071", "1")]
    assert _f(finding, 2) == "CWE"
    assert [_f(finding, 5, i) for i in (1, 2, 3)] == ["1386000", "Intracranial hemorrhage", "SCT"]
    assert _f(finding, 8) == "AA" and _f(finding, 11) == "P"
    prob = obx[("122157", "1")]
    assert _f(prob, 2) == "NM" and float(_f(prob, 5)) == pytest.approx(0.93)
    assert _f(obx[("111001", "1")], 5) == "head-ct-ich" and _f(obx[("111003", "1")], 5) == "2.1"
    assert _f(obx[("110180", "1")], 5) == STUDY_TAGS["StudyInstanceUID"]
    comments = [_f(o, 5) for o in msg.segments("OBX") if _f(o, 3) == "121106"]
    assert REVIEW_NOTE in comments and UNVERIFIED_NOTE in comments
    assert all(_f(o, 11) == "P" for o in msg.segments("OBX"))
    assert row["attempts"] == 1 and row["latency_s"] > 0


def test_hl7_escapes_delimiters_in_values(state: State) -> None:
    tags = dict(STUDY_TAGS, PatientName="O|Brien^Mary&Ann", AccessionNumber="A^1")
    [ev] = events_from_result(_result(), tags, {"completed": time.time()})
    with MLLPListener() as rx:
        notifier = Notifier(state, [_hl7(rx.port)])
        notifier.record(ev)
        notifier.run_once()
        [msg] = rx.wait_for(1)
    assert _f(msg.segment("PID"), 5, 1) == "O|Brien" and _f(msg.segment("PID"), 5, 2) == "Mary&Ann"
    assert _f(msg.segment("OBR"), 2) == "A^1"


def test_oru_verified_model_has_no_unverified_note(state: State) -> None:
    with MLLPListener() as rx:
        notifier = Notifier(state, [_hl7(rx.port)])
        notifier.record(_event(verified=True))
        notifier.run_once()
        [msg] = rx.wait_for(1)
    assert "UNVERIFIED" not in str(msg) and REVIEW_NOTE in str(msg)


def test_negative_ack_is_retried_with_same_control_id(state: State) -> None:
    with MLLPListener(acks=["AE", "AA"]) as rx:
        notifier = Notifier(state, [_hl7(rx.port)])
        ev = _event()
        notifier.record(ev)
        notifier.run_once()
        [row] = notifier.log(ev.study_uid)
        assert row["state"] == "pending" and "AE" in row["last_error"]
        [row] = _wait_state(notifier, ev.study_uid, "sent")
        assert row["attempts"] == 2 and rx.answered == ["AE", "AA"]
        assert {_f(m.segment("MSH"), 10) for m in rx.messages} == {row["control_id"]}


def test_application_reject_is_not_retried(state: State) -> None:
    with MLLPListener(acks=["AR"]) as rx:
        notifier = Notifier(state, [_hl7(rx.port)])
        ev = _event()
        notifier.record(ev)
        [row] = _wait_state(notifier, ev.study_uid, "failed")
        assert row["attempts"] == 1 and "AR" in row["last_error"] and len(rx.messages) == 1


def test_missing_ack_times_out_and_stays_pending(state: State) -> None:
    with MLLPListener(silent=True) as rx:
        notifier = Notifier(state, [_hl7(rx.port, timeout_s=0.3)])
        ev = _event()
        notifier.record(ev)
        t0 = time.perf_counter()
        notifier.run_once()
        assert time.perf_counter() - t0 < 2
        [row] = notifier.log(ev.study_uid)
        assert row["state"] == "pending" and "ACK" in row["last_error"] and len(rx.messages) == 1


def test_channels_are_independent_and_restart_resumes(state: State, hook: _Hook, tmp_path) -> None:
    port = _free_port()  # RIS down
    channels = [_webhook(f"http://127.0.0.1:{hook.server_port}/"), _hl7(port, backoff_base_s=0.01)]
    notifier = Notifier(state, channels)
    ev = _event()
    notifier.record(ev)
    notifier.run_once()
    states = {r["channel"]: r["state"] for r in notifier.log(ev.study_uid)}
    assert states == {"pager": "sent", "ris": "pending"}
    notifier.stop()
    state.execute("UPDATE notify_deliveries SET state='sending' WHERE channel='ris'")  # as if killed mid-send
    with MLLPListener(port=port) as rx:
        again = Notifier(state, channels)  # a restarted listener
        rows = _wait_state(again, ev.study_uid, "sent")
        assert len(rx.messages) == 1 and len(hook.requests) == 1
        assert {r["channel"] for r in rows} == {"pager", "ris"}


def test_one_notification_per_study_finding_unless_per_job(state: State, hook: _Hook) -> None:
    url = f"http://127.0.0.1:{hook.server_port}/"
    first, rerun = _event(), _event()  # same study and finding, different jobs (a re-sent series)
    assert first.job_id != rerun.job_id
    notifier = Notifier(state, [_webhook(url)])
    assert notifier.record(first) == notifier.record(rerun)
    assert len(notifier.log(first.study_uid)) == 1
    per_job = Notifier(state, NotifyConfig(channels=[_webhook(url, name="per-job")], dedupe="job"))
    assert per_job.record(first) != per_job.record(rerun)


def test_notify_job_reads_result_and_study_facts(state: State, tmp_path) -> None:
    """The listener hook: job row + summary in, ORU out with the patient from the spooled header."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = KEY.sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = KEY.sop_instance_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_TAGS["StudyInstanceUID"], KEY.series_uid
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "MRN-555", "Roe^Richard"
    ds.AccessionNumber, ds.StudyDate, ds.StudyTime = "ACC-777", "20261123", "080000"
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    state.record_instance(study_uid=ds.StudyInstanceUID, series_uid=KEY.series_uid, sop_uid=KEY.sop_instance_uid,
                          path=str(path), size=path.stat().st_size, calling_ae="CT1", assoc_id="a1", modality="CT",
                          sop_class_uid=KEY.sop_class_uid, expected=None, series_tags={})
    completed = time.time() - 12
    state.execute("UPDATE studies SET completed=? WHERE study_uid=?", (completed, ds.StudyInstanceUID))
    result_dir = tmp_path / "results" / "job-1"
    _result().save(result_dir)
    with MLLPListener() as rx:
        notifier = Notifier(state, [_hl7(rx.port)])
        ids = notifier.notify_job({"job_id": "job-1", "study_uid": ds.StudyInstanceUID, "result_dir": str(result_dir)},
                                  {"critical": True, "finished": time.time() - 2})
        assert len(ids) == 1
        [msg] = rx.wait_for(1)
        [row] = _wait_state(notifier, ds.StudyInstanceUID, "sent")
    assert _f(msg.segment("PID"), 3) == "MRN-555" and _f(msg.segment("PID"), 5) == "Roe"
    assert _f(msg.segment("OBR"), 3) == "ACC-777" and _f(msg.segment("OBR"), 7) == "20261123080000"
    assert 12 <= row["latency_s"] < 30
    assert notifier.notify_job({"job_id": "job-2", "study_uid": ds.StudyInstanceUID, "result_dir": str(result_dir)},
                               {"critical": True}) == ids  # same study and finding: not sent again
    _result(critical=False).save(tmp_path / "results" / "job-3")
    assert notifier.notify_job({"job_id": "job-3", "study_uid": ds.StudyInstanceUID,
                                "result_dir": str(tmp_path / "results" / "job-3")}, {}) == []


def test_hung_channel_does_not_delay_other_channels(state: State, hook: _Hook) -> None:
    with MLLPListener(silent=True) as rx:  # a RIS that accepts and never answers
        notifier = Notifier(state, [_hl7(rx.port, timeout_s=3), _webhook(f"http://127.0.0.1:{hook.server_port}/")],
                            poll_interval_s=0.05)
        notifier.start()
        try:
            t0 = time.perf_counter()
            notifier.notify(_event())
            hook.wait_for(1, timeout=2)
            first = time.perf_counter() - t0
            second = _event(verified=True)  # another study arriving while the RIS still hangs
            second.study_uid = "1.2.826.0.1.3680043.8.498.99"
            notifier.notify(second)
            hook.wait_for(2, timeout=2)
            assert first < 1.0 and time.perf_counter() - t0 < 2.0
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and notifier.log(second.study_uid)[0]["state"] != "sent":
                time.sleep(0.01)
            states = {r["channel"]: r["state"] for r in notifier.log(second.study_uid)}
            assert states["pager"] == "sent" and states["ris"] in ("sending", "pending")
        finally:
            notifier.stop()


def test_secret_from_environment(state: State, hook: _Hook, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{hook.server_port}/"
    notifier = Notifier(state, [_webhook(url, secret=None, secret_env="AINODE_TEST_HOOK_SECRET")])
    ev = _event()
    notifier.record(ev)
    monkeypatch.delenv("AINODE_TEST_HOOK_SECRET", raising=False)
    notifier.run_once()  # unset variable: an attempt that fails with a reason, not a crash
    [row] = notifier.log(ev.study_uid)
    assert row["state"] == "pending" and "AINODE_TEST_HOOK_SECRET" in row["last_error"] and not hook.requests
    monkeypatch.setenv("AINODE_TEST_HOOK_SECRET", "from-env")
    _wait_state(notifier, ev.study_uid, "sent")
    headers, body = hook.requests[0]
    assert headers["X-AINode-Signature"] == "sha256=" + hmac.new(b"from-env", body, hashlib.sha256).hexdigest()


def test_notify_job_never_raises(state: State, tmp_path) -> None:
    notifier = Notifier(state, [])
    assert notifier.notify_job({"job_id": "j", "study_uid": "1.2.3", "result_dir": str(tmp_path / "gone")}, {}) == []
    assert state.one("SELECT COUNT(*) AS n FROM events WHERE kind='notify_failed'")["n"] == 1


def _self_signed(tmp_path) -> tuple[Path, Path]:
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ris")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "ris.pem", tmp_path / "ris.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_oru_over_mllp_tls(state: State, tmp_path) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    with MLLPListener(ssl_context=server_ctx) as rx:
        trusted = Notifier(state, [_hl7(rx.port, tls=True, ca_file=cert)])
        ev = _event()
        trusted.record(ev)
        [row] = _wait_state(trusted, ev.study_uid, "sent")
        [msg] = rx.wait_for(1)
        assert _f(msg.segment("OBR"), 2) == "ACC0042" and row["attempts"] == 1
    untrusted_state = State(tmp_path / "other")
    try:
        with MLLPListener(ssl_context=server_ctx) as rx:
            untrusted = Notifier(untrusted_state, [_hl7(rx.port, tls=True)])  # system CAs do not know it
            untrusted.record(ev)
            untrusted.run_once()
            [row] = untrusted.log(ev.study_uid)
            assert row["state"] == "pending" and "CERTIFICATE_VERIFY_FAILED" in row["last_error"]
            assert rx.messages == []
    finally:
        untrusted_state.close()


def test_read_only_log_for_other_processes(state: State, tmp_path) -> None:
    import sqlite3

    from node.notify import notification_log

    conn = sqlite3.connect(tmp_path / "state.db")
    conn.row_factory = sqlite3.Row
    assert notification_log(conn) == []  # before any Notifier created the tables
    notifier = Notifier(state, [_webhook("http://127.0.0.1:9/")])
    ev = _event()
    notifier.record(ev)
    [row] = notification_log(conn, ev.study_uid)
    assert row["state"] == "pending" and row["channel"] == "pager" and notification_log(state) == notifier.log()
    conn.close()
