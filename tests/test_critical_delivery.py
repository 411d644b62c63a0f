"""A critical study's results overtake routine results already queued behind a PACS that was down.

Criticality is known only after inference, so it cannot reorder the processing queue; it can reorder
delivery. Twenty routine studies wait (failed, backing off) for a DCMTK storescp that is stopped; the
critical study's objects are queued last, as ``stat`` (what the listener does for a critical summary),
and fail too. When the PACS is back, the first association carries the critical SR first, although
the routine rows fell due earlier and the critical rows' own backoff has not ended yet.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage
from support.dcmtk import StoreSCP
from test_delivery import dicom_dest, make_results, service, states

from node.delivery import PENDING, SENT, BackoffPolicy
from node.state import State


def test_critical_results_overtake_twenty_routine_studies_when_the_pacs_returns(tmp_path: Path) -> None:
    storage = tmp_path / "var"
    storage.mkdir()
    state = State(storage)
    try:
        _run(tmp_path, storage, state)
    finally:
        state.close()


def _run(tmp_path: Path, storage: Path, state: State) -> None:
    routine = [make_results(storage, 4, job_id=f"routine{i}") for i in range(20)]
    crit_study, crit_files = make_results(storage, 2, job_id="critical", sop_class=ComprehensiveSRStorage)
    pacs = StoreSCP(tmp_path / "pacs", aet="PACS")
    backoff = BackoffPolicy(base_s=4.0, max_s=60.0, jitter=0.0)  # no jitter: the test controls who is due
    svc = service(state, storage, [dicom_dest("pacs", "PACS", pacs.port)], backoff=backoff, poll_interval_s=60)
    for i, (study, files) in enumerate(routine):
        svc.enqueue(study, f"routine{i}", files, ["pacs"])
    t0 = time.time()
    while state.one("SELECT COUNT(*) AS n FROM deliveries WHERE attempts=0")["n"]:
        assert svc.run_once() == 0  # PACS down: every routine row fails once (one batch of 50 per pass)
    assert time.time() - t0 < 3.0, "routine attempts took too long for the timing below"
    time.sleep(1.5)
    svc.enqueue(crit_study, "critical", crit_files, ["pacs"], priority="stat")
    assert svc.run_once() == 0  # the critical rows fail too; the routine rows are not due and not tried
    rows = state.query("SELECT job_id, attempts, next_attempt, state FROM deliveries")
    assert {r["state"] for r in rows} == {PENDING} and all(r["attempts"] == 1 for r in rows)
    routine_due = max(r["next_attempt"] for r in rows if r["job_id"] != "critical")
    critical_due = min(r["next_attempt"] for r in rows if r["job_id"] == "critical")
    assert critical_due - routine_due > 1.0, "the routine rows must fall due first for this test to mean anything"

    with pacs:  # the PACS is back
        while time.time() < routine_due:
            time.sleep(0.05)
        assert time.time() < critical_due  # only the routine rows are due by their own backoff
        sent = svc.run_once()
        # a C-STORE that fails on a loaded machine (a late response) is retried on its own backoff; the
        # claim under test is the order of the first association, checked on what the PACS received
        deadline = time.time() + 60
        while sent < 82 and time.time() < deadline:
            time.sleep(0.5)
            sent += svc.run_once()
        assert sent == 82
        assert states(state) == {SENT: 82}
        received = sorted(pacs.files(), key=lambda p: p.stat().st_mtime_ns)
    order = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received]
    crit_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in crit_files}
    assert set(order[:2]) == crit_uids, "the critical study's SR objects were not the first to arrive"
    assert len(order) == 82 and len(set(order)) == 82
