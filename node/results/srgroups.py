"""Which content of a result goes where in the TID 1500 report: drawn groups or study-level containers.

Decided from the result alone, before any highdicom item is built (building groups is slow), and in one
place, so that the report, its group counts and the viewers' needs cannot disagree. See README.md,
"Measurement report layout".
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

from pipelines.base import Evaluation, Finding, ImageRef, PipelineResult, Region
from pipelines.base import Measurement as ResultMeasurement

from .sources import Source, find

PLANAR_TYPES = {"POLYLINE", "CIRCLE", "ELLIPSE"}


def planar_regions(f: Finding) -> list[Region]:
    """The outlines of a finding that become TID 1410 groups (one group each) when planar groups are allowed."""
    return [r for r in f.regions if r.graphic_type in PLANAR_TYPES]


def by_group(result: PipelineResult) -> OrderedDict[str, list[ResultMeasurement]]:
    """Measurements per group name, in result order: one SR measurement group each."""
    out: OrderedDict[str, list[ResultMeasurement]] = OrderedDict()
    for m in result.measurements:
        out.setdefault(m.group or m.label or m.code.meaning, []).append(m)
    return out


def planar_region(ms: list[ResultMeasurement]) -> Region | None:
    """The one planar outline all measurements of a group share, which makes the group TID 1410; else None."""
    regions = {id(m.region): m.region for m in ms if m.region is not None}
    only = next(iter(regions.values())) if len(regions) == 1 else None
    if only is not None and all(m.region is only for m in ms) and only.graphic_type in PLANAR_TYPES:
        return only
    return None


def finding_has_region(f: Finding) -> bool:
    """Drawn in the viewer: an outline (TID 1410), or points under its probability (TID 1501 + SCOORD)."""
    return bool(planar_regions(f)) or (bool(f.regions) and f.probability is not None)


def group_has_region(ms: list[ResultMeasurement]) -> bool:
    return any(m.region is not None for m in ms)


def planar_group_count(result: PipelineResult) -> int:
    """How many TID 1410 groups ``_groups(..., planar_ok=True)`` makes, without building any of them."""
    return (sum(len(planar_regions(f)) for f in result.findings)
            + sum(planar_region(ms) is not None for ms in by_group(result).values()))


def group_count(result: PipelineResult) -> int:
    """How many measurement groups ``_groups(..., planar_ok=True)`` makes: only what has an image region."""
    return (sum(max(1, len(planar_regions(f))) for f in result.findings if finding_has_region(f))
            + sum(group_has_region(ms) for ms in by_group(result).values()))


def evaluations_by_group(result: PipelineResult) -> OrderedDict[str, list[Evaluation]]:
    evals: OrderedDict[str, list[Evaluation]] = OrderedDict()
    for e in result.evaluations:
        evals.setdefault(e.group, []).append(e)
    return evals


# --------------------------------------------------------------------------- nothing drawn otherwise
#: the most NUMs OHIF 3 writes beside an outline (DICOMSRDisplayTool shows the first five labels)
_LABEL_LINES = 5
ANALYSED_IMAGE = "Image analysed"


def _whole_image(key: ImageRef | None, sources: list[Source]) -> Region | None:
    s = find(sources, key.sop_instance_uid) if key else None
    if key is None or s is None or not s.is_image:
        return None
    rows, cols = int(s.header.get("Rows", 0) or 0), int(s.header.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        return None
    return Region(key, "POLYLINE", [(0.0, 0.0), (cols, 0.0), (cols, rows), (0.0, rows), (0.0, 0.0)],
                  label=ANALYSED_IMAGE)


def anchor_on_key_image(result: PipelineResult, sources: list[Source], key: ImageRef | None
                        ) -> tuple[PipelineResult, Region | None]:
    """A result with no image region would open in OHIF to a black viewport: its SR viewport shows the
    image of the first drawn group and nothing at all without one (echo; a negative chest X-ray).

    Such a result gets one TID 1410 group whose region is the whole key image. The first measurement group
    that is about the key image's series and fits beside it (echo's "Frames received") moves into
    it, so OHIF labels the outline with it; otherwise the group is the region alone. Returns the result
    with that group's measurements anchored, and the region when it must be added as a group of its own.
    """
    if group_count(result) or key is None:
        return result, None
    region = _whole_image(key, sources)
    if region is None:
        return result, None
    for ms in by_group(result).values():
        if len(ms) <= _LABEL_LINES and all(m.series_uid == key.series_uid for m in ms):
            ids = {id(m) for m in ms}
            return replace(result, measurements=[replace(m, region=region) if id(m) in ids else m
                                                 for m in result.measurements]), None
    return result, region
