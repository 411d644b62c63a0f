"""Results back to the PACS: storescu -> ainode -> SR, narrative SR, SC, KOS at a real Orthanc and storescp."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from support.dcmtk import StoreSCP
from support.dicomgen import copy_with_new_uids, ct_series, sample_file
from support.node import base_config, free_port, storescu, wait_for
from support.orthanc import Orthanc
from support.results import COMPREHENSIVE_SR, ENHANCED_SR, KOS, SECONDARY_CAPTURE, walk
from support.results import pacs_objects as orthanc_objects

from node.results import validate


def node_config(tmp_path: Path, port: int, pacs: Orthanc, scp: StoreSCP | None, language: str = "zh") -> dict:
    cfg = base_config(tmp_path / "var", port)
    cfg["destinations"] = [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}]
    if scp is not None:
        cfg["destinations"].append({"name": "archive", "ae_title": scp.aet, "host": "127.0.0.1", "port": scp.port})
    cfg["delivery"] = {"retry_base_seconds": 1, "retry_max_delay_seconds": 2, "poll_seconds": 0.5}
    cfg["routes"] = [{"name": "chest", "match": {"Modality": ["CR", "CT"]}, "pipelines": ["finder"],
                      "destinations": [d["name"] for d in cfg["destinations"]], "language": language,
                      "complete_on": "release", "quiet_seconds": 2}]
    return cfg


def texts(ds: pydicom.Dataset) -> list[str]:
    return [str(i.TextValue).replace("\n", "") for i in walk(ds.get("ContentSequence", [])) if "TextValue" in i]


@pytest.fixture
def pacs(tmp_path: Path):
    node_port = free_port()
    with Orthanc(tmp_path / "orthanc", aet="PACS", peers={"ainode": ("AINODE", "127.0.0.1", node_port)}) as o:
        o.node_port = node_port  # type: ignore[attr-defined]
        yield o


def test_results_reach_orthanc_and_storescp_valid_in_the_source_study(node_factory, pacs: Orthanc,
                                                                      tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "scp-out", aet="ARCHIVE").start()
    try:
        node = node_factory(config=node_config(tmp_path, pacs.node_port, pacs, scp))  # type: ignore[attr-defined]
        cr = copy_with_new_uids(sample_file("RG1_UNCR.dcm"), tmp_path / "cr.dcm")
        src = pydicom.dcmread(cr, stop_before_pixels=True)
        study_uid = str(src.StudyInstanceUID)
        storescu(node.port, [cr])
        s = wait_for(lambda: (x := node.study(study_uid)) and x.get("delivered") and x, 60, 0.3, "delivered")
        assert s["state"] == "DONE"
        assert set(s["delivery"]) == {"pacs", "archive"}
        assert all(d["states"] == {"sent": 4} for d in s["delivery"].values()), s["delivery"]

        objs = orthanc_objects(pacs, study_uid)
        assert sorted(str(o.SOPClassUID) for o in objs) == sorted([COMPREHENSIVE_SR, ENHANCED_SR,
                                                                   SECONDARY_CAPTURE, KOS])
        for o in objs:
            assert str(o.PatientID) == str(src.PatientID) and str(o.PatientName) == str(src.PatientName)
            assert str(o.SeriesInstanceUID) != str(src.SeriesInstanceUID)
            assert 900 <= int(o.SeriesNumber) < 1000
            assert str(o.SeriesDescription).startswith("AI RESULT")
            f = tmp_path / f"{o.SOPInstanceUID}.dcm"
            o.save_as(f)
            assert validate(f) == [], f"{o.SOPClassUID}: validator errors after the PACS round trip"
        assert len({o.SeriesInstanceUID for o in objs}) == 4
        narrative = next(o for o in objs if str(o.SOPClassUID) == ENHANCED_SR)
        assert "ISO_IR 192" in narrative.SpecificCharacterSet
        assert any("左上肺野见测试病灶" in t for t in texts(narrative)), texts(narrative)
        f = tmp_path / "narrative.dcm"
        narrative.save_as(f)
        dump = subprocess.run(["/usr/bin/dsrdump", "+U8", "+Pl", str(f)], capture_output=True, text=True)
        assert dump.returncode == 0 and "左上肺野见测试病灶" in dump.stdout

        received = [pydicom.dcmread(p, stop_before_pixels=True) for p in scp.files()]
        assert sorted(str(d.SOPInstanceUID) for d in received) == sorted(str(o.SOPInstanceUID) for o in objs)

        # a late series re-opens the study; the new SR supersedes the first one
        first_sr = next(o for o in objs if str(o.SOPClassUID) == COMPREHENSIVE_SR)
        late = copy_with_new_uids(sample_file("RG1_UNCR.dcm"), tmp_path / "late.dcm", study_uid=study_uid)
        storescu(node.port, [late])
        wait_for(lambda: len(orthanc_objects(pacs, study_uid)) == 8, 60, 0.5, "second set of results")
        s = node.study(study_uid)
        assert len(s["jobs"]) == 2 and s["instances"] == 2
        new_srs = [o for o in orthanc_objects(pacs, study_uid)
                   if str(o.SOPClassUID) == COMPREHENSIVE_SR and o.SOPInstanceUID != first_sr.SOPInstanceUID]
        (new_sr,) = new_srs
        refs = [str(i.ReferencedSOPInstanceUID) for st in new_sr.PredecessorDocumentsSequence
                for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
        assert refs == [str(first_sr.SOPInstanceUID)]
    finally:
        scp.stop()


def test_pending_results_survive_a_killed_listener_and_arrive_once(node_factory, pacs: Orthanc,
                                                                   tmp_path: Path) -> None:
    node = node_factory(config=node_config(tmp_path, pacs.node_port, pacs, None, "en"))  # type: ignore[attr-defined]
    pacs.stop()
    files = ct_series(tmp_path / "ct", 3, size=64)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    storescu(node.port, files)
    s = wait_for(lambda: (x := node.study(study_uid)) and x.get("delivery", {}).get("pacs", {}).get("last_error")
                 and x, 60, 0.3, "a failed delivery attempt")
    assert s["delivered"] is None and s["delivery"]["pacs"]["states"].get("pending") == 4
    node.kill9()
    pacs.start()
    node.start()
    wait_for(lambda: (x := node.study(study_uid)) and x.get("delivered"), 60, 0.3, "delivered after restart")
    objs = orthanc_objects(pacs, study_uid)
    assert len(objs) == 4, "every result exactly once"
    assert len({str(o.SOPInstanceUID) for o in objs}) == 4
