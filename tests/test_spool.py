"""The spool's one-flush durability: pool files, preamble certificates, and recovery after a crash.

A crash is simulated by leaving the files exactly as a killed listener would (a flushed pool file
whose final link was never made durable, a flush torn half-way, an unused pool file) and then
running the recovery a restarted node runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from support.dicomgen import ct_series
from support.node import wait_for

from node.spool import PREAMBLE, IncomingFile, Spool, certified


def _instance(tmp: Path) -> tuple[pydicom.Dataset, bytes]:
    (f,) = ct_series(tmp / "src", 1, size=64)
    raw = f.read_bytes()
    assert raw.startswith(PREAMBLE)
    return pydicom.dcmread(f), raw


def _flushed_pool_file(spool: Spool, raw: bytes) -> Path:
    """What a killed listener leaves after answering success and before its links were settled."""
    path = spool.incoming_dir / "killed.part"
    path.touch()
    f = IncomingFile(path, raw[:500], durable_name=True)
    f.write(memoryview(raw)[500:])
    f.sync_and_close()
    return path


def test_a_flushed_instance_whose_name_was_lost_is_linked_again(tmp_path: Path) -> None:
    ds, raw = _instance(tmp_path)
    spool = Spool(tmp_path / "var", min_free_mb=0)
    pool_file = _flushed_pool_file(spool, raw)
    assert certified(pool_file)
    linked, removed = spool.recover_incoming()
    final = spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert (linked, removed) == (1, 0)
    assert final.read_bytes()[128:] == raw[128:], "content after the preamble is the bytes as received"
    assert not pool_file.exists()
    assert pydicom.dcmread(final).PixelData == ds.PixelData


@pytest.mark.parametrize("damage", ["page_lost", "truncated", "never_certified"])
def test_a_torn_or_unfinished_write_is_deleted_not_stored(tmp_path: Path, damage: str) -> None:
    ds, raw = _instance(tmp_path)
    spool = Spool(tmp_path / "var", min_free_mb=0)
    if damage == "never_certified":  # killed while the data set was still arriving
        path = spool.incoming_dir / "partial.part"
        path.touch()
        f = IncomingFile(path, raw[:len(raw) // 2], durable_name=True)
        os.close(f.fd)
    else:
        path = _flushed_pool_file(spool, raw)
        with open(path, "r+b") as fh:
            if damage == "page_lost":  # a page of pixel data that never reached the disk reads as zeros
                fh.seek(len(raw) - 5000)
                fh.write(b"\x00" * 4096)
            else:
                fh.truncate(len(raw) - 4096)
    assert not certified(path)
    (spool.incoming_dir / "unused.part").touch()  # a pool file never handed out
    linked, removed = spool.recover_incoming()
    assert (linked, removed) == (0, 1)
    assert list(spool.incoming_dir.iterdir()) == []
    assert spool.iter_instances() == []


def test_committed_instances_are_visible_at_once_and_settled_in_the_background(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "var", min_free_mb=0)
    spool.start()
    try:
        # wait for the pool itself: a .part file exists on disk before its directory entry is flushed
        wait_for(lambda: spool.pooled() >= 10, 10)
        stored = []
        for f in ct_series(tmp_path / "src", 5, size=32):
            ds, raw = pydicom.dcmread(f), f.read_bytes()
            incoming = spool.incoming(raw[:300])
            assert incoming.durable_name, "the pool hands out names flushed ahead of time"
            incoming.write(raw[300:])
            s = spool.commit(incoming, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            assert not s.duplicate and s.path.read_bytes()[128:] == raw[128:]
            stored.append(s.path)
            again = spool.incoming(raw[:300])
            again.write(raw[300:])
            assert spool.commit(again, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID).duplicate
        # each final file keeps a second name in the pool until its directory is flushed
        wait_for(lambda: all(os.stat(p).st_nlink == 1 for p in stored), 5)
    finally:
        spool.stop()
    assert [p for p in spool.incoming_dir.iterdir() if p.stat().st_size] == []
    assert spool.recover_incoming() == (0, 0)
    assert sorted(spool.iter_instances()) == sorted(stored)
