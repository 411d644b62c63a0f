"""Result objects opened as a radiologist opens them: Orthanc (DICOMweb) as the PACS, OHIF 3 in headless
Chromium, and DCMTK dsr2html.

For CT quality, the chest X-ray (random-weight model) and echo, each TID 1500 SR, narrative SR and summary
SC is opened in OHIF's viewport; the test asserts there is no console error, that the measurement labels
OHIF draws name the quantities, that the viewport is not blank, and that the SC displays. Screenshots are
written under the test's tmp dir and their paths printed (``-s`` shows them).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from support import viewer_results as V
from support.orthanc import Orthanc
from support.viewer import OHIF_DIST, Browser, ViewerServer

#: Console noise that is OHIF's own and says nothing about our objects (none needed so far).
IGNORED_ERRORS: tuple[str, ...] = ()

LARGEST_CANVAS = """(() => {
  const cs = Array.from(document.querySelectorAll('canvas')).map(c => c.getBoundingClientRect())
    .filter(r => r.width > 100 && r.height > 100).sort((a, b) => b.width * b.height - a.width * a.height);
  return cs.length ? [cs[0].left, cs[0].top, cs[0].width, cs[0].height] : null;
})()"""
SVG_TEXT = "Array.from(document.querySelectorAll('svg text')).map(t => t.textContent).filter(t => t.trim())"
SVG_TEXT_BOXES = """Array.from(document.querySelectorAll('svg text')).filter(t => t.textContent.trim())
  .map(t => { const r = t.getBoundingClientRect(); return [t.textContent, r.left, r.top, r.right, r.bottom]; })"""
SKIP_TOUR = """(() => { const b = Array.from(document.querySelectorAll('button, a, span, div'))
  .find(e => e.textContent.trim() === 'Skip all'); if (b) b.click(); return !!b; })()"""


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory):
    assert (OHIF_DIST / "index.html").exists(), f"./scripts/test installs OHIF into {OHIF_DIST}"
    tmp = tmp_path_factory.mktemp("viewer")
    scenarios = {"ct_quality": V.ct_quality(tmp / "ct"), "cxr": V.cxr(tmp / "cxr"), "echo": V.echo(tmp / "echo"),
                 "cxr_negative": V.cxr(tmp / "cxr_negative", negative=True)}
    with Orthanc(tmp / "pacs", dicomweb=True) as pacs, ViewerServer(pacs.http_url) as server, Browser() as browser:
        for name, sc in scenarios.items():
            for f in sc.write(tmp / name / "out"):
                requests.post(f"{pacs.http_url}/instances", data=Path(f).read_bytes(), timeout=60).raise_for_status()
        yield tmp, scenarios, server, browser


def _open(viewer, scenario: V.Scenario, series_uid: str, shot: str) -> tuple[Browser, Path]:
    tmp, _, server, browser = viewer
    study = str(scenario.tid1500.StudyInstanceUID)
    browser.goto(f"{server.url}/viewer?StudyInstanceUIDs={study}&initialSeriesInstanceUID={series_uid}")
    browser.wait_js("document.body.innerText.includes('SR')", 90, "OHIF study browser")
    return browser, tmp / f"{shot}.png"


def _finish(browser: Browser, path: Path) -> np.ndarray:
    for _ in range(2):  # OHIF's first-visit tour may open after the page settles: dismiss it again
        browser.js(SKIP_TOUR)
        browser.pump(0.75)
    browser.screenshot(path)
    print(f"screenshot: {path}")
    errors = [e for e in browser.errors if not any(i in e for i in IGNORED_ERRORS)]
    assert not errors, errors
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32)


def _viewport(browser: Browser, img: np.ndarray) -> np.ndarray:
    rect = browser.js(LARGEST_CANVAS)
    assert rect, "no image viewport canvas"
    x, y, w, h = (int(round(v)) for v in rect)
    return img[y:y + h, x:x + w]


def _outlined_findings(scenario: V.Scenario) -> tuple[str, ...]:
    """What OHIF must write beside each outline of a chest X-ray: the finding, not only "Probability"."""
    return tuple(f"Probability of {f.code.meaning}" for f in scenario.result.findings
                 if f.present and any(r.graphic_type == "POLYLINE" for r in f.regions))


@pytest.mark.parametrize("name,names", [
    ("ct_quality", ("Paraspinal muscle 1 mean:", "Subcutaneous fat 1 mean:", "SD:", "[hnsf'U]")),
    ("cxr", ()),  # the outlined findings' names, from the result
    ("echo", ("Frames received",)),  # nothing has a region: drawn on the whole key image
])
def test_measurement_sr_draws_named_regions(viewer, name: str, names: tuple[str, ...]) -> None:
    sc = viewer[1][name]
    names = names or _outlined_findings(sc)
    assert names, f"{name}: nothing to look for"
    browser, shot = _open(viewer, sc, str(sc.tid1500.SeriesInstanceUID), f"{name}-tid1500")
    labels = browser.wait_js(SVG_TEXT, 120, f"{name}: OHIF measurement labels")
    img = _finish(browser, shot)
    text = " ".join(labels)
    for n in names:
        assert n in text, (n, labels[:10])
    vp = _viewport(browser, img)
    assert vp.std() > 10 and (vp > 60).mean() > 0.05, f"viewport looks blank: {shot}"  # anatomy, not black
    x, y, w, h = browser.js(LARGEST_CANVAS)
    # OHIF writes each label right of its outline at mid-height: the wording must fit across the viewport
    # (OHIF alone decides how far down a label of an outline at the image's lower edge goes)
    clipped = [t for t, left, top, right, _ in browser.js(SVG_TEXT_BOXES)
               if left < x - 1 or right > x + w + 1 or not y - 1 <= top <= y + h]
    assert not clipped, f"labels run off the viewport: {clipped} ({shot})"


def test_negative_chest_xray_opens_on_the_radiograph(viewer) -> None:
    """Nothing found, so nothing outlined: the report still opens on the radiograph it is about (issue 13's
    black viewport), outlined as the image analysed, with no label and no error."""
    sc = viewer[1]["cxr_negative"]
    assert not any(f.present for f in sc.result.findings)
    browser, shot = _open(viewer, sc, str(sc.tid1500.SeriesInstanceUID), "cxr_negative-tid1500")
    browser.wait_js("document.querySelectorAll('svg polyline, svg path').length > 0", 90, "the outline")
    img = _finish(browser, shot)
    vp = _viewport(browser, img)
    assert vp.std() > 10 and (vp > 60).mean() > 0.05, f"viewport looks blank: {shot}"


@pytest.mark.parametrize("name,phrase", [("ct_quality", "Overall image quality verdict"),
                                         ("cxr", "UNVERIFIED MODEL"), ("echo", "connectivity check")])
def test_narrative_reads_as_text(viewer, name: str, phrase: str) -> None:
    sc = viewer[1][name]
    browser, shot = _open(viewer, sc, str(sc.narrative.SeriesInstanceUID), f"{name}-narrative")
    browser.wait_js("document.body.innerText.includes('Impressions')", 90, f"{name}: narrative text")
    _finish(browser, shot)
    body = browser.js("document.body.innerText")
    assert phrase in body
    # OHIF shows Finding TEXT in a <pre> that never wraps: ainode breaks the lines, nothing runs off the page
    wide = browser.js("Array.from(document.querySelectorAll('pre')).filter(p => p.getBoundingClientRect().right"
                      " > window.innerWidth).map(p => p.textContent.slice(0, 80))")
    assert not wide, wide
    assert body.index("Findings") < body.index("Impressions")


@pytest.mark.parametrize("name", ["ct_quality", "cxr", "echo"])
def test_summary_sc_displays(viewer, name: str) -> None:
    sc = viewer[1][name]
    first = sc.scs[0]
    browser, shot = _open(viewer, sc, str(first.SeriesInstanceUID), f"{name}-sc")
    browser.wait_js("/W:\\s*\\d/.test(document.body.innerText)", 90, f"{name}: SC in the viewport")
    img = _finish(browser, shot)
    vp = _viewport(browser, img)
    assert vp.std() > 10 and (vp > 60).mean() > 0.02, f"SC viewport looks blank: {shot}"
    png = viewer[0] / f"{name}-sc-pixels.png"
    Image.open(io.BytesIO(_png(first))).save(png)
    print(f"SC pixels: {png}")


def _png(ds) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(ds.pixel_array).save(buf, format="PNG")
    return buf.getvalue()
