"""Dose indices: CTDIvol from the images, SSDE (AAPM TG-204 / TG-220), CT Radiation Dose SR (TID 10011)
and the body region used to pick a reference level.

Values are copied as the scanner reported them; when a value is absent it stays absent.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# AAPM Report 204 (2011), exponential fits of the conversion factor f vs effective diameter (cm);
# AAPM Report 220 (2014) applies the same fits to the water-equivalent diameter.
SSDE_FIT = {32: (3.704369, 0.03671937), 16: (1.874799, 0.03875492)}

HEAD_PHANTOM_CODES = {"113690"}  # IEC Head Dosimetry Phantom (16 cm)
BODY_PHANTOM_CODES = {"113691"}  # IEC Body Dosimetry Phantom (32 cm)


def ssde_factor(wed_mm: float, phantom_cm: int) -> float:
    a, b = SSDE_FIT[phantom_cm]
    return a * math.exp(-b * wed_mm / 10.0)


def phantom_from_code(ds: Any) -> int | None:
    """16 or 32 from CTDIPhantomTypeCodeSequence (0018,9346), None if the scan does not say."""
    seq = ds.get("CTDIPhantomTypeCodeSequence") if ds is not None else None
    if not seq:
        return None
    code = str(seq[0].get("CodeValue", ""))
    if code in HEAD_PHANTOM_CODES:
        return 16
    if code in BODY_PHANTOM_CODES:
        return 32
    meaning = str(seq[0].get("CodeMeaning", "")).upper()
    return 16 if "HEAD" in meaning else 32 if "BODY" in meaning else None


def body_region(texts: list[str], cfg: dict[str, Any]) -> tuple[str | None, bool]:
    """(region, contrast) from BodyPartExamined / protocol / descriptions, by configured keywords."""
    up = " ".join(t for t in texts if t).upper()
    region = None
    for name, words in cfg["region_keywords"].items():
        if any(w in up for w in words):
            region = name
            break
    contrast = any(w in up for w in cfg["contrast_keywords"])
    return region, contrast


def reference_key(region: str | None, contrast: bool, table: dict[str, Any]) -> str | None:
    if region is None:
        return None
    if contrast and f"{region}_contrast" in table:
        return f"{region}_contrast"
    return region if region in table else None


# --------------------------------------------------------------------------- CT Radiation Dose SR
@dataclass
class DoseEvent:
    protocol: str = ""
    ctdivol: float | None = None
    dlp: float | None = None
    phantom_cm: int | None = None
    target_region: str = ""
    irradiation_uid: str = ""


@dataclass
class DoseReport:
    sop_instance_uid: str
    total_dlp: float | None = None
    events: list[DoseEvent] = field(default_factory=list)


def _concept(item: Any) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else ""


def _num(item: Any) -> float | None:
    mv = item.get("MeasuredValueSequence")
    if not mv:
        return None
    try:
        return float(mv[0].NumericValue)
    except (AttributeError, TypeError, ValueError):
        return None


def parse_dose_sr(ds: Any) -> DoseReport | None:
    """TID 10011 'X-Ray Radiation Dose Report' (113701): total DLP and per-acquisition CTDIvol / DLP."""
    if _concept(ds) != "113701":
        return None
    rep = DoseReport(str(ds.get("SOPInstanceUID", "")))
    for item in ds.get("ContentSequence", []):
        code = _concept(item)
        if code == "113811":  # CT Accumulated Dose Data
            for sub in item.get("ContentSequence", []):
                if _concept(sub) == "113813":
                    rep.total_dlp = _num(sub)
        elif code == "113819":  # CT Acquisition
            ev = DoseEvent()
            for sub in item.get("ContentSequence", []):
                c = _concept(sub)
                if c == "125203":
                    ev.protocol = str(sub.get("TextValue", ""))
                elif c == "123014" and sub.get("ConceptCodeSequence"):
                    ev.target_region = str(sub.ConceptCodeSequence[0].get("CodeMeaning", ""))
                elif c == "113769":
                    ev.irradiation_uid = str(sub.get("UID", ""))
                elif c == "113829":  # CT Dose
                    for d in sub.get("ContentSequence", []):
                        dc = _concept(d)
                        if dc == "113830":
                            ev.ctdivol = _num(d)
                        elif dc == "113838":
                            ev.dlp = _num(d)
                        elif dc == "113835" and d.get("ConceptCodeSequence"):
                            v = str(d.ConceptCodeSequence[0].CodeValue)
                            ev.phantom_cm = 16 if v in HEAD_PHANTOM_CODES else 32 if v in BODY_PHANTOM_CODES else None
            rep.events.append(ev)
    return rep
