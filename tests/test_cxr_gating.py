"""The cxr input checks on real radiographs: the NIH dev set is read, the negatives are refused with a reason.

The dev set is 156 frontal chest radiographs with no tags (NIH ChestX-ray14, 8-bit PNG), judged in
the three forms they reach a node: tagless DX, tagless CR MONOCHROME2, and CR MONOCHROME1 with the
pixels inverted. ``benchmarks/cxr_gating.py`` prints the same as a confusion table through the loader.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from support.cxr_data import dev_images, negatives, read_png, save, wrap
from support.cxr_models import xrv_model

from node.loader import load_study
from pipelines.base import Refused
from pipelines.cxr import CXRPipeline
from pipelines.cxr.gating import layout_score
from pipelines.cxr.preprocess import ImageRefused, prepare
from pipelines.models import InputSpec, Normalisation

SPEC = InputSpec(normalisation=Normalisation(kind="xrv", range=(-1024.0, 1024.0)))


@pytest.fixture(scope="module")
def dev() -> list[tuple[str, np.ndarray]]:
    pngs = dev_images()
    assert len(pngs) == 156, "the NIH dev radiographs (shared/data/nih-cxr-frontal-dev) are missing"
    return [(p.name, read_png(p)) for p in pngs]


@pytest.mark.parametrize("form", ["DX", "CR", "CR-MONOCHROME1"])
def test_dev_radiographs_without_tags_are_read(dev, form):
    refused, noted = {}, 0
    for name, px in dev:
        ds = wrap(px, form)
        try:
            p = prepare(ds.pixel_array.astype(np.float32), ds, ds.PhotometricInterpretation, None, SPEC)
        except ImageRefused as exc:
            refused[name] = str(exc)
            continue
        noted += bool(p.cautions)
        assert p.view == "FRONTAL" and any(n.startswith("chest from image heuristic") for n in p.notes)
    assert len(refused) <= 1, refused
    assert all("does not look like a frontal chest radiograph" in r for r in refused.values())
    assert noted <= 0.1 * len(dev)  # notes mark the unusual few, not every image


def test_negatives_refused_with_a_reason(tmp_path):
    cases = negatives(tmp_path)
    assert len(cases) >= 20
    pipe = CXRPipeline({})
    for name, path in cases:
        study = load_study([path])
        try:
            images, refused = pipe.prepare_images(study, SPEC)
        except Refused as exc:  # e.g. a colour image: refused before any image check
            images, refused = [], [str(exc)]
        assert not images, f"{name} was accepted"
        reason = refused[0]
        assert any(k in reason for k in ("does not look like a frontal chest radiograph", "not a frontal chest view",
                                         "not a greyscale image")), (name, reason)


def test_tags_decide_when_present(dev, tmp_path):
    name, px = dev[0]
    chest = wrap(px, "DX")
    for kw, value, reason in (("BodyPartExamined", "HAND", "BodyPartExamined is 'HAND'"),
                              ("ViewPosition", "LL", r"lateral view \(ViewPosition\)"),
                              ("SeriesDescription", "CHEST LAT", r"lateral view \(series description\)")):
        ds = wrap(px, "DX")
        setattr(ds, kw, value)
        with pytest.raises(ImageRefused, match=reason):
            prepare(px.astype(np.float32), ds, "MONOCHROME2", None, SPEC)
    chest.BodyPartExamined, chest.ViewPosition = "CHEST", "AP"
    p = prepare(px.astype(np.float32), chest, "MONOCHROME2", None, SPEC)
    assert p.view == "AP" and "chest from BodyPartExamined CHEST" in p.notes
    # the extremity radiograph: refused by its tag as stored, and by the image once the tags are gone
    rg3 = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"))
    with pytest.raises(ImageRefused, match="BodyPartExamined is 'EXTREMITY'"):
        prepare(rg3.pixel_array.astype(np.float32), rg3, "MONOCHROME1", None, SPEC)
    del rg3.BodyPartExamined, rg3.ViewPosition
    with pytest.raises(ImageRefused, match="does not look like a frontal chest radiograph"):
        prepare(rg3.pixel_array.astype(np.float32), rg3, "MONOCHROME1", None, SPEC)


def test_layout_score_is_polarity_and_content_sensitive(dev):
    px = dev[1][1].astype(np.float32) / 255
    assert layout_score(px) > 0.55 > layout_score(1.0 - px)
    assert layout_score(np.rot90(px).copy()) < 0.55  # a chest turned on its side is not the frontal layout


def test_unusual_chest_is_read_with_a_note_in_the_report(tmp_path):
    """The lowest-scoring dev radiograph (a portable AP with lines and a black band) is read, and says so."""
    model = xrv_model(tmp_path / "m", own_thresholds=True)
    png = next(p for p in dev_images() if p.name == "00013211_000.png")
    path = save(wrap(read_png(png), "DX"), tmp_path / "ap.dcm")
    r = CXRPipeline({}).run(load_study([path], options={"model": str(model), "allow_unverified_models": True}))
    assert r.status == "ok" and len(r.key_images) == 1
    assert any("read with caution: unusual layout for a frontal chest radiograph" in w for w in r.warnings)
    assert "Image check (the image): unusual layout" in r.narrative["en"].findings
    assert "图像核查" in r.narrative["zh"].findings
    assert r.details["images"][0]["cautions"]
    f = r.findings[0]
    assert f.threshold is not None and 0 < f.threshold < 1  # the operating point travels with the number
