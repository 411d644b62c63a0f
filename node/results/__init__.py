"""PipelineResult -> DICOM result objects (TID 1500 SR, TID 2000 narrative SR, SC summary, KOS).

One writer for every pipeline, so viewers see the same shapes whatever produced them. The worker calls
``encode()`` with a ``ValidatedWriter``'s ``add`` as ``on_object``, so each object is validated while the
next is made, then commits; nothing reaches the outbox without passing dciodvfy, dsrdump and PixelMed's
DicomSRValidator. ``write_validated()`` does the same for a finished list.

``encode()`` returns an empty list when ``result.status`` is not "ok" (refused / model unavailable):
there is nothing clinical to say, and the caller records ``result.reason`` in the node's status.

Series (base 900 by default): +0 TID 1500 SR, +1 TID 2000 narrative, +2 Secondary Captures (key image,
other annotated images, pipeline-rendered pictures), +3 KOS "Of Interest" -- made only when a finding is
present or an evaluation is critical, so negative studies are not flagged for attention.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from pipelines.base import PipelineResult

from .common import Context, new_uid
from .sources import SOPRef, copy_patient_study, key_image_ref, load_sources
from .validate import ValidationFailed, validate, validate_many
from .writer import ValidatedWriter, write_validated

__all__ = ["EncodeOptions", "SOPRef", "ValidatedWriter", "ValidationFailed", "encode", "validate", "validate_many",
           "write_validated"]

log = logging.getLogger(__name__)

#: Series offsets from ``series_number_base``: 900 measurements SR, 901 narrative, 902 SC, 903 KOS.
SERIES_OFFSETS = {"measurements": 0, "report": 1, "summary": 2, "key images": 3}


@dataclass
class EncodeOptions:
    language: str = "en"  # narrative language: "en" | "zh"
    sr_class: str = "comprehensive"  # or "comprehensive3d"
    predecessors: list[SOPRef] = field(default_factory=list)  # previous SRs this run supersedes
    institution: str = ""
    manufacturer: str = "ainode"
    device_uid: str | None = None
    series_number_base: int = 900


def encode(result: PipelineResult, sources: list[Path] | list[Dataset], options: EncodeOptions,
           on_object: Callable[[Dataset], None] | None = None) -> list[Dataset]:
    """Result objects in delivery order: measurement SR, narrative SR, SC image(s), then KOS if any.

    Not validated here: ``on_object`` gets each object, in that order, as soon as it is final (the worker
    passes ``ValidatedWriter.add``); otherwise the caller passes the list to ``write_validated``.
    """
    if result.status != "ok":
        log.info("result of %s has status %s; no objects encoded", result.pipeline, result.status)
        return []
    if options.sr_class not in ("comprehensive", "comprehensive3d"):
        raise ValueError(f"sr_class must be 'comprehensive' or 'comprehensive3d', not {options.sr_class!r}")
    with warnings.catch_warnings():
        # highdicom warns about single-component person names and quotes the name: that would put
        # patient names into worker logs. The names are copied as the source has them either way.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        return _encode(result, sources, options, on_object)


def _encode(result: PipelineResult, sources: list[Path] | list[Dataset], options: EncodeOptions,
            on_object: Callable[[Dataset], None] | None) -> list[Dataset]:
    from .kos import build_kos
    from .narrative import build_narrative
    from .sc import build_secondary_captures
    from .sr import build_measurement_report

    t0 = time.perf_counter()
    srcs = load_sources(sources)
    ctx = Context(language=options.language, sr_class=options.sr_class, predecessors=list(options.predecessors),
                  institution=options.institution, manufacturer=options.manufacturer,
                  device_uid=options.device_uid or new_uid(), series_number_base=options.series_number_base)
    key = key_image_ref(result, srcs)
    patient = srcs[0].header
    out: list[Dataset] = []

    def emit(obj: Dataset) -> None:
        copy_patient_study(obj, patient)
        out.append(obj)
        if on_object is not None:
            on_object(obj)

    emit(build_measurement_report(result, srcs, key, ctx))
    emit(build_narrative(result, srcs, ctx))
    for sc in build_secondary_captures(result, srcs, key, ctx):
        emit(sc)
    kos = build_kos(result, srcs, key, out, ctx)
    if kos is not None:
        emit(kos)
    log.info("encoded %d result objects for %s in %.2f s", len(out), result.pipeline, time.perf_counter() - t0)
    return out
