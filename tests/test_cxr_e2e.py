"""The real CR chest radiograph through the node with a random-weight DenseNet: results at Orthanc."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from support.cxr_models import xrv_model
from support.dicomgen import copy_with_new_uids, sample_file
from support.node import base_config, storescu, wait_for
from support.orthanc import Orthanc, free_port
from support.results import COMPREHENSIVE_SR, ENHANCED_SR, KOS, SECONDARY_CAPTURE, pacs_objects, walk

from node.results import validate


def test_cr_through_the_node_with_a_random_weight_model(node_factory, tmp_path: Path) -> None:
    model = xrv_model(tmp_path / "weights" / "xrv", present=("Effusion",))  # deterministic: always present

    node_port = free_port()
    with Orthanc(tmp_path / "pacs", aet="PACS", peers={"ainode": ("AINODE", "127.0.0.1", node_port)}) as pacs:
        cfg = base_config(tmp_path / "var", node_port)
        cfg["destinations"] = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}]
        cfg["routes"] = [{"name": "chest-xray", "match": {"Modality": ["CR", "DX"],
                                                           "BodyPartExamined": {"regex": "CHEST|THORAX"}},
                          "pipelines": ["cxr"], "destinations": ["pacs"], "language": "en",
                          "options": {"model": str(model), "allow_unverified_models": True}}]
        node = node_factory(config=cfg)
        for source in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"):  # the uncompressed original and its JPEG 2000 form
            cr = copy_with_new_uids(sample_file(source), tmp_path / source)
            storescu(node.port, [cr], extra=["-R", "-xv"] if "J2K" in source else None)
            check_study(node, pacs, cr, tmp_path)


def check_study(node, pacs: Orthanc, cr: Path, tmp_path: Path) -> None:
    """Four valid, UNVERIFIED objects in the source study, with the lungs dark on the SC."""
    study_uid = str(pydicom.dcmread(cr, stop_before_pixels=True).StudyInstanceUID)
    s = wait_for(lambda: (x := node.study(study_uid)) and (x.get("delivered") or x["state"] == "FAILED") and x,
                 150, 0.3, "delivered")
    assert s["state"] == "DONE", s
    objs = pacs_objects(pacs, study_uid)
    assert sorted(str(o.SOPClassUID) for o in objs) == sorted([COMPREHENSIVE_SR, ENHANCED_SR,
                                                               SECONDARY_CAPTURE, KOS])
    for o in objs:
        f = tmp_path / f"{o.SOPInstanceUID}.dcm"
        o.save_as(f)
        assert validate(f) == [], o.SOPClassUID
        assert "UNVERIFIED" in str(o.SeriesDescription).upper() or str(o.SOPClassUID) == KOS
    narrative = next(o for o in objs if str(o.SOPClassUID) == ENHANCED_SR)
    text = " ".join(str(i.get("TextValue", "")).replace("\n", "") for i in walk(narrative.ContentSequence, []))
    assert "UNVERIFIED MODEL" in text and "effusion" in text.lower()
    sr = next(o for o in objs if str(o.SOPClassUID) == COMPREHENSIVE_SR)
    codes = {i.ConceptCodeSequence[0].CodeValue for i in walk(sr.ContentSequence, []) if "ConceptCodeSequence" in i}
    assert "60046008" in codes  # pleural effusion, SNOMED CT

    # polarity: the source is MONOCHROME1, so on the SC the lungs (lateral thirds of the chest) must be darker
    # than the mediastinum (central strip) at the same height
    sc = next(o for o in objs if str(o.SOPClassUID) == SECONDARY_CAPTURE)
    px = np.asarray(sc.pixel_array).astype(float).mean(axis=2)
    src_ds = pydicom.dcmread(cr)
    h = min(px.shape[0], int(src_ds.Rows * px.shape[1] / src_ds.Columns))  # the image part above the panel
    band = px[int(0.35 * h):int(0.6 * h)]
    w = band.shape[1]
    lungs = np.concatenate([band[:, int(0.2 * w):int(0.35 * w)], band[:, int(0.65 * w):int(0.8 * w)]], axis=1)
    mediastinum = band[:, int(0.45 * w):int(0.55 * w)]
    assert lungs.mean() < mediastinum.mean() - 20, (lungs.mean(), mediastinum.mean())
