"""A model-free pipeline that reports what it received: the node's own end-to-end probe.

It lets IT staff (and tests) check the whole path receive -> route -> worker -> results -> PACS
without a model, and it says plainly that it found nothing clinical.
"""

from __future__ import annotations

from pipelines.base import (
    PRIVATE_SCHEME,
    UCUM_RATIO,
    Code,
    Measurement,
    Narrative,
    Pipeline,
    PipelineResult,
    StudyInput,
)
from pipelines.options import EchoOptions


class EchoPipeline(Pipeline):
    name = "echo"
    Options = EchoOptions  # every option this pipeline reads (node.pipeline_options)
    version = "1.1.0"
    needs_pixels = False  # headers say all it reports; the results writer reads the key image itself

    def run(self, study: StudyInput) -> PipelineResult:
        self.check(study)
        series = self.select(study)
        measurements = []
        details: dict[str, object] = {"series": []}
        for s in series:
            n = len(s.frames)
            entry: dict[str, object] = {"series_uid": s.series_uid, "modality": s.modality, "frames": n}
            h = s.headers[0]
            entry.update(rows=int(h.get("Rows", 0) or 0), columns=int(h.get("Columns", 0) or 0))
            if s.slice_positions is not None:
                entry["slice_positions"] = [float(z) for z in s.slice_positions]
            details["series"].append(entry)  # type: ignore[union-attr]
            measurements.append(Measurement(
                code=Code("FRAMES", PRIVATE_SCHEME, "Frames received"), value=float(n),
                unit=UCUM_RATIO, group=f"Series {s.tags.get('SeriesNumber', '')}".strip(), series_uid=s.series_uid))
        total = sum(len(s.frames) for s in series)
        return PipelineResult(
            pipeline=self.name, pipeline_version=self.version, measurements=measurements,
            narrative={
                "en": Narrative(findings=f"Received {len(series)} series with {total} images. "
                                "This is a connectivity check, not a clinical analysis.",
                                impression="No clinical analysis performed."),
                "zh": Narrative(findings=f"已接收 {len(series)} 个序列，共 {total} 幅图像。"
                                         "此为连通性检查，并非临床分析。",
                                impression="未进行临床分析。"),
            },
            key_images=[series[0].frames[len(series[0].frames) // 2]] if series else [],
            details=details,
        )
