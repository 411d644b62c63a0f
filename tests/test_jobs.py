"""Jobs that refuse, jobs that keep failing, and workers that keep pipelines loaded."""

from __future__ import annotations

from pathlib import Path

import pydicom
from support.dicomgen import ct_series
from support.node import base_config, free_port, storescu


def _push(node, tmp_path: Path, name: str, seed: int) -> str:
    files = ct_series(tmp_path / name, 2, size=16, seed=seed)
    storescu(node.port, files)
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def test_refusal_shows_in_status_and_failures_are_retried_then_marked(node_factory, tmp_path: Path) -> None:
    cfg = base_config(tmp_path / "var", free_port())
    cfg["workers"]["max_retries"] = 1
    cfg["routes"] = [
        {"name": "refuse", "match": {"BodyPartExamined": "HEAD"}, "pipelines": ["probe"],
         "options": {"refuse": "not a head scanner protocol"}},
        {"name": "fail", "match": {"BodyPartExamined": "CHEST"}, "pipelines": ["probe"],
         "options": {"fail": "model exploded", "marker_dir": str(tmp_path / "attempts")}},
        {"name": "ok", "match": {"Modality": "CT"}, "pipelines": ["probe"]},
    ]
    node = node_factory(config=cfg)
    head = ct_series(tmp_path / "head", 1, size=16, body_part="HEAD")
    chest = ct_series(tmp_path / "chest", 1, size=16, body_part="CHEST")
    storescu(node.port, head + chest)
    head_uid = str(pydicom.dcmread(head[0], stop_before_pixels=True).StudyInstanceUID)
    chest_uid = str(pydicom.dcmread(chest[0], stop_before_pixels=True).StudyInstanceUID)

    s = node.wait_study(head_uid, ("REFUSED",))
    assert s["jobs"][0]["state"] == "refused" and s["jobs"][0]["reason"] == "not a head scanner protocol"

    s = node.wait_study(chest_uid, ("FAILED",), timeout=60)
    (job,) = s["jobs"]
    assert job["state"] == "failed" and "RuntimeError: model exploded" in job["error"]
    assert job["attempts"] == 2  # the first run and max_retries=1 retry
    assert len(list((tmp_path / "attempts").glob("attempt-*"))) == 2
    assert "model exploded" in node.cli("status").stdout  # shown to IT staff, not only in JSON

    # the node carries on; the worker keeps the same pipeline object (and its models) between tasks
    a = node.wait_study(_push(node, tmp_path, "a", 1))
    b = node.wait_study(_push(node, tmp_path, "b", 2))
    ra, rb = (node.result(x["jobs"][0]["job_id"])["details"] for x in (a, b))
    assert (ra["pid"], ra["instance"]) == (rb["pid"], rb["instance"])
