"""A study pushed by DCMTK storescu reaches a Celery worker as the right pixels, whatever the encoding."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_rescale
from support.dicomgen import copy_with_new_uids, ct_series, expected_volume, sample_file
from support.node import storescu


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def only_job(study: dict) -> dict:
    assert len(study["jobs"]) == 1, study["jobs"]
    return study["jobs"][0]


def test_ct_series_and_cr_reach_the_pipeline_with_the_right_pixels(node_factory, tmp_path: Path) -> None:
    node = node_factory()
    ct = ct_series(tmp_path / "ct", 12, size=64, shuffle=True)
    cr = copy_with_new_uids(sample_file("RG1_UNCR.dcm"), tmp_path / "cr" / "cr.dcm")
    storescu(node.port, ct)
    storescu(node.port, [cr])
    ct_uid = str(pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    cr_ds = pydicom.dcmread(cr)

    study = node.wait_study(ct_uid)
    assert study["instances"] == 12 and study["route"] == "everything"
    assert study["complete_reason"] == "associations released"
    job = only_job(study)
    assert job["pipeline"] == "probe" and job["state"] == "done"
    (series,) = node.result(job["job_id"])["details"]["series"]
    assert series["frames"] == 12 and series["shape"] == [12, 64, 64]
    assert series["z"] == sorted(series["z"]) and series["z"][0] == 0.0
    assert series["sha256"] == sha(expected_volume(ct)), "pipeline saw other pixels than were sent"

    study = node.wait_study(str(cr_ds.StudyInstanceUID))
    (series,) = node.result(only_job(study)["job_id"])["details"]["series"]
    assert series["modality"] == "CR" and series["photometric"] == "MONOCHROME1"
    assert series["shape"] == [1, 1955, 1841]
    assert series["sha256"] == sha(apply_rescale(cr_ds.pixel_array, cr_ds)[None])

    # stored as received: the spool file is byte-identical to what storescu sent (no re-encode)
    stored = next((node.storage / "spool" / str(cr_ds.StudyInstanceUID)).rglob("*.dcm"))
    assert pydicom.dcmread(stored).PixelData == cr_ds.PixelData
    timestamps = ("first_received", "last_received", "completed", "queued", "started", "finished")
    assert all(study[k] for k in timestamps), {k: study[k] for k in timestamps}
    assert study["first_received"] <= study["completed"] <= study["queued"] <= study["finished"]

    # the listener reads finished jobs from disk; Redis keeps no Celery result per job, which grew for 7 days
    import redis

    sock = node.storage / "redis" / "redis.sock"
    assert sock.exists(), "the node runs its embedded Redis there"
    assert redis.Redis(unix_socket_path=str(sock)).keys("celery-task-meta-*") == []


def _encode(tool: str, src: Path, dst: Path, *args: str) -> Path:
    subprocess.run([tool, *args, str(src), str(dst)], check=True, capture_output=True)
    return dst


def test_compressed_transfer_syntaxes_decode_to_the_uncompressed_pixels(node_factory, tmp_path: Path) -> None:
    node = node_factory()
    base = copy_with_new_uids(sample_file("693_UNCR.dcm"), tmp_path / "src" / "uncompressed.dcm")
    variants = {"uncompressed": base}
    variants["jpeg2000"] = copy_with_new_uids(sample_file("693_J2KR.dcm"), tmp_path / "src" / "j2k.dcm")
    variants["jpegls"] = _encode("/usr/bin/dcmcjpls", copy_with_new_uids(base, tmp_path / "src" / "ls-in.dcm"),
                                 tmp_path / "src" / "jpegls.dcm")
    variants["rle"] = _encode("/usr/bin/dcmcrle", copy_with_new_uids(base, tmp_path / "src" / "rle-in.dcm"),
                              tmp_path / "src" / "rle.dcm")
    expected_ts = {"uncompressed": "1.2.840.10008.1.2.1", "jpeg2000": "1.2.840.10008.1.2.4.90",
                   "jpegls": "1.2.840.10008.1.2.4.80", "rle": "1.2.840.10008.1.2.5"}
    # storescu proposes only this transfer syntax (-R: required contexts only), so the node must take it as is
    propose = {"uncompressed": [], "jpeg2000": ["-R", "-xv"], "jpegls": ["-R", "-xt"], "rle": ["-R", "-xr"]}
    for name, f in variants.items():
        assert str(pydicom.dcmread(f).file_meta.TransferSyntaxUID) == expected_ts[name], name
        storescu(node.port, [f], extra=propose[name])
    reference = pydicom.dcmread(base)
    want = sha(apply_rescale(reference.pixel_array, reference)[None])
    for name, f in variants.items():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        study = node.wait_study(str(ds.StudyInstanceUID))
        (series,) = node.result(only_job(study)["job_id"])["details"]["series"]
        assert series["sha256"] == want, f"{name} decoded to different pixels"
        stored = next((node.storage / "spool" / str(ds.StudyInstanceUID)).rglob("*.dcm"))
        assert str(pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID) == expected_ts[name]
