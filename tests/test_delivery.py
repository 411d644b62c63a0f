"""Delivery against real peers over real sockets: DCMTK storescp, Orthanc, Orthanc's DICOMweb plugin, and
pynetdicom SCPs where a test needs a peer that misbehaves on cue (rejects, counts, accepts one syntax)."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, build_context, evt
from support.dcmtk import StoreSCP
from support.orthanc import Orthanc, free_port

from node.config import DestinationConfig
from node.delivery import COMMITTED, DEAD, FAILED, PENDING, SENT, BackoffPolicy, DeliveryService
from node.state import State

FAST = BackoffPolicy(base_s=0.3, max_s=1.0, jitter=0.3)
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- helpers
def make_results(storage_dir: Path, n: int, study_uid: str | None = None, job_id: str = "job1",
                 transfer_syntax: str | None = None, sop_class: str | None = None) -> tuple[str, list[Path]]:
    """Write ``n`` result-like objects (CT_small copies with fresh SOP/Series UIDs, one study) into the outbox."""
    study_uid = study_uid or generate_uid()
    base = dcmread(get_testdata_file("CT_small.dcm"))
    series_uid = generate_uid()
    out = storage_dir / "outbox" / job_id
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 901
        ds.InstanceNumber = i + 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if sop_class:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        if transfer_syntax == RLELossless:
            ds.compress(RLELossless)
        elif transfer_syntax:
            ds.file_meta.TransferSyntaxUID = transfer_syntax
        p = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return study_uid, paths


def sop_uids(paths: list[Path]) -> list[str]:
    return sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths)


def dicom_dest(name: str, aet: str, port: int, **kw: object) -> DestinationConfig:
    return DestinationConfig(name=name, kind="dicom", ae_title=aet, host="127.0.0.1", port=port, **kw)


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def states(state: State, destination: str | None = None) -> dict[str, int]:
    sql = "SELECT state, COUNT(*) AS n FROM deliveries"
    params: tuple[str, ...] = ()
    if destination:
        sql += " WHERE destination=?"
        params = (destination,)
    return {r["state"]: r["n"] for r in state.query(sql + " GROUP BY state", params)}


class TestSCP:
    """A pynetdicom Storage SCP on a real socket, scripted per test: which syntaxes it accepts, what status it
    answers, and a count of TCP connections (association attempts) it saw."""

    __test__ = False

    def __init__(self, aet: str = "TESTSCP", sop_classes: tuple[str, ...] = (CTImageStorage,),
                 transfer_syntaxes: list[str] | None = None, require_called_aet: bool = False,
                 status: Callable[[int], int] | None = None):
        self.aet = aet
        self.port = free_port()
        self.connections = 0
        self.received: list[tuple[str, str, object]] = []  # (sop uid, transfer syntax, dataset)
        self._status = status or (lambda n: 0x0000)
        self._lock = threading.Lock()
        self.ae = AE(ae_title=aet)
        self.ae.require_called_aet = require_called_aet
        for sop in sop_classes:
            self.ae.add_supported_context(sop, transfer_syntaxes or [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            code = self._status(len(self.received))
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append((str(ds.SOPInstanceUID), str(event.context.transfer_syntax), ds))
            return code

    def _on_open(self, event: evt.Event) -> None:
        with self._lock:
            self.connections += 1

    def __enter__(self) -> TestSCP:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_OPEN, self._on_open)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    d = tmp_path / "var"
    d.mkdir()
    return d


@pytest.fixture
def state(storage: Path) -> Iterator[State]:
    s = State(storage)
    yield s
    s.close()


def service(state: State, storage: Path, dests: list[DestinationConfig], **kw: object) -> DeliveryService:
    kw.setdefault("backoff", FAST)
    kw.setdefault("poll_interval_s", 0.2)
    return DeliveryService(state, dests, storage, "AINODE", **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- tests
def test_delivers_to_dcmtk_storescp_once_and_is_idempotent(tmp_path: Path, storage: Path, state: State) -> None:
    study, files = make_results(storage, 3)
    with StoreSCP(tmp_path / "scp", aet="STORESCP") as scp:
        svc = service(state, storage, [dicom_dest("scp", "STORESCP", scp.port)])
        assert svc.enqueue(study, "job1", files, ["scp"]) == 3
        assert svc.enqueue(study, "job1", files, ["scp"]) == 0, "same SOP UIDs must not be queued twice"
        assert svc.all_pending() == {"scp": 3}
        assert svc.run_once() == 3
        assert svc.run_once() == 0
        assert scp.sop_uids() == sop_uids(files), "each result exactly once"
        # re-enqueueing after delivery must not re-send either
        assert svc.enqueue(study, "job1", files, ["scp"]) == 0
        assert svc.run_once() == 0
        assert len(scp.files()) == 3
        assert svc.summary(study)["scp"]["delivered"] is True
        # outbox retention: a delivered job's files go once old enough, a job still pending keeps them
        _, waiting = make_results(storage, 1, study_uid=study, job_id="job2")
        svc.enqueue(study, "job2", waiting, ["scp"])
        assert svc.cleanup_outbox(min_age_s=3600) == []
        assert svc.cleanup_outbox(min_age_s=0) == ["job1"]
        assert not (storage / "outbox" / "job1").exists() and waiting[0].exists()
    summary = svc.summary(study)
    assert summary["scp"]["counts"][SENT] == 3 and summary["scp"]["delivered"] is False  # job2 is pending
    assert summary["scp"]["last_error"] is None
    assert summary["scp"]["first_sent"] <= summary["scp"]["last_sent"]
    assert svc.all_pending() == {"scp": 1}


def test_delivers_to_orthanc_in_the_right_study(tmp_path: Path, storage: Path, state: State) -> None:
    study, files = make_results(storage, 4)
    with Orthanc(tmp_path / "pacs", aet="PACS") as pacs:
        svc = service(state, storage, [dicom_dest("pacs", "PACS", pacs.dicom_port)])
        svc.enqueue(study, "job1", files, ["pacs"])
        assert svc.run_once() == 4
        assert pacs.study_uids() == [study]
        assert pacs.sop_uids(study) == sop_uids(files)
        assert len(pacs.instances()) == 4


def test_destination_down_then_back_every_result_arrives_once(tmp_path: Path, storage: Path, state: State) -> None:
    study, first = make_results(storage, 2, job_id="job1")
    _, later = make_results(storage, 3, study_uid=study, job_id="job2")
    with Orthanc(tmp_path / "pacs", aet="PACS") as pacs:
        backoff = BackoffPolicy(base_s=0.3, max_s=4.0, jitter=0.3)
        svc = service(state, storage, [dicom_dest("pacs", "PACS", pacs.dicom_port)], backoff=backoff)
        svc.enqueue(study, "job1", first, ["pacs"])
        assert svc.run_once() == 2
        pacs.stop()
        svc.start()
        try:
            svc.enqueue(study, "job2", later, ["pacs"], priority="stat")
            time.sleep(25)  # a real outage: long enough for the backoff to reach its ceiling
            rows = state.query("SELECT attempts, last_error, state, next_attempt FROM deliveries WHERE job_id='job2'")
            assert all(r["state"] == PENDING for r in rows)
            # 0.3 s doubling to a 4 s ceiling (jitter -30 %) gives ~8-12 attempts in 25 s; a fixed 0.3 s would give ~80
            assert min(r["attempts"] for r in rows) >= 5, "transient failures must be retried"
            assert max(r["attempts"] for r in rows) <= 15, "backoff must grow"
            assert len({r["attempts"] for r in rows}) == 1, "one batch, one association per attempt"
            assert "could not connect" in rows[0]["last_error"]
            assert svc.summary(study)["pacs"]["counts"][PENDING] == 3
            assert svc.summary(study)["pacs"]["next_attempt"] > time.time() - 1
            pacs.start()
            assert wait_for(lambda: states(state).get(SENT) == 5, 10), states(state)
        finally:
            svc.stop()
        assert pacs.study_uids() == [study]
        assert pacs.sop_uids(study) == sop_uids(first + later)
        assert len(pacs.instances()) == 5


def test_orthanc_wrong_called_aet_is_permanent(tmp_path: Path, storage: Path, state: State) -> None:
    study, files = make_results(storage, 2)
    with Orthanc(tmp_path / "pacs", aet="PACS", check_called_aet=True) as pacs:
        svc = service(state, storage, [dicom_dest("pacs", "NOTPACS", pacs.dicom_port)])
        svc.enqueue(study, "job1", files, ["pacs"])
        assert svc.run_once() == 0
        assert svc.run_once() == 0
        assert states(state) == {FAILED: 2}
        err = svc.summary(study)["pacs"]["last_error"]
        assert "rejected permanently" in err and "Called AE title not recognised" in err
        assert pacs.instances() == []


def test_permanent_rejection_no_retry_storm(storage: Path, state: State) -> None:
    study, files = make_results(storage, 3)
    with TestSCP(aet="RIGHT", require_called_aet=True) as scp:
        svc = service(state, storage, [dicom_dest("picky", "WRONG", scp.port)])
        svc.start()
        try:
            svc.enqueue(study, "job1", files, ["picky"])
            wait_for(lambda: states(state) == {FAILED: 3}, 30, 0.05)
            time.sleep(2)  # long enough for a retry storm to show
        finally:
            svc.stop()
        assert scp.connections == 1, f"{scp.connections} association attempts after a permanent rejection"
        assert states(state) == {FAILED: 3}
        assert scp.received == []
        # the operator fixes the called AE title and asks for a retry: same SOP Instance UIDs go out
        fixed = service(state, storage, [dicom_dest("picky", "RIGHT", scp.port)])
        assert fixed.retry_failed(destination="picky") == 3
        assert fixed.run_once() == 3
        assert sorted(u for u, _, _ in scp.received) == sop_uids(files)


def test_unknown_destination_is_shown_not_silently_dropped(storage: Path, state: State) -> None:
    study, files = make_results(storage, 1)
    svc = service(state, storage, [])
    assert svc.enqueue(study, "job1", files, ["nowhere"]) == 1
    assert svc.run_once() == 0
    s = svc.summary(study)["nowhere"]
    assert s["counts"][FAILED] == 1 and "not configured" in s["last_error"]


def test_tcp_nodelay_is_set_on_our_socket(storage: Path) -> None:
    from node.delivery import DimseSender

    with TestSCP() as scp:
        assoc = DimseSender("AINODE").associate(dicom_dest("scp", "TESTSCP", scp.port),
                                                [build_context(CTImageStorage)])
        try:
            assert assoc.is_established
            sock = assoc.dul.socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            assoc.release()


def test_unsupported_sop_class_fails_permanently_others_go(storage: Path, state: State) -> None:
    study, ct = make_results(storage, 2, job_id="ct")
    _, sc = make_results(storage, 1, study_uid=study, job_id="sc", sop_class=SecondaryCaptureImageStorage)
    with TestSCP(sop_classes=(CTImageStorage,)) as scp:
        svc = service(state, storage, [dicom_dest("ctonly", "TESTSCP", scp.port)])
        svc.enqueue(study, "ct", ct, ["ctonly"])
        svc.enqueue(study, "sc", sc, ["ctonly"])
        assert svc.run_once() == 2
        assert svc.run_once() == 0
        assert sorted(u for u, _, _ in scp.received) == sop_uids(ct)
        assert scp.connections == 1
        row = state.one("SELECT state, last_error, attempts FROM deliveries WHERE job_id='sc'")
        assert row["state"] == FAILED and "presentation context" in row["last_error"] and row["attempts"] == 1


def test_no_presentation_context_accepted_is_permanent(storage: Path, state: State) -> None:
    study, sc = make_results(storage, 2, sop_class=SecondaryCaptureImageStorage)
    with TestSCP(sop_classes=(CTImageStorage,)) as scp:
        svc = service(state, storage, [dicom_dest("ctonly", "TESTSCP", scp.port)])
        svc.enqueue(study, "job1", sc, ["ctonly"])
        assert svc.run_once() == 0
        assert states(state) == {FAILED: 2}
        assert "accepted no presentation context" in svc.summary(study)["ctonly"]["last_error"]


def test_status_out_of_resources_is_retried_other_failures_are_not(storage: Path, state: State) -> None:
    study, files = make_results(storage, 2)
    # first C-STORE: 0xA700 (transient), second: 0xA900 (permanent), then success for the retry
    codes = {0: 0xA700, 1: 0xA900}
    with TestSCP(status=lambda n: codes.get(n, 0x0000)) as scp:
        svc = service(state, storage, [dicom_dest("scp", "TESTSCP", scp.port)])
        svc.enqueue(study, "job1", files, ["scp"])
        assert svc.run_once() == 0
        rows = {r["sop_uid"]: r for r in state.query("SELECT * FROM deliveries")}
        first, second = scp.received[0][0], scp.received[1][0]
        assert rows[first]["state"] == PENDING and "0xA700" in rows[first]["last_error"]
        assert rows[second]["state"] == FAILED and "0xA900" in rows[second]["last_error"]
        assert wait_for(lambda: svc.run_once() == 1, 5, 0.2)
        assert states(state) == {SENT: 1, FAILED: 1}
        assert [u for u, _, _ in scp.received] == [first, second, first], "re-send keeps the SOP Instance UID"


def test_transfer_syntax_fallback_to_implicit(storage: Path, state: State) -> None:
    study, rle = make_results(storage, 1, job_id="rle", transfer_syntax=RLELossless)
    _, explicit = make_results(storage, 1, study_uid=study, job_id="explicit")
    assert dcmread(rle[0]).file_meta.TransferSyntaxUID == RLELossless
    with TestSCP(transfer_syntaxes=[ImplicitVRLittleEndian]) as scp:
        svc = service(state, storage, [dicom_dest("implicit", "TESTSCP", scp.port)])
        svc.enqueue(study, "rle", rle, ["implicit"])
        svc.enqueue(study, "explicit", explicit, ["implicit"])
        assert svc.run_once() == 2
        assert {ts for _, ts, _ in scp.received} == {ImplicitVRLittleEndian}
        got = {u: ds for u, _, ds in scp.received}
        for p in rle + explicit:
            orig = dcmread(p)
            assert np.array_equal(got[str(orig.SOPInstanceUID)].pixel_array, orig.pixel_array)
        assert dcmread(rle[0]).file_meta.TransferSyntaxUID == RLELossless, "outbox file must not be rewritten"


def test_stat_goes_first_and_wake_skips_the_poll_interval(storage: Path, state: State) -> None:
    study, routine = make_results(storage, 3, job_id="routine")
    _, stat = make_results(storage, 1, study_uid=study, job_id="stat")
    with TestSCP() as scp:
        svc = service(state, storage, [dicom_dest("scp", "TESTSCP", scp.port)], poll_interval_s=60)
        svc.enqueue(study, "routine", routine, ["scp"])
        svc.enqueue(study, "stat", stat, ["scp"], priority="stat")
        assert svc.run_once() == 4
        assert scp.received[0][0] == sop_uids(stat)[0]
        svc.start()
        try:
            time.sleep(0.3)  # the loop is now waiting out its 60 s poll interval
            _, more = make_results(storage, 1, study_uid=study, job_id="stat2")
            t0 = time.monotonic()
            svc.enqueue(study, "stat2", more, ["scp"], priority="stat")
            assert wait_for(lambda: len(scp.received) == 5, 5, 0.02)
            assert time.monotonic() - t0 < 3
        finally:
            svc.stop()


def test_dead_letter_after_retry_max_hours(storage: Path, state: State) -> None:
    study, files = make_results(storage, 2)
    svc = service(state, storage, [dicom_dest("gone", "GONE", free_port(), retry_max_hours=1.5 / 3600)])
    svc.enqueue(study, "job1", files, ["gone"])
    assert wait_for(lambda: (svc.run_once(), states(state))[1] == {DEAD: 2}, 6, 0.1), states(state)
    s = svc.summary(study)["gone"]
    assert s["counts"][DEAD] == 2 and "could not connect" in s["last_error"] and not s["delivered"]
    assert svc.all_pending() == {"gone": 0}


def test_kill_9_with_results_pending_then_restart_delivers_once(tmp_path: Path, storage: Path) -> None:
    study, files = make_results(storage, 4)
    scp = StoreSCP(tmp_path / "scp", aet="STORESCP")  # unique file names: a duplicate would show
    cfg = tmp_path / "ainode.yaml"
    cfg.write_text(yaml.safe_dump({
        "node": {"ae_title": "AINODE", "storage_dir": str(storage)},
        "destinations": [{"name": "scp", "kind": "dicom", "ae_title": "STORESCP", "host": "127.0.0.1",
                          "port": scp.port}]}))
    st = State(storage)
    DeliveryService(st, [dicom_dest("scp", "STORESCP", scp.port)], storage, "AINODE").enqueue(
        study, "job1", files, ["scp"])
    st.close()
    cmd = [sys.executable, "-m", "node.delivery", "--config", str(cfg), "--storage-dir", str(storage),
           "--backoff-base", "0.3", "--backoff-max", "1", "--poll-interval", "0.2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    logf = open(tmp_path / "delivery.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
    try:
        st = State(storage)
        assert wait_for(lambda: st.one("SELECT MIN(attempts) AS a FROM deliveries")["a"] >= 2, 15), \
            (tmp_path / "delivery.log").read_text()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        before = st.one("SELECT MIN(attempts) AS a FROM deliveries")["a"]
        assert states(st) == {PENDING: 4}
        with scp:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
            assert wait_for(lambda: states(st) == {SENT: 4}, 20), (tmp_path / "delivery.log").read_text()
            time.sleep(1.0)  # a duplicate would be sent now if the restart forgot what it did
            assert scp.sop_uids() == sop_uids(files), "every result exactly once"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        assert st.one("SELECT MIN(attempts) AS a FROM deliveries")["a"] > before, "schedule survived the kill"
        st.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        logf.close()


def test_stow_rs_to_orthanc_dicomweb(tmp_path: Path, storage: Path, state: State) -> None:
    study, files = make_results(storage, 3)
    with Orthanc(tmp_path / "pacs", aet="PACS", dicomweb=True) as pacs:
        dests = [DestinationConfig(name="web", kind="dicomweb", url=pacs.dicomweb_url, bearer_token="t0ken"),
                 DestinationConfig(name="web404", kind="dicomweb", url=pacs.http_url + "/no-such-root"),
                 DestinationConfig(name="webdown", kind="dicomweb", url=f"http://127.0.0.1:{free_port()}/dicom-web")]
        svc = service(state, storage, dests)
        svc.enqueue(study, "job1", files, ["web", "web404", "webdown"])
        assert svc.run_once() == 3
        assert pacs.sop_uids(study) == sop_uids(files)
        assert pacs.study_uids() == [study]
        assert states(state, "web") == {SENT: 3}
        assert states(state, "web404") == {FAILED: 3}
        assert "HTTP 404" in svc.summary(study)["web404"]["last_error"]
        assert states(state, "webdown") == {PENDING: 3}


def test_storage_commitment_with_orthanc(tmp_path: Path, storage: Path, state: State) -> None:
    """Orthanc answers N-ACTION at once and sends the N-EVENT-REPORT later on its own association to the AE
    it knows us as; a result counts as delivered only once committed, and an instance the PACS reports as
    missing is re-sent (same SOP Instance UID) and committed on the next round."""
    study, files = make_results(storage, 3)
    commit_port = free_port()
    peers = {"ainode": {"AET": "AINODE", "Host": "127.0.0.1", "Port": commit_port, "AllowStorageCommitment": True}}
    with Orthanc(tmp_path / "pacs", aet="PACS", peers=peers) as pacs:
        plain = service(state, storage, [dicom_dest("pacs", "PACS", pacs.dicom_port)])
        plain.enqueue(study, "job1", files, ["pacs"])
        assert plain.run_once() == 3
        lost = sop_uids(files)[0]
        victim = next(i for i in pacs.instances() if pacs.instance_tags(i)["SOPInstanceUID"] == lost)
        requests_delete = __import__("requests").delete
        assert requests_delete(f"{pacs.http_url}/instances/{victim}", timeout=10).ok
        assert len(pacs.instances()) == 2

        dest = dicom_dest("pacs", "PACS", pacs.dicom_port, storage_commitment=True)
        svc = service(state, storage, [dest], commitment_port=commit_port, commitment_timeout_s=30)
        assert svc.summary(study)["pacs"]["delivered"] is False, "stored is not committed"
        assert svc.all_pending() == {"pacs": 3}
        svc.start()
        try:
            assert wait_for(lambda: states(state) == {COMMITTED: 3}, 20), (states(state), pacs.log_tail())
        finally:
            svc.stop()
        row = state.one("SELECT attempts FROM deliveries WHERE sop_uid=?", (lost,))
        assert row["attempts"] == 2, "the instance reported missing was re-sent once"
        jobs = [j for j in pacs.get("/jobs?expand") if j["Type"] == "StorageCommitmentScp"]
        assert len(jobs) == 2 and all(j["State"] == "Success" for j in jobs), \
            f"Orthanc's N-EVENT-REPORTs must have been answered with Success: {jobs}"
        assert pacs.sop_uids(study) == sop_uids(files)
        s = svc.summary(study)["pacs"]
        assert s["delivered"] is True and s["counts"][COMMITTED] == 3
        assert svc.all_pending() == {"pacs": 0}


def test_rejected_transient_is_retried_until_accepted(storage: Path, state: State) -> None:
    study, files = make_results(storage, 2)
    with TestSCP() as scp:
        scp.ae._maximum_associations = 0  # every association: A-ASSOCIATE-RJ transient, "local limit exceeded"
        svc = service(state, storage, [dicom_dest("busy", "TESTSCP", scp.port)])
        svc.enqueue(study, "job1", files, ["busy"])
        assert svc.run_once() == 0
        row = state.one("SELECT state, attempts, last_error FROM deliveries LIMIT 1")
        assert row["state"] == PENDING and "rejected transiently" in row["last_error"], dict(row)
        assert "Local limit exceeded" in row["last_error"]
        assert wait_for(lambda: (svc.run_once(), state.one("SELECT MIN(attempts) AS a FROM deliveries")["a"])[1] >= 3,
                        5)
        scp.ae._maximum_associations = 10
        assert wait_for(lambda: (svc.run_once(), states(state))[1] == {SENT: 2}, 5)
        assert sorted(u for u, _, _ in scp.received) == sop_uids(files)


def _tls_files(d: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def cert(cn: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
             issuer_key: ec.EllipticCurvePrivateKey, ca: bool, san: x509.GeneralName | None = None) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san is not None:
            b = b.add_extension(x509.SubjectAlternativeName([san]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    out: dict[str, Path] = {}

    def write(name: str, obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> None:
        p = d / name
        if isinstance(obj, x509.Certificate):
            p.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
        else:
            p.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
        out[name] = p

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("test CA", ca_key, None, ca_key, True)
    srv_key, cli_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    write("ca.crt", ca)
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    write("server.crt", cert("localhost", srv_key, ca, ca_key, False, loopback))
    write("server.key", srv_key)
    write("client.crt", cert("AINODE", cli_key, ca, ca_key, False))
    write("client.key", cli_key)
    return out


def test_dicom_tls_to_orthanc(tmp_path: Path, storage: Path, state: State) -> None:
    from node.config import TLSConfig

    pem = _tls_files(tmp_path / "pki")
    study, files = make_results(storage, 2)
    tls_cfg = {"DicomTlsEnabled": True, "DicomTlsCertificate": str(pem["server.crt"]),
               "DicomTlsPrivateKey": str(pem["server.key"]), "DicomTlsTrustedCertificates": str(pem["ca.crt"]),
               "DicomTlsRemoteCertificateRequired": True}
    with Orthanc(tmp_path / "pacs", aet="PACS", extra=tls_cfg) as pacs:
        tls = TLSConfig(cert=pem["client.crt"], key=pem["client.key"], ca=pem["ca.crt"])
        svc = service(state, storage, [dicom_dest("tls", "PACS", pacs.dicom_port, tls=tls),
                                       dicom_dest("plain", "PACS", pacs.dicom_port)])
        svc.enqueue(study, "job1", files, ["tls", "plain"])
        assert svc.run_once() == 2
        assert states(state, "tls") == {SENT: 2}
        assert states(state, "plain") == {PENDING: 2}, "a TLS-only PACS must not take plain DICOM"
        assert pacs.sop_uids(study) == sop_uids(files)


def test_stow_rs_sends_bearer_token_and_classifies_http_status(storage: Path, state: State) -> None:
    """Orthanc ignores bearer tokens, so a small HTTP server stands in for a token-checking gateway."""
    import http.server

    seen: list[str | None] = []
    answers = iter([503, 200])  # first POST: service unavailable (retry), then accepted

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append(self.headers.get("Authorization"))
            token_ok = self.headers.get("Authorization") == "Bearer t0ken"
            code = next(answers, 200) if token_ok else 401
            body = b"{}" if code == 200 else b""
            self.send_response(code)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/dicom-web"
        study, files = make_results(storage, 2)
        svc = service(state, storage, [DestinationConfig(name="gw", kind="dicomweb", url=url, bearer_token="t0ken"),
                                       DestinationConfig(name="bad", kind="dicomweb", url=url, bearer_token="nope")])
        svc.enqueue(study, "job1", files, ["gw", "bad"])
        assert svc.run_once() == 0
        assert states(state, "gw") == {PENDING: 2} and "HTTP 503" in svc.summary(study)["gw"]["last_error"]
        assert states(state, "bad") == {FAILED: 2} and "HTTP 401" in svc.summary(study)["bad"]["last_error"]
        assert wait_for(lambda: (svc.run_once(), states(state, "gw"))[1] == {SENT: 2}, 5)
        assert seen.count("Bearer t0ken") == 2 and seen.count("Bearer nope") == 1
    finally:
        srv.shutdown()


def test_storage_commitment_report_on_the_same_association(storage: Path, state: State) -> None:
    """Some PACS answer on the association that carried the N-ACTION: the SCU must take it there too."""
    from node.delivery import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH

    study, files = make_results(storage, 2)
    reports: list[int] = []

    def on_action(event: evt.Event) -> tuple[int, None]:
        req = event.action_information
        report = Dataset()
        report.TransactionUID = req.TransactionUID
        report.ReferencedSOPSequence = list(req.ReferencedSOPSequence)[:1]
        failed = Dataset()
        failed.ReferencedSOPClassUID = req.ReferencedSOPSequence[1].ReferencedSOPClassUID
        failed.ReferencedSOPInstanceUID = req.ReferencedSOPSequence[1].ReferencedSOPInstanceUID
        failed.FailureReason = 0x0122  # SOP class not supported: re-sending cannot help
        report.FailedSOPSequence = [failed]
        assoc = event.assoc

        def send() -> None:
            time.sleep(0.2)  # after our N-ACTION-RSP has gone out
            status, _ = assoc.send_n_event_report(report, 2, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE)
            reports.append(int(status.Status) if "Status" in status else -1)

        threading.Thread(target=send, daemon=True).start()
        return 0x0000, None

    with TestSCP() as scp:
        scp.server.shutdown()
        scp.ae.add_supported_context(STORAGE_COMMITMENT_PUSH, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        scp.server = scp.ae.start_server(("127.0.0.1", scp.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, scp._on_store), (evt.EVT_N_ACTION, on_action)])
        dest = dicom_dest("scp", "TESTSCP", scp.port, storage_commitment=True)
        svc = service(state, storage, [dest])
        svc.enqueue(study, "job1", files, ["scp"])
        assert svc.run_once() == 2
        assert reports == [0x0000], "our SCU answered the N-EVENT-REPORT on its own association"
        assert states(state) == {COMMITTED: 1, FAILED: 1}
        assert "0x0122" in svc.summary(study)["scp"]["last_error"]


def test_kill_9_mid_delivery_to_orthanc_no_duplicates(tmp_path: Path, storage: Path) -> None:
    """Killed in the middle of a batch: rows already recorded stay sent, the rest (and perhaps the one in
    flight) go again with the same SOP Instance UIDs, so the PACS ends with each result exactly once."""
    study, files = make_results(storage, 40)
    with Orthanc(tmp_path / "pacs", aet="PACS") as pacs:
        dest = {"name": "pacs", "kind": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}
        cfg = tmp_path / "ainode.yaml"
        cfg.write_text(yaml.safe_dump({"node": {"ae_title": "AINODE", "storage_dir": str(storage)},
                                       "destinations": [dest]}))
        st = State(storage)
        DeliveryService(st, [DestinationConfig(**dest)], storage, "AINODE", batch_size=40).enqueue(
            study, "job1", files, ["pacs"])
        cmd = [sys.executable, "-m", "node.delivery", "--config", str(cfg), "--backoff-base", "0.3",
               "--backoff-max", "1", "--poll-interval", "0.2"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(tmp_path / "delivery.log", "ab") as logf:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
            try:
                assert wait_for(lambda: states(st).get(SENT, 0) >= 3, 20, 0.01), (tmp_path / "delivery.log").read_text()
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
                partial = states(st).get(SENT, 0)
                assert 3 <= partial < 40, f"kill came too late to test anything ({partial} sent)"
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
                assert wait_for(lambda: states(st) == {SENT: 40}, 30), states(st)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(15) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert pacs.sop_uids(study) == sop_uids(files)
        assert len(pacs.instances()) == 40
        st.close()
