"""A critical head CT through the whole node: paged by webhook and HL7, flagged in SR, SC, KOS and status."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import numpy as np
import pydicom
from support.mllp import MLLPListener
from support.node import base_config, storescu, wait_for
from support.orthanc import Orthanc, free_port
from support.results import COMPREHENSIVE_SR, ENHANCED_SR, KOS, SECONDARY_CAPTURE, pacs_objects, walk
from test_classifier import write_head_ct, write_manifest
from test_notify import _Hook

SECRET = "s3cret-for-tests"


def test_critical_head_ct_pages_and_is_flagged_everywhere(node_factory, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    write_manifest(weights, critical=0.5)
    files, _ = write_head_ct(tmp_path / "ct")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    node_port = free_port()
    hook = _Hook()
    import threading

    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        with Orthanc(tmp_path / "pacs", aet="PACS", peers={"ainode": ("AINODE", "127.0.0.1", node_port)}) as pacs, \
                MLLPListener() as ris:
            cfg = base_config(tmp_path / "var", node_port)
            cfg["destinations"] = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                    "port": pacs.dicom_port}]
            cfg["routes"] = [{"name": "head-ct", "match": {"Modality": "CT", "BodyPartExamined": {"regex": "HEAD"}},
                              "pipelines": ["classifier"], "destinations": ["pacs"], "priority": "stat",
                              "options": {"model": "ich-test", "weights_dir": str(weights),
                                          "allow_unverified_models": True}}]
            cfg["notify"] = {"channels": [
                {"kind": "webhook", "name": "pager", "url": f"http://127.0.0.1:{hook.server_address[1]}/hook",
                 "secret": SECRET},
                {"kind": "hl7", "name": "ris", "host": "127.0.0.1", "port": ris.port,
                 "receiving_application": "RIS"}]}
            node = node_factory(config=cfg)
            storescu(node.port, files)

            hook.wait_for(1, timeout=90)
            headers, body = hook.requests[0]
            want = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert headers["X-AINode-Signature"] == f"sha256={want}"
            payload = json.loads(body)
            assert payload["study_instance_uid"] == study_uid and payload["accession_number"] == "ACC-ICH-1"
            assert payload["unverified"] is True and payload["model"]["name"] == "ich-test"
            assert payload["code"]["value"] == "1386000" and payload["detected_at"] and payload["received_at"]
            assert payload["probability"] >= 0.5
            assert "P1" not in body.decode(), "no patient ID in the webhook body"

            (msg,) = ris.wait_for(1, timeout=30)
            assert str(msg.segment("MSH")[9]) == "ORU^R01^ORU_R01"
            obx = [str(s) for s in msg.segments("OBX")]
            assert any("1386000" in s for s in obx) and any("UNVERIFIED" in s for s in obx)
            assert str(msg.segment("PID")[3]).startswith("P1")

            s = wait_for(lambda: (x := node.study(study_uid)) and x.get("delivered") and x, 120, 0.3, "delivered")
            assert s["critical"] is True and s["state"] == "DONE"
            assert "CRITICAL" in node.cli("status").stdout
            sent = [n for n in s["notifications"] if n["state"] == "sent"]
            assert {n["channel"] for n in sent} == {"pager", "ris"}
            assert all(n["latency_s"] is not None and n["latency_s"] < 60 for n in sent)

            objs = pacs_objects(pacs)
            classes = [str(o.SOPClassUID) for o in objs]
            assert KOS in classes and COMPREHENSIVE_SR in classes and ENHANCED_SR in classes
            narrative = next(o for o in objs if str(o.SOPClassUID) == ENHANCED_SR)
            sections = [i.ConceptNameCodeSequence[0].CodeValue for i in narrative.ContentSequence
                        if i.ValueType == "CONTAINER"]
            assert "73568-8" in sections, "no Communication of Critical Results section"
            text = " ".join(str(i.get("TextValue", "")).replace("\n", "") for i in walk(narrative.ContentSequence, []))
            assert "UNVERIFIED MODEL" in text
            def red_rows(sc: pydicom.Dataset) -> int:  # full-width red strip = the CRITICAL FINDING banner
                px = np.asarray(sc.pixel_array).astype(int)
                red = (px[..., 0] > 180) & (px[..., 1] < 60) & (px[..., 2] < 60)
                return int((red.mean(axis=1) > 0.6).sum())

            scs = [o for o in objs if str(o.SOPClassUID) == SECONDARY_CAPTURE]
            assert max(red_rows(o) for o in scs) >= 10, "no red critical banner on any SC"
    finally:
        hook.shutdown()
        hook.server_close()
