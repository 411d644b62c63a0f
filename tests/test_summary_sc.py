"""The summary Secondary Capture a radiologist reads in five seconds (issue 13).

Labels on the image are measured (their boxes are returned by the renderer): inside the picture, never on
top of each other or of an outline. Heat maps are drawn only for present findings. The CT quality summary
leads with the verdict and a table with one row per reconstruction; other pictures do not repeat it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import viewer_results as V  # noqa: E402

from node.results import EncodeOptions, encode  # noqa: E402
from node.results.render import DrawnRegion, Panel, compose, outline_box, panel_font_size  # noqa: E402
from pipelines.base import Code, Finding, ImageRef, ModelIdentity, Overlay, PipelineResult, Region  # noqa: E402


def _disjoint(a, b) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_labels_inside_the_image_and_pairwise_disjoint() -> None:
    ref = ImageRef("1.2", "1.2.3", "1.2.840.10008.5.1.4.1.1.2")
    # ROIs in a cluster, on every edge and in the corners: where labels used to overlap and clip
    centres = [(5, 5), (250, 5), (5, 250), (250, 250), (128, 2), (120, 120), (128, 126), (136, 120), (128, 114),
               (200, 128), (206, 128), (60, 200)]
    regions = [DrawnRegion(Region(ref, "CIRCLE", [c, (c[0] + 4, c[1])]), (0, 220, 255),
                           f"Paraspinal muscle {i} mean") for i, c in enumerate(centres)]
    grey = np.full((256, 256), 80, np.uint8)
    boxes: list = []
    out = compose(grey, regions, [], Panel("AI RESULT"), label_boxes=boxes)
    h = w = 1024  # upscaled x4
    assert out.shape[1] == w and len(boxes) >= 6
    outlines = [outline_box([((x + 0.5) * 4 - 0.5, (y + 0.5) * 4 - 0.5) for x, y in r.region.points], "CIRCLE")
                for r in regions]
    for i, b in enumerate(boxes):
        assert 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h, b
        assert all(_disjoint(b, o) for o in boxes[i + 1:])
        assert all(_disjoint(b, o) for o in outlines)


def test_heat_maps_only_for_present_findings() -> None:
    cr = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ref = ImageRef(str(cr.SeriesInstanceUID), str(cr.SOPInstanceUID), str(cr.SOPClassUID))
    top, bottom = np.zeros((64, 64), np.float32), np.zeros((64, 64), np.float32)
    top[8:20, 8:20] = 1.0
    bottom[44:56, 44:56] = 1.0
    result = PipelineResult(
        "cxr", "1.0.0", model=ModelIdentity("m", "1", verified=True), key_images=[ref],
        findings=[Finding(Code("36118008", "SCT", "Pneumothorax"), "Pneumothorax", True, 0.9, critical=True),
                  Finding(Code("60046008", "SCT", "Pleural effusion"), "Pleural effusion", False, 0.2)],
        overlays=[Overlay("cam-ptx", "heatmap", top, source=ref, caption="Pneumothorax: model probability 0.90"),
                  Overlay("cam-eff", "heatmap", bottom, source=ref,
                          caption="Pleural effusion: model probability 0.20")])
    sc = next(o for o in encode(result, [cr], EncodeOptions()) if o.Modality == "OT")
    rgb = sc.pixel_array.astype(int)
    r_, c_ = int(cr.Rows), int(cr.Columns)

    def colour(y: float, x: float) -> float:
        patch = rgb[int(y * r_) - 20:int(y * r_) + 20, int(x * c_) - 20:int(x * c_) + 20]
        return float((patch.max(axis=-1) - patch.min(axis=-1)).mean())

    assert colour(14 / 64, 14 / 64) > 60  # the present finding's map
    assert colour(50 / 64, 50 / 64) < 5  # the absent one's: anatomy in grey


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> V.Scenario:
    return V.ct_quality(tmp_path_factory.mktemp("ct"))


def test_ct_summary_leads_with_verdict_and_a_row_per_reconstruction(ct: V.Scenario) -> None:
    s = ct.result.details["summary"]["en"]
    assert s["headline"][0] == f"Image quality: {s['verdict'].upper()}"
    header, *rows = s["table"]
    assert header[:4] == ["Series", "Verdict", "Noise (GNL)", "CTDIvol"]
    assert [r[0] for r in rows] == [d["name"] for d in ct.result.details["series"]]
    for r, d in zip(rows, ct.result.details["series"]):
        assert r[1] == d["verdict"].upper() and r[2].startswith(f"{d['gnl']:.1f} HU") and r[3].endswith("mGy")
    assert [r[-1] for r in rows].count("baseline") == 1  # the reconstruction the gains are relative to
    assert ct.result.details["summary"]["zh"]["table"][0][0] == "序列"
    assert not any(m.code.meaning == "Signal to noise ratio" and "Air" in m.group for m in ct.result.measurements)


def test_only_the_key_image_carries_the_summary(ct: V.Scenario) -> None:
    """Issue 13: the same 16 lines were burned into every SC of the study; pictures now carry a caption."""
    key, *pictures = ct.scs
    pics = [o for o in ct.result.overlays if o.kind == "image"]
    assert len(pictures) == len(pics) >= 2
    for sc, ov in zip(pictures, pics):
        panel_h = int(sc.Rows) - ov.array.shape[0]
        size = panel_font_size(int(sc.Columns))
        assert panel_h <= size + 4 * round(size * 1.3), (ov.name, panel_h)
    assert int(key.Rows) - 1024 > 6 * round(panel_font_size(int(key.Columns)) * 1.3)  # headline + table
