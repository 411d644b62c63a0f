"""Reading result objects back from a real PACS in end-to-end tests."""

from __future__ import annotations

import io
from collections.abc import Iterable

import pydicom
import requests

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def walk(items: Iterable[pydicom.Dataset], out: list[pydicom.Dataset] | None = None) -> list[pydicom.Dataset]:
    """Every content item of an SR tree, depth first."""
    out = [] if out is None else out
    for it in items:
        out.append(it)
        walk(it.get("ContentSequence", []), out)
    return out


def pacs_objects(pacs, study_uid: str | None = None) -> list[pydicom.Dataset]:
    """Every instance Orthanc holds (optionally of one study), fetched as DICOM files over its REST API."""
    out = []
    for iid in pacs.instances():
        ds = pydicom.dcmread(io.BytesIO(requests.get(f"{pacs.http_url}/instances/{iid}/file", timeout=30).content))
        if study_uid is None or str(ds.StudyInstanceUID) == study_uid:
            out.append(ds)
    return out
