"""Studies with more than one radiograph through a real ``ainode run``: what is read, what is refused and why.

1. PA + lateral (RG1 and a copy tagged ViewPosition LL in its own series): the lateral is refused
   with its reason, the PA is read; the report SR says which image was not analysed and why.
2. Two frontal radiographs with no tags at all (NIH ChestX-ray14 images wrapped as DX and as
   inverted MONOCHROME1 CR, one study): the image checks accept both and both are read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from support.cxr_data import dev_images, read_png, save, wrap
from support.cxr_models import xrv_model
from support.dicomgen import copy_with_new_uids, sample_file
from support.node import base_config, storescu, wait_for
from support.orthanc import Orthanc, free_port
from support.results import COMPREHENSIVE_SR, ENHANCED_SR, KOS, pacs_objects, walk


def _model(tmp_path: Path) -> Path:
    return xrv_model(tmp_path / "weights" / "xrv", present=("Effusion",))  # present, so a KOS is made


def _done(node, study_uid: str) -> dict:
    """Wait for delivery; generous because the first report of its kind is validated by PixelMed (a JVM)."""
    try:
        s = wait_for(lambda: (x := node.study(study_uid)) and (x.get("delivered") or x["state"] == "FAILED") and x,
                     480, 1.0, "delivered")
    except TimeoutError:
        raise AssertionError(f"not delivered: {node.study(study_uid)}\n"
                             f"{node.log.read_text(errors='replace')[-3000:]}") from None
    assert s["state"] == "DONE", (s["errors"], [j["reason"] for j in s["jobs"]],
                                  node.log.read_text(errors="replace")[-3000:])
    return s


def _summary(storage: Path, job_id: str) -> dict:
    for p in storage.rglob("summary.json"):
        data = json.loads(p.read_text())
        if data.get("job_id") == job_id:
            return data
    raise AssertionError(f"no summary for job {job_id}")


def _kos_refs(objs: list) -> set[str]:
    kos = next(o for o in objs if str(o.SOPClassUID) == KOS)
    return {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for i in walk(kos.ContentSequence, []) if "ReferencedSOPSequence" in i}


def _report_text(objs: list) -> str:
    narrative = next(o for o in objs if str(o.SOPClassUID) == ENHANCED_SR)
    return " ".join(str(i.get("TextValue", "")).replace("\n", "") for i in walk(narrative.ContentSequence, []))


@pytest.mark.timeout(1200)  # two studies, each validated by PixelMed (a JVM); slow on a loaded 2-core machine
def test_pa_with_lateral_and_two_frontals(node_factory, tmp_path: Path) -> None:
    model = _model(tmp_path)
    node_port = free_port()
    with Orthanc(tmp_path / "pacs", aet="PACS", peers={"ainode": ("AINODE", "127.0.0.1", node_port)}) as pacs:
        cfg = base_config(tmp_path / "var", node_port)
        cfg["destinations"] = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}]
        cfg["routes"] = [{"name": "chest-xray", "match": {"Modality": ["CR", "DX"]}, "pipelines": ["cxr"],
                          "destinations": ["pacs"], "language": "en", "complete_on": "release",
                          "options": {"model": str(model), "allow_unverified_models": True}}]
        node = node_factory(config=cfg)

        # 1. PA + lateral in one study, one association
        pa = copy_with_new_uids(sample_file("RG1_UNCR.dcm"), tmp_path / "pa.dcm")
        study_uid = str(pydicom.dcmread(pa, stop_before_pixels=True).StudyInstanceUID)
        lat_ds = pydicom.dcmread(pa)
        lat_ds.ViewPosition, lat_ds.SeriesNumber = "LL", 2
        lat_ds.SeriesInstanceUID, lat_ds.SOPInstanceUID = generate_uid(), generate_uid()
        lat_ds.file_meta.MediaStorageSOPInstanceUID = lat_ds.SOPInstanceUID
        lat = tmp_path / "lat.dcm"
        lat_ds.save_as(lat)
        storescu(node.port, [pa, lat])
        # 2. two tagless frontal radiographs in one study, sent now so that it queues behind study 1
        study2 = generate_uid()
        files = []
        for png, form in zip(dev_images()[:2], ("DX", "CR-MONOCHROME1")):
            ds = wrap(read_png(png), form)
            ds.StudyInstanceUID = study2
            files.append(save(ds, tmp_path / "two" / f"{png.stem}.dcm"))
        storescu(node.port, files)
        s = _done(node, study_uid)
        summary = _summary(tmp_path / "var", s["jobs"][0]["job_id"])
        assert summary["status"] == "ok"
        assert any("images not analysed" in w and "lateral view (ViewPosition)" in w for w in summary["warnings"])
        objs = pacs_objects(pacs, study_uid)
        refs = _kos_refs(objs)  # key images (the sources read) and the result objects
        assert str(pydicom.dcmread(pa, stop_before_pixels=True).SOPInstanceUID) in refs
        assert str(lat_ds.SOPInstanceUID) not in refs
        text = _report_text(objs)
        assert "Not analysed: series 2" in text and "lateral view (ViewPosition)" in text
        sr = next(o for o in objs if str(o.SOPClassUID) == COMPREHENSIVE_SR)
        names = [i.ConceptNameCodeSequence[0].CodeMeaning for i in walk(sr.ContentSequence, [])
                 if "ConceptNameCodeSequence" in i and i.get("ValueType") == "NUM"]
        assert any(n.startswith("Probability") for n in names) and "Threshold for present" in names

        # 2. both frontals read
        s = _done(node, study2)
        summary = _summary(tmp_path / "var", s["jobs"][0]["job_id"])
        assert summary["status"] == "ok" and not any("not analysed" in w for w in summary["warnings"])
        objs = pacs_objects(pacs, study2)
        assert {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files} <= _kos_refs(objs)
        assert "Not analysed" not in _report_text(objs)
