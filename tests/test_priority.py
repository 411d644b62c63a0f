"""`priority: stat` really jumps the queue: with 50 routine studies waiting, the stat one runs next."""

from __future__ import annotations

from pathlib import Path

import pydicom
from support.dicomgen import copy_with_new_uids, ct_series, sample_file
from support.node import base_config, free_port, storescu, wait_for


def test_stat_study_arriving_last_is_processed_next(node_factory, tmp_path: Path) -> None:
    cfg = base_config(tmp_path / "var", free_port())
    cfg["routes"] = [
        {"name": "stat-cr", "match": {"Modality": "CR"}, "pipelines": ["probe"], "priority": "stat"},
        {"name": "routine-ct", "match": {"Modality": "CT"}, "pipelines": ["probe"], "priority": "routine"},
    ]
    cfg["pipelines"] = {"probe": {"sleep": 0.25}}
    node = node_factory(config=cfg)
    routine = [ct_series(tmp_path / f"ct{i}", 1, size=16, seed=i)[0] for i in range(50)]
    storescu(node.port, routine)  # one association, 50 studies: all complete at its release
    wait_for(lambda: sum(len(s["jobs"]) for s in node.status()) >= 50, 60, 0.2, "50 routine jobs queued")
    cr = copy_with_new_uids(sample_file("RG1_UNCR.dcm"), tmp_path / "cr.dcm")
    storescu(node.port, [cr])
    stat_uid = str(pydicom.dcmread(cr, stop_before_pixels=True).StudyInstanceUID)
    node.wait_study(stat_uid, timeout=120)
    studies = node.status()
    stat_job = next(s for s in studies if s["study_uid"] == stat_uid)["jobs"][0]
    routine_starts = [j["started"] for s in studies if s["study_uid"] != stat_uid for j in s["jobs"]]
    assert len(routine_starts) == 50
    waiting = [t for t in routine_starts if t is None or t > stat_job["queued"]]
    assert len(waiting) >= 30, "the queue was not loaded when the stat study arrived"
    # once queued, only the job running and the one the worker had already reserved may go first
    overtook = [t for t in waiting if t is not None and t < stat_job["started"]]
    assert len(overtook) <= 2, f"{len(overtook)} routine jobs started after the stat job was queued"
