"""Shape of a finished SR content tree for text renderers: a compact Image Library, SEPARATE containers."""

from __future__ import annotations

from pydicom.dataset import Dataset


def _item_key(item: Dataset) -> tuple:
    name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
    value: tuple = ()
    if "MeasuredValueSequence" in item:
        mv = item.MeasuredValueSequence[0]
        value = (str(mv.NumericValue), str(mv.MeasurementUnitsCodeSequence[0].CodeValue))
    elif "ConceptCodeSequence" in item:
        value = (str(item.ConceptCodeSequence[0].CodeValue), str(item.ConceptCodeSequence[0].CodingSchemeDesignator))
    for kw in ("UID", "TextValue"):
        if kw in item:
            value = (str(item.get(kw)),)
    return (str(item.ValueType), str(item.RelationshipType), name and str(name.CodeValue),
            name and str(name.CodingSchemeDesignator), value)


def compact_image_library(root: Dataset) -> None:
    """TID 1600 lets an Image Library Group carry the descriptors its images share: say them once there.

    highdicom repeats 15 descriptors under every image; a CT report with ROIs on a dozen slices then
    opens (dsr2html, PACS SR text views) with pages of identical pixel spacings before the first number.
    """
    for lib in root.ContentSequence:
        if lib.get("ValueType") != "CONTAINER" or lib.ConceptNameCodeSequence[0].CodeValue != "111028":
            continue
        for group in lib.get("ContentSequence", []):
            group_level = [c for c in group.ContentSequence if c.ValueType != "IMAGE"]
            entries = [c for c in group.ContentSequence if c.ValueType == "IMAGE"]
            if not entries:
                continue
            shared = [d for d in entries[0].get("ContentSequence", [])
                      if all(any(_item_key(d) == _item_key(x) for x in e.get("ContentSequence", []))
                             for e in entries[1:])]
            keys = {_item_key(d) for d in shared}
            have = {_item_key(d) for d in group_level}
            for e in entries:
                rest = [d for d in e.get("ContentSequence", []) if _item_key(d) not in keys]
                if rest:
                    e.ContentSequence = rest
                elif "ContentSequence" in e:
                    del e.ContentSequence
            group.ContentSequence = group_level + [d for d in shared if _item_key(d) not in have] + entries


def make_separate(item: Dataset) -> None:
    """Every container SEPARATE: its items are not one running sentence, and with CONTINUOUS dsr2html
    (what many PACS show SR with) prints values without their concept names."""
    if item.get("ValueType") == "CONTAINER" or "ContinuityOfContent" in item:
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        make_separate(child)
