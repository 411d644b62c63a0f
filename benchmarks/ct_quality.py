"""Speed and memory of the ct_quality pipeline on a 300-slice 512x512 synthetic abdomen.

Not a test: prints timings and peak RSS. Target on a 2-core machine: pipeline <= 5 s, peak RSS <= 1.5 GB.

    python benchmarks/ct_quality.py                 # in memory: StudyInput built directly
    python benchmarks/ct_quality.py --dicom         # also write DICOM files and time node.loader
    python benchmarks/ct_quality.py --slices 300 --sigma 12 --correlation 0.8
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.base import ImageRef, SeriesInput, StudyInput  # noqa: E402
from pipelines.ct_quality import CTQualityPipeline  # noqa: E402
from tests.support.phantoms import OUTSIDE, PhantomSpec, noise_field, phantom_slice, write_series  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def in_memory_study(spec: PhantomSpec) -> StudyInput:
    """The StudyInput node.loader would build, without the disk round trip."""
    hu, lab = phantom_slice(spec)
    inside = lab != OUTSIDE
    rng = np.random.default_rng(spec.seed)
    px = np.empty((spec.n_slices, spec.rows, spec.cols), np.float32)
    for i in range(spec.n_slices):
        px[i] = np.where(inside, hu + noise_field((spec.rows, spec.cols), spec.sigma, spec.correlation_px, rng), hu)
    x0 = -(spec.cols - 1) / 2 * spec.spacing
    z = spec.z0 + np.arange(spec.n_slices) * spec.slice_spacing
    pos = np.stack([np.full_like(z, x0), np.full_like(z, x0), z], 1)
    uid = "1.2.826.0.1.3680043.8.498.1"
    frames = [ImageRef(uid, f"{uid}.{i + 1}", "1.2.840.10008.5.1.4.1.1.2") for i in range(spec.n_slices)]
    import pydicom

    headers = []
    for i in range(spec.n_slices):
        h = pydicom.Dataset()
        h.SOPInstanceUID = frames[i].sop_instance_uid
        h.SeriesInstanceUID = uid
        h.CTDIvol = spec.ctdivol
        h.KVP = spec.kvp
        h.ConvolutionKernel = spec.kernel
        h.BodyPartExamined = spec.body_part
        h.SeriesDescription = spec.description
        h.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        headers.append(h)
    s = SeriesInput(uid, "CT", "1.2.840.10008.5.1.4.1.1.2", frames, headers, px, (spec.spacing, spec.spacing), pos,
                    np.array([1.0, 0, 0, 0, 1, 0]), z, spec.slice_spacing,
                    tags={"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "SeriesNumber": 2,
                          "SeriesDescription": spec.description, "BodyPartExamined": spec.body_part,
                          "FrameOfReferenceUID": "1.2.3"})
    return StudyInput("1.2.826.0.1.3680043.8.498.0", [s], tags={"BodyPartExamined": spec.body_part})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--sigma", type=float, default=12.0)
    ap.add_argument("--correlation", type=float, default=0.8, help="Gaussian noise correlation, pixels")
    ap.add_argument("--dicom", action="store_true", help="write DICOM files and time node.loader too")
    args = ap.parse_args()
    spec = PhantomSpec(n_slices=args.slices, sigma=args.sigma, correlation_px=args.correlation, slice_spacing=1.25)
    pipe = CTQualityPipeline()
    t0 = time.perf_counter()
    if args.dicom:
        from node.loader import load_study

        with tempfile.TemporaryDirectory() as d:
            paths, _ = write_series(d, spec)
            t1 = time.perf_counter()
            print(f"write {len(paths)} DICOM files: {t1 - t0:.2f} s")
            study = load_study(paths)
            t2 = time.perf_counter()
            print(f"node.loader.load_study: {t2 - t1:.2f} s, peak RSS so far {peak_rss_mb():.0f} MB")
    else:
        study = in_memory_study(spec)
        t2 = time.perf_counter()
        print(f"build in-memory phantom ({args.slices} x 512 x 512): {t2 - t0:.2f} s, "
              f"peak RSS so far {peak_rss_mb():.0f} MB")
    t3 = time.perf_counter()
    res = pipe.run(study)
    t4 = time.perf_counter()
    gnl = res.details["series"][0]["gnl"]
    print(f"pipeline: {t4 - t3:.2f} s   GNL {gnl:.2f} HU (true {args.sigma:g})   "
          f"verdict {res.evaluations[0].value.meaning}")
    print(f"peak RSS: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
