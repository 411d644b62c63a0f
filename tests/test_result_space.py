"""A worker does not write result objects into the last of the disk, and a full disk loses no result.

Before, a job that met a full disk while writing its objects was recorded as "encoding failed" and its
result never reached the PACS; now it raises ``StorageLow`` and Celery runs it again a minute later
(``node.tasks``: 30 times), while the lifecycle frees space. Real files, a real tmpfs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.dicomgen import ct_series
from support.tmpfs import tmpfs

from node.tasks import JobSpec, StorageLow, execute_job


def _spec(tmp: Path, outbox: Path, files: list[Path], min_free_mb: int) -> JobSpec:
    return JobSpec(job_id="space", study_uid="1.2.3", pipeline="echo", paths=[str(f) for f in files],
                   result_dir=str(tmp / "results" / "space"), outbox_dir=str(outbox / "space"), min_free_mb=min_free_mb)


def test_below_min_free_the_job_waits_and_writes_nothing(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "ct", 3, size=32)
    outbox = tmp_path / "outbox"
    with pytest.raises(StorageLow, match="node.min_free_disk_mb"):
        execute_job(_spec(tmp_path, outbox, files, min_free_mb=10**9))  # no disk has a petabyte free
    assert not (tmp_path / "results" / "space" / "summary.json").exists(), "the job is not finished"
    assert not list(outbox.rglob("*.dcm"))
    summary = execute_job(_spec(tmp_path, outbox, files, min_free_mb=1))  # the retry, once there is room
    assert summary["status"] == "ok" and len(summary["outbox_files"]) >= 2
    assert all(Path(f).exists() for f in summary["outbox_files"])


def test_a_full_disk_while_writing_is_a_wait_not_a_failure(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "ct", 3, size=32)
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    with tmpfs(outbox, 24):
        filler = outbox / "filler"
        with open(filler, "wb") as f:  # leave a few KB: less than the summary SC needs
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        os.truncate(filler, filler.stat().st_size - 8192)
        with pytest.raises(StorageLow, match="disk full"):
            execute_job(_spec(tmp_path, outbox, files, min_free_mb=0))
        assert not list(outbox.rglob("*.dcm")) and not list(outbox.rglob("*.tmp")), "half-written objects left"
        assert not (tmp_path / "results" / "space" / "summary.json").exists()
        filler.unlink()
        summary = execute_job(_spec(tmp_path, outbox, files, min_free_mb=0))
        assert summary["status"] == "ok" and all(Path(f).exists() for f in summary["outbox_files"])
