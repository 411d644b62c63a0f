"""A model-free pipeline with a fixed, clearly fake finding: exercises every result object end to end."""

from __future__ import annotations

from pipelines.base import (
    UCUM_HU,
    Code,
    Finding,
    Measurement,
    Narrative,
    Pipeline,
    PipelineResult,
    Region,
    StudyInput,
)


class FinderPipeline(Pipeline):
    name = "finder"
    version = "0.2"

    def run(self, study: StudyInput) -> PipelineResult:
        s = next(s for s in study.series if s.pixels is not None)
        key = s.frames[len(s.frames) // 2]
        rows, cols = s.pixels.shape[1:3]
        box = [(cols * 0.3, rows * 0.3), (cols * 0.6, rows * 0.3), (cols * 0.6, rows * 0.6), (cols * 0.3, rows * 0.6),
               (cols * 0.3, rows * 0.3)]
        critical = bool(self.options.get("critical", False))
        finding = Finding(code=Code("36118008", "SCT", "Pneumothorax"), label="Pneumothorax", present=True,
                          probability=0.91, certainty="present", critical=critical,
                          site=Code("39607008", "SCT", "Lung"),
                          regions=[Region(key, "POLYLINE", box, "test region")], key_images=[key])
        roi = Region(key, "CIRCLE", [(cols / 2, rows / 2), (cols / 2 + 10, rows / 2)])
        m = Measurement(Code("112183", "DCM", "Standard Deviation of Attenuation Coefficient"), 12.5, UCUM_HU,
                        group="Test ROI", label="ROI SD", region=roi, series_uid=s.series_uid)
        return PipelineResult(
            self.name, self.version, findings=[finding], measurements=[m], key_images=[key],
            narrative={"en": Narrative(findings="Test finding in the left upper zone.",
                                       impression="Test impression.",
                                       critical="Test critical communication." if critical else ""),
                       "zh": Narrative(findings="左上肺野见测试病灶。", impression="测试印象：气胸。",
                                       critical="危急值测试。" if critical else "")},
            details={"series_uid": s.series_uid})
