"""CT quality end to end: three reconstructions pushed by storescu come back as SR/SC/KOS at Orthanc."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from support.node import base_config, storescu, wait_for
from support.orthanc import Orthanc, free_port
from support.phantoms import PhantomSpec, write_recons
from support.results import COMPREHENSIVE_SR, SECONDARY_CAPTURE, pacs_objects, walk


def test_multi_reconstruction_phantom_through_the_node(node_factory, tmp_path: Path) -> None:
    node_port = free_port()
    with Orthanc(tmp_path / "pacs", aet="PACS", peers={"ainode": ("AINODE", "127.0.0.1", node_port)}) as pacs:
        cfg = base_config(tmp_path / "var", node_port)
        cfg["destinations"] = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}]
        cfg["routes"] = [{"name": "ct", "match": {"Modality": "CT"}, "pipelines": ["ct_quality"],
                          "destinations": ["pacs"], "complete_on": "release"}]
        node = node_factory(config=cfg)
        spec = PhantomSpec(rows=256, cols=256, spacing=1.5, n_slices=6, sigma=20.0)
        series, ids = write_recons(tmp_path / "ct", spec)
        files = [p for paths in series.values() for p in paths]
        storescu(node.port, files)
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        s = node.wait_study(study_uid, ("DONE", "FAILED"), timeout=120)
        assert s["state"] == "DONE", s
        wait_for(lambda: (x := node.study(study_uid)) and x.get("delivered"), 60, 0.3, "delivered")
        objs = pacs_objects(pacs)
        assert all(str(o.StudyInstanceUID) == study_uid for o in objs)
        classes = [str(o.SOPClassUID) for o in objs]
        assert COMPREHENSIVE_SR in classes and classes.count(SECONDARY_CAPTURE) >= 2
        sr = next(o for o in objs if str(o.SOPClassUID) == COMPREHENSIVE_SR)
        items = walk(sr.ContentSequence, [])
        sds = [float(i.MeasuredValueSequence[0].NumericValue) for i in items
               if i.get("ValueType") == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "112183"
               and "MeasuredValueSequence" in i]
        assert sds, "no SD of attenuation in the SR"
        # three reconstructions with sigma 20 / 12 / 6.4-ish: every measured SD is within the noise range
        assert min(sds) > 2 and max(sds) < 40
        units = {i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue for i in items
                 if i.get("ValueType") == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "112183"
                 and "MeasuredValueSequence" in i}
        assert units == {"[hnsf'U]"}
        scs = [o for o in objs if str(o.SOPClassUID) == SECONDARY_CAPTURE]
        assert all(o.SamplesPerPixel == 3 and o.BurnedInAnnotation == "YES" for o in scs)
        assert all(np.asarray(o.pixel_array).std() > 5 for o in scs)  # real pictures, not blank frames
        result = node.result(s["jobs"][0]["job_id"])
        assert any("comparison" in o["name"].lower() for o in result["overlays"]), \
            [o["name"] for o in result["overlays"]]
