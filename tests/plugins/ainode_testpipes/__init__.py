"""A pipeline outside the ainode package, found through the ``ainode.pipelines`` entry point.

It reports exactly what it was given (pixel checksums, z order) so tests can check the node
delivered the right pixels, and it can sleep to let tests kill a worker mid-task.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np

from pipelines.base import Pipeline, PipelineResult, Refused, StudyInput


class ProbePipeline(Pipeline):
    name = "probe"
    version = "0.1"

    def run(self, study: StudyInput) -> PipelineResult:
        marker = self.options.get("marker_dir")
        if marker:
            Path(marker).mkdir(parents=True, exist_ok=True)
            (Path(marker) / f"attempt-{os.getpid()}-{time.time():.6f}").write_text(study.study_uid)
        time.sleep(float(self.options.get("sleep", 0)))
        if self.options.get("refuse"):
            raise Refused(str(self.options["refuse"]))
        if self.options.get("fail"):
            raise RuntimeError(str(self.options["fail"]))
        series = []
        for s in study.series:
            entry = {"series_uid": s.series_uid, "modality": s.modality, "frames": len(s.frames),
                     "photometric": s.photometric}
            if s.pixels is not None:
                px = np.ascontiguousarray(s.pixels, dtype=np.float32)
                entry["sha256"] = hashlib.sha256(px.tobytes()).hexdigest()
                entry["shape"] = list(px.shape)
            if s.slice_positions is not None:
                entry["z"] = [float(z) for z in s.slice_positions]
            series.append(entry)
        return PipelineResult(self.name, self.version,
                              details={"series": series, "pid": os.getpid(), "instance": id(self)})
