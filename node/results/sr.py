"""TID 1500 Measurement Report: findings and measurements as machine-readable SR.

One measurement group per finding (or per region of a finding) and per measurement group name, so a
viewer or registry can track each one across re-runs by its tracking UID. Findings are coded
qualitative evaluations (finding code -> Present/Absent) with a Probability NUM; regions become
SCOORD in a TID 1410 planar ROI group; measurements keep their UCUM units.
"""

from __future__ import annotations

import logging

import numpy as np
from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
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
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.enum import RelationshipTypeValues
from highdicom.sr.value_types import ContentSequence
from pydicom.dataset import Dataset

from pipelines.base import UCUM_RATIO, Finding, ImageRef, PipelineResult, Region
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
from .srgroups import (
    ANALYSED_IMAGE,
    anchor_on_key_image,
    by_group,
    evaluations_by_group,
    finding_has_region,
    group_count,
    group_has_region,
    planar_group_count,
    planar_region,
    planar_regions,
)
from .srlayout import compact_image_library, make_separate

log = logging.getLogger(__name__)

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
    out = [Measurement(C.probability_of(f.code.meaning), float(f.probability), C.concept(UCUM_RATIO),
                       referenced_coordinates=[_coords(r) for r in regions] if regions else None)]
    if f.threshold is not None:  # what the probability was compared with, next to it
        out.append(Measurement(C.THRESHOLD, float(f.threshold), C.concept(UCUM_RATIO)))
    return out


def _finding_groups(f: Finding, result: PipelineResult, planar_ok: bool = True) -> list:
    sites = [FindingSite(C.concept(f.site))] if f.site else None
    common = dict(finding_type=C.concept(f.code), algorithm_id=algorithm(result), finding_sites=sites)
    planar = planar_regions(f) if planar_ok else []
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


def _measurement(m: ResultMeasurement, result: PipelineResult, with_coords: bool,
                 name: CodedConcept | None = None) -> Measurement:
    coords = None
    if with_coords and m.region is not None:
        coords = [_coords(m.region)]
    return Measurement(
        name or C.concept(m.code), float(m.value), C.concept(m.unit),
        derivation=C.concept(m.derivation) if m.derivation else None,
        finding_sites=[FindingSite(C.concept(m.site))] if m.site else None, referenced_coordinates=coords)


def _measurement_groups(result: PipelineResult, planar_ok: bool = True) -> list:
    """Groups for the measurements that have an image region; the others are study-level (Derived)."""
    evals = evaluations_by_group(result)
    groups = []
    for name, ms in by_group(result).items():
        if not group_has_region(ms):
            continue
        q = [QualitativeEvaluation(C.concept(e.name), C.concept(e.value)) for e in evals.get(name, [])]
        sites = [FindingSite(C.concept(ms[0].site))] if ms[0].site and all(m.site == ms[0].site for m in ms) else None
        common = dict(tracking_identifier=_tracking(name), algorithm_id=algorithm(result),
                      qualitative_evaluations=q or None)
        only = planar_region(ms) if planar_ok else None
        if only is not None:
            groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
                referenced_region=image_region(only), finding_sites=sites,
                measurements=[_measurement(m, result, with_coords=False,
                                           name=C.outline_concept(m.code, only.label, first=i == 0))
                              for i, m in enumerate(ms)], **common))
        else:
            groups.append(MeasurementsAndQualitativeEvaluations(
                finding_sites=sites, measurements=[_measurement(m, result, with_coords=True) for m in ms], **common))
    return groups


def _groups(result: PipelineResult, sources: list[Source], planar_ok: bool) -> list:
    """TID 1500 Imaging Measurements: only groups with an image region (what viewers draw)."""
    groups = []
    for f in result.findings:
        if finding_has_region(f):
            groups.extend(_finding_groups(f, result, planar_ok))
    groups.extend(_measurement_groups(result, planar_ok))
    return groups


def _analysed_image_group(region: Region, result: PipelineResult, negative: bool
                          ) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    q = [QualitativeEvaluation(C.FINDING, C.NO_ABNORMALITY)] if negative else None
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(ANALYSED_IMAGE), referenced_region=image_region(region),
        algorithm_id=algorithm(result), qualitative_evaluations=q)


# --------------------------------------------------------------------------- study-level content
def _text(name: CodedConcept, value: str, rel: RelationshipTypeValues = RelationshipTypeValues.CONTAINS
          ) -> TextContentItem:
    return TextContentItem(name, value[:1024], relationship_type=rel)


def _series_image(series_uid: str | None, sources: list[Source]) -> list[SourceImageForMeasurement]:
    """One image of the series a study-level number describes (the middle one), so a reader knows which."""
    imgs = [s for s in sources if s.is_image and series_uid and str(s.header.SeriesInstanceUID) == series_uid]
    if not imgs:
        return []
    s = imgs[len(imgs) // 2]
    return [SourceImageForMeasurement(str(s.header.SOPClassUID), s.sop_uid)]


def _derived_num(name: CodedConcept, value: float, unit: CodedConcept, meaning: str,
                 images: list[SourceImageForMeasurement], derivation: CodedConcept | None = None,
                 site: CodedConcept | None = None) -> Measurement:
    """TID 300 NUM with its human wording as Equivalent Meaning of Concept Name (what a reader sees)."""
    num = Measurement(name, value, unit, derivation=derivation,
                      finding_sites=[FindingSite(site)] if site else None, referenced_images=images or None)
    item = num[0]
    equivalent = _text(C.EQUIVALENT_MEANING, meaning, RelationshipTypeValues.HAS_CONCEPT_MOD)
    item.ContentSequence = ContentSequence([equivalent, *item.get("ContentSequence", [])])
    return num


def _derived_items(result: PipelineResult, sources: list[Source], key: ImageRef | None) -> list[Dataset]:
    """Study-level numbers (TID 1500 Derived Imaging Measurements, TID 300): no image region to draw."""
    out: list[Dataset] = []
    for name, ms in by_group(result).items():
        if group_has_region(ms):
            continue
        for m in ms:
            meaning = f"{name}: {m.label}" if m.label and m.label != name else (name or m.code.meaning)
            out.extend(_derived_num(C.concept(m.code), float(m.value), C.concept(m.unit), meaning,
                                    _series_image(m.series_uid, sources),
                                    derivation=C.concept(m.derivation) if m.derivation else None,
                                    site=C.concept(m.site) if m.site else None))
    for f in result.findings:
        if finding_has_region(f) or f.probability is None:
            continue
        refs = f.key_images or ([key] if key else [])
        images = [SourceImageForMeasurement(r.sop_class_uid, r.sop_instance_uid,
                                            referenced_frame_numbers=[r.frame] if r.frame else None) for r in refs[:1]]
        out.extend(_derived_num(C.PROBABILITY, float(f.probability), C.concept(UCUM_RATIO),
                                f"Probability of {f.code.meaning} ({f.label})", images))
        if f.threshold is not None:  # what the probability was compared with, next to it
            out.extend(_derived_num(C.THRESHOLD, float(f.threshold), C.concept(UCUM_RATIO),
                                    f"Operating threshold for present, {f.code.meaning} ({f.label})", images))
    return out


def _qualitative_items(result: PipelineResult, negative: bool) -> list:
    """TID 1500 Qualitative Evaluations: the document's own caveats, then findings and verdicts without a
    region (coded, each followed by a sentence naming what it is about)."""
    C_ = RelationshipTypeValues.CONTAINS
    items: list = []
    if result.unverified:
        items.append(_text(C.COMMENT, UNVERIFIED_TEXT))
    items.append(_text(C.COMMENT, DRAFT_TEXT))
    if result.critical:
        items.append(CodeContentItem(C.CRITICAL_RESULT, C.YES, relationship_type=C_))
    if negative:
        items.append(CodeContentItem(C.FINDING, C.NO_ABNORMALITY, relationship_type=C_))
    for f in result.findings:
        if finding_has_region(f):
            continue
        items.append(CodeContentItem(C.concept(f.code), C.PRESENT if f.present else C.ABSENT, relationship_type=C_))
        if f.critical and f.present:
            items.append(_text(C.COMMENT, f"{f.label}: critical result"))
    measured = {name for name, ms in by_group(result).items() if group_has_region(ms)}
    for name, es in evaluations_by_group(result).items():
        if name in measured:
            continue  # already inside its measurement group
        for e in es:
            items.append(CodeContentItem(C.concept(e.name), C.concept(e.value), relationship_type=C_))
            about = f"{name}: " if name else ""
            items.append(_text(C.COMMENT, f"{about}{e.name.meaning} {e.value.meaning}" + (f" ({e.note})" if e.note
                                                                                          else "")))
    return items


def _container(name: CodedConcept, children: list) -> ContainerContentItem:
    box = ContainerContentItem(name, relationship_type=RelationshipTypeValues.CONTAINS, is_content_continuous=False)
    box.ContentSequence = ContentSequence(children)
    return box


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


def build_measurement_report(result: PipelineResult, sources: list[Source], key: ImageRef | None,
                             ctx: Context) -> Dataset:
    """TID 1500 in the layout viewers expect; see node/results/README.md ("Measurement report layout")."""
    negative = not any(f.present for f in result.findings) and not result.measurements and not result.evaluations
    result, analysed = anchor_on_key_image(result, sources, key)
    # PixelMed (2022) applies TID 1410 to every sibling group when exactly one has an Image Region
    # and reports the others as errors; the same region as INFERRED FROM SCOORD on the group's NUMs
    # (TID 1501 + TID 300) carries the same information and validates. Decided before building:
    # highdicom groups are slow to make, and building them twice cost a fifth of a chest X-ray's budget.
    planar_ok = planar_group_count(result) != 1 or group_count(result) == 1
    groups = _groups(result, sources, planar_ok=planar_ok)
    if analysed is not None:
        groups.append(_analysed_image_group(analysed, result, negative))
    modality = str(sources[0].header.get("Modality", ""))
    procedure = C.concept(result.procedure) if result.procedure else C.PROCEDURE_CID100.get(
        modality, C.PROCEDURE_IMAGING)
    for g in groups:  # say which template each group follows, for readers that dispatch on it
        _tag_template(g)
    placeholder = not groups  # highdicom insists on one group; the container is dropped again below
    report = MeasurementReport(
        observation_context=observation_context(result, ctx), procedure_reported=procedure,
        imaging_measurements=groups or [_placeholder_group(result)], title=C.IMAGING_MEASUREMENT_REPORT,
        referenced_images=_referenced_images(result, sources, key) or None)
    root = report[0]
    if placeholder:
        root.ContentSequence = [c for c in root.ContentSequence
                                if c.ConceptNameCodeSequence[0].CodeValue != C.IMAGING_MEASUREMENTS.value]
    derived = _derived_items(result, sources, key)
    if derived:
        root.ContentSequence.append(_container(C.DERIVED_IMAGING_MEASUREMENTS, derived))
    root.ContentSequence.append(_container(C.QUALITATIVE_EVALUATIONS, _qualitative_items(result, negative)))
    compact_image_library(root)
    make_separate(root)
    cls = Comprehensive3DSR if ctx.sr_class == "comprehensive3d" else ComprehensiveSR
    evidence = [s.header for s in sources if s.is_image] or [sources[0].header]
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


def _placeholder_group(result: PipelineResult) -> MeasurementsAndQualitativeEvaluations:
    return MeasurementsAndQualitativeEvaluations(tracking_identifier=_tracking("placeholder"),
                                                 algorithm_id=algorithm(result))


def _tag_template(group) -> None:
    tid = "1410" if isinstance(group, PlanarROIMeasurementsAndQualitativeEvaluations) else "1501"
    item = Dataset()
    item.MappingResource = "DCMR"
    item.TemplateIdentifier = tid
    group[0].ContentTemplateSequence = [item]


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
