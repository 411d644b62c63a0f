"""A `stat` route by tag: ED/ICU studies (by order priority or patient location) jump the processing queue.

Criticality is known only after inference, so urgency before it comes from the order: the route
matches RequestedProcedurePriority (which modalities often copy into RequestAttributesSequence, so
the node looks into top-level sequence items for a keyword missing at the top level),
CurrentPatientLocation or InstitutionalDepartmentName.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from support.dicomgen import copy_with_new_uids, sample_file
from support.node import base_config, free_port, storescu, wait_for

ROUTES = [
    {"name": "stat-ed-icu", "match": {"Modality": ["CR", "DX"], "RequestedProcedurePriority": ["STAT", "HIGH"]},
     "pipelines": ["probe"], "priority": "stat"},
    {"name": "stat-location", "match": {"Modality": ["CR", "DX"], "CurrentPatientLocation": {"regex": "^(ED|ICU)"}},
     "pipelines": ["probe"], "priority": "stat"},
    {"name": "stat-department", "match": {"Modality": ["CR", "DX"],
                                          "InstitutionalDepartmentName": {"regex": "EMERGENCY"}},
     "pipelines": ["probe"], "priority": "stat"},
    {"name": "routine", "match": {"Modality": ["CR", "DX"]}, "pipelines": ["probe"], "priority": "routine"},
]


def _cr(tmp_path: Path, name: str, **tags: object) -> Path:
    p = copy_with_new_uids(sample_file("RG1_UNCR.dcm"), tmp_path / f"{name}.dcm")
    ds = pydicom.dcmread(p)
    for k, v in tags.items():
        if k == "RequestAttributesPriority":  # the way modalities copy the worklist's priority
            item = Dataset()
            item.RequestedProcedureID = "RP1"
            item.RequestedProcedurePriority = v
            ds.RequestAttributesSequence = [item]
        else:
            setattr(ds, k, v)
    ds.save_as(p)
    return p


def test_stat_routes_by_order_priority_location_and_department(node_factory, tmp_path: Path) -> None:
    cfg = base_config(tmp_path / "var", free_port())
    cfg["routes"] = ROUTES
    node = node_factory(config=cfg)
    files = {
        "stat-ed-icu": _cr(tmp_path, "nested", RequestAttributesPriority="STAT"),
        "stat-location": _cr(tmp_path, "icu", CurrentPatientLocation="ICU BED 4"),
        "stat-department": _cr(tmp_path, "ed", InstitutionalDepartmentName="Emergency Department"),
        "routine": _cr(tmp_path, "ward", CurrentPatientLocation="WARD 7", RequestAttributesPriority="ROUTINE"),
    }
    test = node.cli("route", "test", *map(str, files.values()))
    assert test.returncode == 0, test.stderr
    for want, f in files.items():  # `ainode route test` answers as the node will
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
        assert f"{uid}: {want} -> probe" in test.stdout, test.stdout
    storescu(node.port, list(files.values()))
    for want, f in files.items():
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
        s = wait_for(lambda u=uid: (x := node.study(u)) and x["jobs"] and x, 120, 0.5, f"job for {want}")
        (job,) = s["jobs"]
        assert (job["route"], job["priority"]) == (want, "routine" if want == "routine" else "stat")
