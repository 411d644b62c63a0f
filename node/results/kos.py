"""Key Object Selection "Of Interest": flags the images (and our SR/SC) a reader should open first.

Only made when there is something to look at: any present finding, or any critical evaluation (e.g.
image quality failed). A negative or measurement-only result gets no KOS, so the PACS does not mark
every AI-processed study as "of interest".
"""

from __future__ import annotations

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from pydicom.dataset import Dataset

from pipelines.base import ImageRef, PipelineResult

from . import codes as C
from .common import CHARSET, NOT_FOR_DIAGNOSIS, UNVERIFIED_TEXT, Context, device_observer, new_uid, series_description
from .sources import Source, find


def wants_kos(result: PipelineResult) -> bool:
    return any(f.present for f in result.findings) or any(e.critical for e in result.evaluations)


def _key_refs(result: PipelineResult, key: ImageRef | None) -> list[ImageRef]:
    refs: list[ImageRef] = list(result.key_images)
    for f in result.findings:
        if f.present:
            refs += f.key_images + [r.image for r in f.regions]
    if key is not None:
        refs.insert(0, key)
    seen: set[str] = set()
    out = []
    for r in refs:
        if r.sop_instance_uid not in seen:
            seen.add(r.sop_instance_uid)
            out.append(r)
    return out


def strip_concept_names(ds: Dataset) -> None:
    """TID 2010 forbids a concept name on the IMAGE/COMPOSITE items highdicom writes one on."""
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") in ("IMAGE", "COMPOSITE", "WAVEFORM") and "ConceptNameCodeSequence" in item:
            del item.ConceptNameCodeSequence
        strip_concept_names(item)


def build_kos(result: PipelineResult, sources: list[Source], key: ImageRef | None, objects: list[Dataset],
              ctx: Context) -> Dataset | None:
    if not wants_kos(result):
        return None
    images = [s.header for r in _key_refs(result, key) if (s := find(sources, r.sop_instance_uid)) is not None]
    referenced = images + list(objects)
    text = NOT_FOR_DIAGNOSIS + (f"; {UNVERIFIED_TEXT}" if result.unverified else "")
    critical = [f.name(ctx.language) for f in result.findings if f.critical and f.present]
    critical += [f"{e.name.meaning}: {e.value.meaning}" for e in result.evaluations if e.critical]
    # the flags as the pipeline set them: the reader sees why the study was selected
    flagged = (". CRITICAL: " + "; ".join(critical)) if critical else ""
    content = KeyObjectSelection(document_title=C.OF_INTEREST, referenced_objects=referenced,
                                 observer_device_context=device_observer(result, ctx),
                                 description=f"{text}. {result.pipeline}{flagged}"[:1024])
    kos = KeyObjectSelectionDocument(
        evidence=referenced, content=content, series_instance_uid=new_uid(), series_number=ctx.series_number(3),
        sop_instance_uid=new_uid(), instance_number=1, manufacturer=ctx.manufacturer,
        institution_name=ctx.institution or None, specific_character_set=CHARSET,
        series_description=series_description(result, "key images"))
    strip_concept_names(kos)
    C.declare_private_scheme(kos)
    return kos
