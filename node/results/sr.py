"""TID 1500 Measurement Report: findings and measurements as machine-readable SR.

One measurement group per finding (or per region of a finding) and per measurement group name, so a
viewer or registry can track each one across re-runs by its tracking UID. Findings are coded
qualitative evaluations (finding code -> Present/Absent) with a Probability NUM; regions become
SCOORD in a TID 1410 planar ROI group; measurements keep their UCUM units.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
from highdicom.sr import (
    CodeContentItem,
    Comprehensive3DSR,
    ComprehensiveSR,
    ContainerContentItem,
    CoordinatesForMeasurement,
    FindingSite,
    ImageLibraryEntryDescriptors,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.enum import RelationshipTypeValues
from highdicom.sr.value_types import ContentSequence
from pydicom.dataset import Dataset

from pipelines.base import UCUM_RATIO, Evaluation, Finding, ImageRef, PipelineResult, Region
from pipelines.base import Measurement as ResultMeasurement

from . import codes as C
from .common import (
    CHARSET,
    DRAFT_TEXT,
    UNVERIFIED_TEXT,
    Context,
    algorithm,
    new_uid,
    observation_context,
    series_description,
)
from .sources import Source, clone_header, find

log = logging.getLogger(__name__)

PLANAR_TYPES = {"POLYLINE", "CIRCLE", "ELLIPSE"}


def _source_for_region(ref: ImageRef) -> SourceImageForRegion:
    return SourceImageForRegion(ref.sop_class_uid, ref.sop_instance_uid,
                                referenced_frame_numbers=[ref.frame] if ref.frame else None)


def _graphic(region: Region) -> np.ndarray:
    pts = np.asarray(region.points, dtype=float).reshape(-1, 2)
    if region.graphic_type == "POLYLINE" and len(pts) > 2 and not np.allclose(pts[0], pts[-1]):
        pts = np.vstack([pts, pts[:1]])  # TID 1410 wants a closed outline for an area ROI
    return pts


def image_region(region: Region) -> ImageRegion:
    return ImageRegion(region.graphic_type, _graphic(region), _source_for_region(region.image))


def _tracking(label: str) -> TrackingIdentifier:
    return TrackingIdentifier(uid=new_uid(), identifier=(label or "AI finding")[:64])


def _finding_evaluations(f: Finding) -> list[QualitativeEvaluation]:
    evs = [QualitativeEvaluation(C.concept(f.code), C.PRESENT if f.present else C.ABSENT)]
    if f.critical and f.present:
        evs.append(QualitativeEvaluation(C.CRITICAL_RESULT, C.YES))
    return evs


def _coords(region: Region) -> CoordinatesForMeasurement:
    return CoordinatesForMeasurement(region.graphic_type, _graphic(region), _source_for_region(region.image))


def _probability(f: Finding, result: PipelineResult, regions: list[Region] | None = None) -> list[Measurement]:
    """Probability NUM; in a TID 1501 group the regions hang off it as INFERRED FROM SCOORD (TID 300)."""
    if f.probability is None:
        return []
    out = [Measurement(C.PROBABILITY, float(f.probability), C.concept(UCUM_RATIO),
                       referenced_coordinates=[_coords(r) for r in regions] if regions else None)]
    if f.threshold is not None:  # what the probability was compared with, next to it
        out.append(Measurement(C.THRESHOLD, float(f.threshold), C.concept(UCUM_RATIO)))
    return out


def _planar_regions(f: Finding) -> list[Region]:
    """The outlines of a finding that become TID 1410 groups (one group each) when planar groups are allowed."""
    return [r for r in f.regions if r.graphic_type in PLANAR_TYPES]


def _by_group(result: PipelineResult) -> OrderedDict[str, list[ResultMeasurement]]:
    """Measurements per group name, in result order: one SR measurement group each."""
    by_group: OrderedDict[str, list[ResultMeasurement]] = OrderedDict()
    for m in result.measurements:
        by_group.setdefault(m.group or m.label or m.code.meaning, []).append(m)
    return by_group


def _planar_region(ms: list[ResultMeasurement]) -> Region | None:
    """The one planar outline all measurements of a group share, which makes the group TID 1410; else None."""
    regions = {id(m.region): m.region for m in ms if m.region is not None}
    only = next(iter(regions.values())) if len(regions) == 1 else None
    if only is not None and all(m.region is only for m in ms) and only.graphic_type in PLANAR_TYPES:
        return only
    return None


def planar_group_count(result: PipelineResult) -> int:
    """How many TID 1410 groups ``_groups(..., planar_ok=True)`` makes, without building any of them."""
    return (sum(len(_planar_regions(f)) for f in result.findings)
            + sum(_planar_region(ms) is not None for ms in _by_group(result).values()))


def group_count(result: PipelineResult) -> int:
    """How many groups ``_groups(..., planar_ok=True)`` makes: a finding one per outline (at least one),
    a measurement group one, evaluations whose group has no measurements one per group name."""
    by_group = _by_group(result)
    eval_only = {e.group for e in result.evaluations} - set(by_group)
    return sum(max(1, len(_planar_regions(f))) for f in result.findings) + len(by_group) + len(eval_only)


def _finding_groups(f: Finding, result: PipelineResult, planar_ok: bool = True) -> list:
    sites = [FindingSite(C.concept(f.site))] if f.site else None
    common = dict(finding_type=C.concept(f.code), algorithm_id=algorithm(result), finding_sites=sites)
    planar = _planar_regions(f) if planar_ok else []
    groups = []
    if not planar:
        refs = f.key_images or [r.image for r in f.regions]
        src = [SourceImageForMeasurementGroup(r.sop_class_uid, r.sop_instance_uid,
                                              referenced_frame_numbers=[r.frame] if r.frame else None)
               for r in refs] or None
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(f.label), measurements=_probability(f, result, f.regions),
            qualitative_evaluations=_finding_evaluations(f), source_images=src, **common))
    for i, region in enumerate(planar):  # one group per outline: TID 1410 holds exactly one region
        label = f.label if len(planar) == 1 else f"{f.label} region {i + 1}"
        groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(label), referenced_region=image_region(region),
            measurements=_probability(f, result), qualitative_evaluations=_finding_evaluations(f), **common))
    return groups


def _measurement(m: ResultMeasurement, result: PipelineResult, with_coords: bool) -> Measurement:
    coords = None
    if with_coords and m.region is not None:
        coords = [_coords(m.region)]
    return Measurement(
        C.concept(m.code), float(m.value), C.concept(m.unit),
        derivation=C.concept(m.derivation) if m.derivation else None,
        finding_sites=[FindingSite(C.concept(m.site))] if m.site else None, referenced_coordinates=coords)


def _series_images(series_uid: str, sources: list[Source]) -> list[SourceImageForMeasurementGroup]:
    return [SourceImageForMeasurementGroup(str(s.header.SOPClassUID), s.sop_uid)
            for s in sources if s.is_image and str(s.header.SeriesInstanceUID) == series_uid]


def _measurement_groups(result: PipelineResult, sources: list[Source], planar_ok: bool = True) -> list:
    by_group = _by_group(result)
    evals: OrderedDict[str, list[Evaluation]] = OrderedDict()
    for e in result.evaluations:
        evals.setdefault(e.group, []).append(e)
    groups = []
    for name, ms in by_group.items():
        q = [QualitativeEvaluation(C.concept(e.name), C.concept(e.value)) for e in evals.pop(name, [])]
        sites = [FindingSite(C.concept(ms[0].site))] if ms[0].site and all(m.site == ms[0].site for m in ms) else None
        common = dict(tracking_identifier=_tracking(name), algorithm_id=algorithm(result),
                      qualitative_evaluations=q or None)
        only = _planar_region(ms) if planar_ok else None
        if only is not None:
            groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
                referenced_region=image_region(only), finding_sites=sites,
                measurements=[_measurement(m, result, with_coords=False) for m in ms], **common))
        else:
            series = {m.series_uid for m in ms if m.series_uid and m.region is None}
            src = [img for uid in sorted(series) for img in _series_images(uid, sources)] or None
            groups.append(MeasurementsAndQualitativeEvaluations(
                source_images=src, finding_sites=sites,
                measurements=[_measurement(m, result, with_coords=True) for m in ms], **common))
    for name, es in evals.items():  # evaluations without measurements get their own group
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(name or es[0].name.meaning), algorithm_id=algorithm(result),
            qualitative_evaluations=[QualitativeEvaluation(C.concept(e.name), C.concept(e.value)) for e in es]))
    return groups


def _no_findings_group(result: PipelineResult) -> MeasurementsAndQualitativeEvaluations:
    """TID 1500 needs one group; a negative result states itself rather than looking like a failure."""
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking("No findings"), algorithm_id=algorithm(result),
        qualitative_evaluations=[QualitativeEvaluation(C.FINDING, C.NO_ABNORMALITY)])


def _referenced_images(result: PipelineResult, sources: list[Source], key: ImageRef | None) -> list[Dataset]:
    uids: list[str] = []
    refs = list(result.key_images) + ([key] if key else [])
    refs += [r.image for f in result.findings for r in f.regions] + [r for f in result.findings for r in f.key_images]
    refs += [m.region.image for m in result.measurements if m.region is not None]
    for r in refs:
        if r.sop_instance_uid not in uids:
            uids.append(r.sop_instance_uid)
    out = []
    for uid in uids:
        s = find(sources, uid)
        if s is not None and s.is_image:
            out.append(_library_header(s.header))
    return out


def _library_header(ds: Dataset) -> Dataset:
    """highdicom's TID 1602 descriptors read modality-specific attributes unguarded (a CR without
    ImagerPixelSpacing raises); such an image still belongs in the library, with generic descriptors."""
    try:
        ImageLibraryEntryDescriptors(ds)
        return ds
    except (AttributeError, TypeError, ValueError, IndexError) as exc:
        log.debug("image library: generic descriptors for %s (%s)", ds.SOPInstanceUID, exc)
        generic = clone_header(ds)
        generic.Modality = "OT"
        return generic


def _tag_template(group) -> None:
    tid = "1410" if isinstance(group, PlanarROIMeasurementsAndQualitativeEvaluations) else "1501"
    item = Dataset()
    item.MappingResource = "DCMR"
    item.TemplateIdentifier = tid
    group[0].ContentTemplateSequence = [item]


def _notes(result: PipelineResult) -> ContainerContentItem:
    """TID 1500 row 12 container: where free text about the whole report may live."""
    box = ContainerContentItem(C.QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS)
    items = []
    if result.unverified:
        items.append(TextContentItem(C.COMMENT, UNVERIFIED_TEXT, relationship_type=RelationshipTypeValues.CONTAINS))
    items.append(TextContentItem(C.COMMENT, DRAFT_TEXT, relationship_type=RelationshipTypeValues.CONTAINS))
    if result.critical:
        items.append(CodeContentItem(C.CRITICAL_RESULT, C.YES, relationship_type=RelationshipTypeValues.CONTAINS))
    box.ContentSequence = ContentSequence(items)
    return box


def _groups(result: PipelineResult, sources: list[Source], planar_ok: bool) -> list:
    groups = []
    for f in result.findings:
        groups.extend(_finding_groups(f, result, planar_ok))
    groups.extend(_measurement_groups(result, sources, planar_ok))
    return groups


def build_measurement_report(result: PipelineResult, sources: list[Source], key: ImageRef | None,
                             ctx: Context) -> Dataset:
    negative = not any(f.present for f in result.findings) and not result.measurements and not result.evaluations
    groups = [_no_findings_group(result)] if negative else []
    # PixelMed (2022) applies TID 1410 to every sibling group when exactly one has an Image Region
    # and reports the others as errors; the same region as INFERRED FROM SCOORD on the group's NUMs
    # (TID 1501 + TID 300) carries the same information and validates. Decided before building:
    # highdicom groups are slow to make, and building them twice cost a fifth of a chest X-ray's budget.
    planar_ok = planar_group_count(result) != 1 or len(groups) + group_count(result) == 1
    groups += _groups(result, sources, planar_ok=planar_ok)
    modality = str(sources[0].header.get("Modality", ""))
    procedure = C.concept(result.procedure) if result.procedure else C.PROCEDURE_CID100.get(
        modality, C.PROCEDURE_IMAGING)
    for g in groups:  # say which template each group follows, for readers that dispatch on it
        _tag_template(g)
    report = MeasurementReport(
        observation_context=observation_context(result, ctx), procedure_reported=procedure,
        imaging_measurements=groups, title=C.IMAGING_MEASUREMENT_REPORT,
        referenced_images=_referenced_images(result, sources, key) or None)
    report[0].ContentSequence.append(_notes(result))
    cls = Comprehensive3DSR if ctx.sr_class == "comprehensive3d" else ComprehensiveSR
    evidence = [s.header for s in sources if s.is_image] or [sources[0].header]
    root = report[0]
    sr = cls(
        evidence=evidence, content=_bare(root), series_instance_uid=new_uid(),
        series_number=ctx.series_number(0), sop_instance_uid=new_uid(), instance_number=1,
        manufacturer=ctx.manufacturer, institution_name=ctx.institution or None,
        previous_versions=ctx.previous_versions(narrative=False),
        performed_procedure_codes=[procedure], specific_character_set=CHARSET,
        series_description=series_description(result, "measurements"))
    attach_content(sr, root, evidence)
    C.declare_private_scheme(sr)
    return sr


def _bare(root: Dataset) -> Dataset:
    """The root container without its children: what highdicom's SR constructor gets to copy and walk."""
    bare = Dataset()
    for elem in root:
        if elem.keyword != "ContentSequence":
            bare.add(elem)
    bare.ContentSequence = []
    return bare


def referenced_sop_uids(item: Dataset) -> set[str]:
    """SOP Instance UIDs that IMAGE / COMPOSITE / WAVEFORM content items below ``item`` reference."""
    out: set[str] = set()
    stack = list(item.get("ContentSequence", []))
    while stack:
        it = stack.pop()
        out.update(str(ref.ReferencedSOPInstanceUID) for ref in it.get("ReferencedSOPSequence", []))
        stack.extend(it.get("ContentSequence", []))
    return out


def attach_content(sr: Dataset, root: Dataset, evidence: list[Dataset]) -> None:
    """Give a document made around ``_bare(root)`` the whole tree, as highdicom would have.

    highdicom's constructor deep-copies the content tree, parses the copy again and walks it four times
    (0.2 s for an 18-label chest X-ray report: a fifth of the one-second budget) to find the instances it
    references, which must all be in the evidence. Our evidence is every source image, and the document
    lists all of it whatever the tree references, so that walk changes nothing but the check: done here.
    (highdicom's parsed view, ``sr.content``, stays the bare root; nothing here reads it, and
    ``ComprehensiveSR.from_dataset`` parses the finished document.)
    """
    missing = referenced_sop_uids(root) - {str(e.SOPInstanceUID) for e in evidence}
    if missing:
        raise ValueError(f"the report references instances that are not among its sources: {sorted(missing)}")
    for elem in root:  # the root item's attributes are the document's top level (PS3.3 C.17.3)
        sr[elem.tag] = elem
