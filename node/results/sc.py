"""Secondary Capture summary images: the one result object every viewer can show.

The key image with the result drawn on it, plus one SC per pipeline-rendered picture (charts,
tables), all in one series. Text is burned in, so BurnedInAnnotation is YES and the header says
which image it was derived from and how.
"""

from __future__ import annotations

import logging

import numpy as np
from highdicom.sc import SCImage
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from pipelines.base import ImageRef, Overlay, PipelineResult

from . import codes as C
from .common import (
    CHARSET,
    NOT_FOR_DIAGNOSIS,
    UNVERIFIED_TEXT,
    Context,
    model_name,
    model_version,
    new_uid,
    series_description,
)
from .narrative import finding_lines, probability_text, words
from .render import (
    CYAN,
    GREEN,
    GREY,
    ORANGE,
    RED,
    WHITE,
    YELLOW,
    DrawnRegion,
    Panel,
    caption_strip,
    compose,
    display_values,
)
from .sources import Source, find, with_pixels

log = logging.getLogger(__name__)

_AXES = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, +y, +z of the patient coordinate system (LPS)


def _orientation_letter(v: np.ndarray) -> str:
    i = int(np.argmax(np.abs(v)))
    return _AXES[i][0] if v[i] > 0 else _AXES[i][1]


def patient_orientation(ds: Dataset) -> tuple[str, str] | None:
    """Row/column directions as single biped letters: from PatientOrientation, else ImageOrientationPatient."""
    po = ds.get("PatientOrientation")
    if po and len(po) == 2 and all(len(str(x)) == 1 and str(x) in "LRAPHF" for x in po):
        return str(po[0]), str(po[1])
    iop = ds.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        v = np.array([float(x) for x in iop])
        return _orientation_letter(v[:3]), _orientation_letter(v[3:])
    return None


MAX_PANEL_LINES = 12
VERDICT_COLOURS = {"pass": GREEN, "warn": ORANGE, "fail": RED}


def _present_first(result: PipelineResult) -> list:
    """Present findings, critical first, then by probability: the order a reader triages them in."""
    present = [f for f in result.findings if f.present]
    return sorted(present, key=lambda f: (not f.critical, -(f.probability or 0.0)))


def _panel(result: PipelineResult, ctx: Context, caption: str = "", full: bool = True) -> Panel:
    """The burned-in text. ``full``: the summary (headline, key numbers, table, findings as the legend of the
    outlines' colours); otherwise only the caption of a pipeline picture, so no SC repeats the summary."""
    w = words(ctx.language)
    lines: list[tuple[str, tuple[int, int, int]]] = []
    if result.unverified:
        lines.append((UNVERIFIED_TEXT, ORANGE))
    if caption:
        lines.append((caption, WHITE))
    table: list[list[str]] = []
    if full:
        summary = (result.details or {}).get("summary") or {}
        summary = summary.get(ctx.language) or summary.get("en") or {}
        for i, text in enumerate(summary.get("headline", [])):
            lines.append((text, VERDICT_COLOURS.get(summary.get("verdict", ""), WHITE) if i == 0 else WHITE))
        table = [list(map(str, row)) for row in summary.get("table", [])]
        for f in _present_first(result):
            p = f" ({probability_text(f, ctx.language)})" if f.probability is not None else ""
            state = w["possible"] if f.certainty == "possible" else w["present"]
            crit = f" — {w['critical']}" if f.critical else ""
            lines.append((f"■ {f.name(ctx.language)}: {state}{p}{crit}", RED if f.critical else YELLOW))
        if result.findings and not summary:
            absent = sum(not f.present for f in result.findings)
            if absent:
                lines.append((w["others_absent"].format(n=absent), WHITE))
        if not summary:  # numbers without a region (drawn ones are labelled on the image) and verdicts
            study_level = [m for m in result.measurements if m.region is None]
            probe = PipelineResult(result.pipeline, result.pipeline_version, measurements=study_level,
                                   evaluations=result.evaluations)
            others = finding_lines(probe, ctx.language)
            room = MAX_PANEL_LINES - len(lines)
            if len(others) > room:
                others = others[:room - 1] + [w["more"].format(n=len(others) - room + 1)]
            lines.extend((ln, WHITE) for ln in others)
        if not result.findings and not result.measurements and not result.evaluations:
            lines.append((w["none"], WHITE))
        lines.append((f"{w['algorithm']}: {model_name(result)} {model_version(result)}", GREY))
    return Panel(title=NOT_FOR_DIAGNOSIS, lines=lines, banner=_banner(result, ctx) if full else "",
                 language=ctx.language, table=table)


def _banner(result: PipelineResult, ctx: Context) -> str:
    if not result.critical:
        return ""
    return "CRITICAL FINDING" if ctx.language == "en" else f"CRITICAL FINDING / {words(ctx.language)['critical']}"


def _regions_on(result: PipelineResult, key: ImageRef, language: str = "en") -> list[DrawnRegion]:
    def same(r: ImageRef) -> bool:
        return _same_image(r, key)

    out = []
    for f in _present_first(result):
        for r in f.regions:
            if same(r.image):
                # a region's own label is in the pipeline's words (English); the finding's name is in the panel's
                label = f.names.get(language) or r.label or f.label
                out.append(DrawnRegion(r, RED if f.critical else YELLOW, label))
    seen: set[tuple] = set()
    for m in result.measurements:  # one outline per ROI even when several groups measured it
        if m.region is not None and same(m.region.image):
            k = (m.region.graphic_type, tuple(map(tuple, m.region.points)))
            if k not in seen:
                seen.add(k)
                out.append(DrawnRegion(m.region, CYAN, m.region.label or m.label))
    return out


def _base_sc(pixels: np.ndarray, ref: Dataset, result: PipelineResult, ctx: Context, series_uid: str,
             number: int) -> SCImage:
    orient = patient_orientation(ref)
    lat = str(ref.get("Laterality", "") or ref.get("ImageLaterality", "") or "")
    sc = SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=ctx.series_number(2),
        sop_instance_uid=new_uid(), instance_number=number, manufacturer=ctx.manufacturer,
        patient_orientation=orient or ("L", "F"), laterality=lat if lat in ("R", "L") else None,
        specific_character_set=CHARSET, series_description=series_description(result, "summary"))
    if orient is None:
        sc.PatientOrientation = ""  # type 2: unknown rather than a guess
    sc.ConversionType = "WSD"  # produced on a workstation, not digitised
    sc.BurnedInAnnotation = "YES"
    if "RecognizableVisualFeatures" in ref:  # a derived picture shows what its source shows
        sc.RecognizableVisualFeatures = ref.RecognizableVisualFeatures
    if ctx.institution:
        sc.InstitutionName = ctx.institution
    if "Laterality" not in sc:
        sc.Laterality = lat if lat in ("R", "L") else ""
    sc.ImageComments = NOT_FOR_DIAGNOSIS + (f"; {UNVERIFIED_TEXT}" if result.unverified else "")
    return sc


def _source_image_sequence(key: ImageRef) -> list[Dataset]:
    item = Dataset()
    item.ReferencedSOPClassUID = key.sop_class_uid
    item.ReferencedSOPInstanceUID = key.sop_instance_uid
    if key.frame:
        item.ReferencedFrameNumber = key.frame
    item.PurposeOfReferenceCodeSequence = [CodedConcept("121322", "DCM", C.SOURCE_IMAGE_PURPOSE.meaning)]
    return [item]


#: Besides the key image, at most this many other annotated images get their own SC.
MAX_EXTRA_ANNOTATED = 8


def _same_image(a: ImageRef, b: ImageRef) -> bool:
    return a.sop_instance_uid == b.sop_instance_uid and (a.frame or 1) == (b.frame or 1)


def _annotated_images(result: PipelineResult, key: ImageRef) -> list[ImageRef]:
    """Images other than the key image that carry a drawn region or a heat map / mask, in result order."""
    # measurement ROIs stay in the SR (SCOORD) and on the key image: an SC per ROI slice would bury the
    # reader in near-identical pictures (a CT quality report has ROIs on a dozen slices)
    refs = [r.image for f in result.findings if f.present for r in f.regions]
    refs += [o.source for o in result.overlays if o.kind in ("heatmap", "mask") and o.source is not None]
    out: list[ImageRef] = []
    for r in refs:
        if not _same_image(r, key) and not any(_same_image(r, o) for o in out):
            out.append(r)
    return out[:MAX_EXTRA_ANNOTATED]


def _for_present_finding(ov: Overlay, result: PipelineResult) -> bool:
    """A heat map captioned for a finding ("Effusion: model probability ...") is drawn only when that finding
    is present: maps of absent or merely possible labels cover the chest and hide what matters."""
    for f in result.findings:
        if not f.present and ov.caption.lower().startswith(f"{f.label.lower()}:"):
            return False
    return True


def _image_sc(result: PipelineResult, sources: list[Source], ref: ImageRef, ctx: Context, series_uid: str,
              number: int, is_key: bool) -> Dataset | None:
    src = find(sources, ref.sop_instance_uid)
    full = with_pixels(src) if src is not None else None
    if src is None or full is None:
        return None
    grey = display_values(full, ref.frame)
    overlays = [o for o in result.overlays if o.kind in ("heatmap", "mask") and _for_present_finding(o, result)
                and ((o.source is None and is_key) or (o.source is not None and _same_image(o.source, ref)))]
    pixels = compose(grey, _regions_on(result, ref, ctx.language), overlays, _panel(result, ctx))
    sc = _base_sc(pixels, src.header, result, ctx, series_uid, number)
    sc.SourceImageSequence = _source_image_sequence(ref)
    sc.DerivationDescription = (
        f"AI result {'summary' if is_key else 'annotation'} by {model_name(result)} {model_version(result)}: "
        "source image windowed for display, regions and heat maps drawn, findings text burned in")[:1024]
    return sc


def build_secondary_captures(result: PipelineResult, sources: list[Source], key: ImageRef | None,
                             ctx: Context) -> list[Dataset]:
    """Key image first, then other annotated images, then pipeline-rendered pictures; one series."""
    series_uid = new_uid()
    out: list[Dataset] = []
    header = sources[0].header
    if key is not None:
        sc = _image_sc(result, sources, key, ctx, series_uid, 1, is_key=True)
        if sc is None:
            log.warning("no key image pixels for %s; summary SC omitted", result.pipeline)
        else:
            out.append(sc)
            header = find(sources, key.sop_instance_uid).header  # type: ignore[union-attr]
        for ref in _annotated_images(result, key):
            extra = _image_sc(result, sources, ref, ctx, series_uid, len(out) + 1, is_key=False)
            if extra is not None:
                out.append(extra)
    for ov in result.overlays:
        if ov.kind != "image":
            continue
        pixels = caption_strip(ov.array, _panel(result, ctx, caption=ov.caption or ov.name, full=False))
        sc = _base_sc(pixels, header, result, ctx, series_uid, len(out) + 1)
        sc.DerivationDescription = f"Rendered by {model_name(result)} {model_version(result)}: {ov.caption or ov.name}"[
            :1024]
        out.append(sc)
    for sc in out:
        C.declare_private_scheme(sc)
    return out
