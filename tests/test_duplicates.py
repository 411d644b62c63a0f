"""One SOP Instance UID is one object (issue 10, item 5), against a real ``ainode run`` and pynetdicom peers."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from support.dicomgen import ct_series
from support.node import NodeProcess, wait_for
from support.node import spool_files as support_spool_files


def send(node: NodeProcess, datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(datasets[0].SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert assoc.is_established
    statuses = [assoc.send_c_store(ds) for ds in datasets]
    assoc.release()
    return statuses


def study(tmp: Path, n: int = 2, seed: int = 0) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in sorted(ct_series(tmp, n, size=32, seed=seed))]


def changed(ds: pydicom.Dataset) -> pydicom.Dataset:
    other = copy.deepcopy(ds)  # Dataset.copy() shares its elements
    other.PixelData = (np.frombuffer(ds.PixelData, dtype=np.uint16) + 7).astype(np.uint16).tobytes()
    return other


def test_the_same_uid_in_another_study_or_series_is_refused_and_nothing_is_written(node: NodeProcess,
                                                                                    tmp_path: Path) -> None:
    first = study(tmp_path / "a")
    assert [s.Status for s in send(node, first)] == [0, 0]
    first_uid = str(first[0].StudyInstanceUID)
    node.wait_study(first_uid)
    before = support_spool_files(node.storage)

    intruder = changed(first[0])  # another patient's study that reuses a SOP Instance UID
    intruder.StudyInstanceUID, intruder.SeriesInstanceUID = generate_uid(), generate_uid()
    intruder.PatientID = "OTHER-002"
    other_series = changed(first[1])
    other_series.SeriesInstanceUID = generate_uid()
    st_study, st_series = send(node, [intruder, other_series])
    assert (st_study.Status, st_study.ErrorComment) == (0xC000, "SOPInstanceUID already stored in another study")
    assert (st_series.Status, st_series.ErrorComment) == (0xC000, "SOPInstanceUID already stored in another series")
    assert support_spool_files(node.storage) == before, "nothing written"
    assert not (node.storage / "spool" / str(intruder.StudyInstanceUID)).exists()
    assert node.study(str(intruder.StudyInstanceUID)) is None
    shown = node.study(first_uid)
    assert [c["action"] for c in shown["conflicts"]] == ["refused", "refused"]
    assert shown["conflicts"][0]["sent_study_uid"] == str(intruder.StudyInstanceUID)
    assert "refused for study" in node.cli("status").stdout
    stored = pydicom.dcmread(node.storage / "spool" / first_uid / str(first[0].SeriesInstanceUID)
                             / f"{first[0].SOPInstanceUID}.dcm")
    assert stored.PixelData == first[0].PixelData and stored.PatientID == first[0].PatientID


def test_different_content_under_the_same_uid_keeps_the_first_copy_and_says_so(node: NodeProcess,
                                                                                tmp_path: Path) -> None:
    first = study(tmp_path / "b", seed=1)
    send(node, first)
    uid = str(first[0].StudyInstanceUID)
    done = node.wait_study(uid)
    resent = send(node, [first[0], changed(first[1])])  # an identical re-send, then a changed one
    assert [s.Status for s in resent] == [0, 0]
    path = node.storage / "spool" / uid / str(first[1].SeriesInstanceUID) / f"{first[1].SOPInstanceUID}.dcm"
    assert pydicom.dcmread(path).PixelData == first[1].PixelData, "keep_first keeps the first copy"
    s = wait_for(lambda: (x := node.study(uid)) and x["conflicts"] and x, 10)
    assert [(c["sop_uid"], c["action"]) for c in s["conflicts"]] == [(str(first[1].SOPInstanceUID), "kept_first")]
    s = node.wait_study(uid)
    assert len(s["jobs"]) == 1 and s["jobs"][0]["job_id"] == done["jobs"][0]["job_id"], "nothing new to run"
    assert len([p for p in support_spool_files(node.storage) if p.parts[-3] == uid]) == 2


def test_replace_swaps_the_file_and_runs_the_study_again(node_factory, tmp_path: Path) -> None:
    n = node_factory(duplicates="replace")
    first = study(tmp_path / "c", seed=2)
    send(n, first)
    uid = str(first[0].StudyInstanceUID)
    done = n.wait_study(uid)
    before = n.result(done["jobs"][0]["job_id"])["details"]["series"][0]["sha256"]
    new = changed(first[0])
    assert send(n, [new])[0].Status == 0
    path = n.storage / "spool" / uid / str(new.SeriesInstanceUID) / f"{new.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(path).PixelData == new.PixelData
    s = wait_for(lambda: (x := n.study(uid)) and len(x["jobs"]) == 2 and x["state"] == "DONE" and x, 60)
    assert [c["action"] for c in s["conflicts"]] == ["replaced"]
    rerun = next(j for j in s["jobs"] if j["job_id"] != done["jobs"][0]["job_id"])
    assert rerun["state"] == "done"
    assert n.result(rerun["job_id"])["details"]["series"][0]["sha256"] != before, "the new content was processed"
    assert s["instances"] == 2


def test_a_spool_file_reusing_an_indexed_uid_is_set_aside_at_start(node_factory, tmp_path: Path) -> None:
    """As an older version left them: a second study's file under a SOP Instance UID already indexed."""
    n = node_factory()
    first = study(tmp_path / "d", n=1, seed=3)
    send(n, first)
    n.wait_study(str(first[0].StudyInstanceUID))
    n.stop()
    intruder = changed(first[0])
    intruder.StudyInstanceUID, intruder.SeriesInstanceUID = generate_uid(), generate_uid()
    planted = n.storage / "spool" / str(intruder.StudyInstanceUID) / str(intruder.SeriesInstanceUID) / \
        f"{intruder.SOPInstanceUID}.dcm"
    planted.parent.mkdir(parents=True)
    intruder.save_as(planted, enforce_file_format=True)
    n.start()
    aside = n.storage / "quarantine" / planted.relative_to(n.storage / "spool")
    assert aside.exists() and not planted.exists()
    assert n.study(str(intruder.StudyInstanceUID)) is None, "never indexed, never processed"
    wait_for(lambda: "reuses a SOP Instance UID stored elsewhere" in n.log_text(), 5)
