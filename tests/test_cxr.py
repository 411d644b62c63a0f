"""The cxr pipeline on a real CR chest PA (pydicom-data RG1, MONOCHROME1) with a random-weight model.

The model is imported once per session from a random DenseNet-121 saved as torchxrayvision does;
its manifest says verified: false, so every test that runs it passes allow_unverified_models and
checks that the result says so loudly.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch  # noqa: F401  (a test extra: missing, the session must fail, not skip)
import yaml
from PIL import Image
from pydicom.data import get_testdata_file
from support.cxr_models import xrv_model  # noqa: E402

from node.loader import load_study  # noqa: E402
from pipelines.base import PipelineResult, Refused  # noqa: E402
from pipelines.cxr import CXRPipeline  # noqa: E402
from pipelines.cxr.preprocess import lung_contrast  # noqa: E402
from pipelines.models import UNVERIFIED_BANNER, clear_cache, sha256_file  # noqa: E402

RG1 = "RG1_UNCR.dcm"
PRESENT, POSSIBLE = "Pneumothorax", "Effusion"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The imported random model with thresholds that make the outcome deterministic.

    Pneumothorax: present at any probability (threshold 0) and critical; Effusion: possible at any
    probability below 1; everything else absent below probability 1 (the random model never saturates).
    """
    return xrv_model(tmp_path_factory.mktemp("xrv"), present=(PRESENT,), possible=(POSSIBLE,),
                     critical={PRESENT: 0.0})


def _opts(model_dir: Path, **kw) -> dict:
    return {"model": str(model_dir), "allow_unverified_models": True, **kw}


def _variant(tmp_path: Path, name: str = RG1, **changes) -> Path:
    ds = pydicom.dcmread(get_testdata_file(name))
    for k, v in changes.items():
        if v is None:
            if k in ds:
                delattr(ds, k)
        else:
            setattr(ds, k, v)
    p = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}.dcm"
    ds.save_as(p)
    return p


@pytest.fixture(scope="module")
def rg1_result(model_dir) -> PipelineResult:
    study = load_study([get_testdata_file(RG1)], options=_opts(model_dir))
    return CXRPipeline({}).run(study)


def test_real_cr_findings_marked_unverified(rg1_result):
    r = rg1_result
    assert r.status == "ok" and r.model is not None and r.model.verified is False and r.unverified
    by = {f.note.split("'")[1]: f for f in r.findings}
    assert by[PRESENT].certainty == "present" and by[PRESENT].present and by[PRESENT].critical
    assert by[PRESENT].code.value == "36118008" and by[PRESENT].code.scheme == "SCT"
    assert by[POSSIBLE].certainty == "possible" and not by[POSSIBLE].present
    assert by[POSSIBLE].code.value == "60046008"
    assert by["Consolidation"].site is not None and by["Consolidation"].site.value == "39607008"
    others = [f for k, f in by.items() if k not in (PRESENT, POSSIBLE)]
    assert others and all(f.certainty == "absent" and 0 < f.probability < 1 for f in others)
    assert r.critical
    for lang in ("en", "zh"):
        n = r.narrative[lang]
        assert n.findings.startswith(UNVERIFIED_BANNER) and n.impression.startswith(UNVERIFIED_BANNER)
    assert "pneumothorax" in r.narrative["en"].findings and "Possible pleural effusion" in r.narrative["en"].findings
    assert "气胸" in r.narrative["zh"].findings and "可疑胸腔积液" in r.narrative["zh"].findings
    assert any("not verified" in w for w in r.warnings)
    assert r.details["consistency"] == "ok"  # the template says what the classifier found


def test_heatmaps_and_regions_inside_the_image(rg1_result):
    r = rg1_result
    heat = [o for o in r.overlays if o.kind == "heatmap"]
    assert {o.name for o in heat} == {"cam-pneumothorax", "cam-effusion"}
    rows, cols = 1955, 1841
    for o in heat:
        assert o.source is not None and o.source.sop_instance_uid == r.key_images[0].sop_instance_uid
        assert o.array.ndim == 2 and 0.0 <= o.array.min() and o.array.max() <= 1.0 and o.array.max() > 0.5
        assert abs(o.array.shape[0] / o.array.shape[1] - rows / cols) < 0.01
    positives = [f for f in r.findings if f.certainty != "absent"]
    assert len(positives) == 2
    for f in positives:
        assert len(f.regions) == 1
        reg = f.regions[0]
        assert reg.graphic_type == "POLYLINE" and reg.points[0] == reg.points[-1] and len(reg.points) >= 4
        xs, ys = np.array(reg.points).T
        assert xs.min() >= 0 and xs.max() <= cols - 1 and ys.min() >= 0 and ys.max() <= rows - 1
        # the region sits where the model looked: in the central square crop (the model never saw outside)
        assert ys.min() >= (rows - cols) // 2 - 1 and ys.max() <= (rows - cols) // 2 + cols
    assert all(not f.regions for f in r.findings if f.certainty == "absent")


def test_result_round_trips_through_save_and_load(rg1_result, tmp_path):
    rg1_result.save(tmp_path)
    back = PipelineResult.load(tmp_path)
    assert back.model.verified is False and len(back.findings) == len(rg1_result.findings)
    assert back.findings[3].regions == rg1_result.findings[3].regions
    json.loads((tmp_path / "result.json").read_text())


def test_model_input_polarity_lungs_dark(model_dir):
    """MONOCHROME1 is inverted: on the model input the lung fields are darker than the mediastinum."""
    study = load_study([get_testdata_file(RG1)], options=_opts(model_dir))
    pipe = CXRPipeline({})
    images, refused = pipe.prepare_images(study, pipe.model(study).manifest.input)
    assert not refused and len(images) == 1
    t = images[0].prepared.tensor
    assert t.shape == (1, 224, 224) and -1024 <= t.min() and t.max() <= 1024
    unit = (t[0] + 1024) / 2048
    n = 224
    lungs = np.r_[unit[int(.3 * n):int(.6 * n), int(.15 * n):int(.38 * n)].ravel(),
                  unit[int(.3 * n):int(.6 * n), int(.62 * n):int(.85 * n)].ravel()].mean()
    mediastinum = unit[int(.3 * n):int(.6 * n), int(.45 * n):int(.55 * n)].mean()
    assert lungs < mediastinum - 0.05
    assert lung_contrast(unit) > 0.05
    assert "MONOCHROME1 inverted" in images[0].prepared.notes
    # the check has teeth: the same pixels read as MONOCHROME2 put the lungs bright
    study.series[0].photometric = "MONOCHROME2"
    study.series[0].headers[0].BodyPartExamined = ""
    images, refused = pipe.prepare_images(study, pipe.model(study).manifest.input)
    assert not images and "does not look like a frontal chest radiograph" in refused[0]


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG1_J2KI.dcm"])
def test_jpeg2000_variants_agree_with_uncompressed(model_dir, rg1_result, name):
    r = CXRPipeline({}).run(load_study([get_testdata_file(name)], options=_opts(model_dir)))
    assert r.status == "ok" and r.model.verified is False
    a = {f.label: f.probability for f in rg1_result.findings}
    b = {f.label: f.probability for f in r.findings}
    tol = 1e-5 if name == "RG1_J2KR.dcm" else 0.05  # lossless must match; lossy only roughly
    assert max(abs(a[k] - b[k]) for k in a) <= tol
    assert [f.certainty for f in r.findings] == [f.certainty for f in rg1_result.findings]


def test_lateral_view_refused(model_dir, tmp_path):
    p = _variant(tmp_path, ViewPosition="LL")
    with pytest.raises(Refused, match=r"lateral view \(ViewPosition\)"):
        CXRPipeline({}).run(load_study([p], options=_opts(model_dir)))


def test_view_from_image_when_tag_missing(model_dir, tmp_path):
    p = _variant(tmp_path, ViewPosition=None, BodyPartExamined=None)
    r = CXRPipeline({}).run(load_study([p], options=_opts(model_dir)))
    assert r.status == "ok"
    notes = r.details["images"][0]["preprocessing"]
    assert any(n.startswith("view FRONTAL from image heuristic (layout ") for n in notes)
    assert any(n.startswith("chest from image heuristic (layout ") for n in notes)
    # half a chest (a tall narrow strip) is not a frontal view
    ds = pydicom.dcmread(get_testdata_file(RG1))
    half = np.ascontiguousarray(ds.pixel_array[:, : ds.Columns // 2])
    ds.PixelData, ds.Columns = half.tobytes(), half.shape[1]
    del ds.ViewPosition
    q = tmp_path / "half.dcm"
    ds.save_as(q)
    with pytest.raises(Refused, match=r"not a frontal chest view: image heuristic \(aspect 2\.12"):
        CXRPipeline({}).run(load_study([q], options=_opts(model_dir)))


def test_non_chest_refused_by_tag_and_by_image(model_dir, tmp_path):
    with pytest.raises(Refused, match="BodyPartExamined is 'HAND'"):
        CXRPipeline({}).run(load_study([_variant(tmp_path, BodyPartExamined="HAND")], options=_opts(model_dir)))
    # a head CT slice relabelled as DX with no body part: the image itself is not a chest
    p = _variant(tmp_path, name="693_UNCR.dcm", Modality="DX", ViewPosition="PA", BodyPartExamined=None)
    with pytest.raises(Refused, match="does not look like a frontal chest"):
        CXRPipeline({}).run(load_study([p], options=_opts(model_dir)))


def test_wrong_modality_and_tiny_image_refused(model_dir, tmp_path):
    with pytest.raises(Refused, match="accepts modality"):
        CXRPipeline({}).run(load_study([get_testdata_file("693_UNCR.dcm")], options=_opts(model_dir)))
    ds = pydicom.dcmread(get_testdata_file(RG1))
    small = np.ascontiguousarray(ds.pixel_array[::10, ::10])
    ds.PixelData, ds.Rows, ds.Columns = small.tobytes(), small.shape[0], small.shape[1]
    p = tmp_path / "small.dcm"
    ds.save_as(p)
    with pytest.raises(Refused, match="at least 256"):
        CXRPipeline({}).run(load_study([p], options=_opts(model_dir)))


def test_missing_model_is_unavailable(tmp_path):
    r = CXRPipeline({}).run(load_study([get_testdata_file(RG1)], options={"model": "absent-model",
                                                                            "weights_dir": str(tmp_path)}))
    assert r.status == "model_unavailable" and "no manifest" in r.reason and not r.findings and not r.narrative


def test_shipped_template_without_weights_is_unavailable():
    r = CXRPipeline({"allow_unverified_models": True}).run(load_study([get_testdata_file(RG1)]))
    assert r.status == "model_unavailable" and not r.findings


def test_hash_mismatch_refused(model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    m = yaml.safe_load((d / "manifest.yaml").read_text())
    m["sha256"] = "f" * 64
    (d / "manifest.yaml").write_text(yaml.safe_dump(m))
    r = CXRPipeline({}).run(load_study([get_testdata_file(RG1)], options=_opts(d)))
    assert r.status == "model_unavailable" and "SHA-256" in r.reason and not r.findings
    assert m["sha256"] != sha256_file(d / "model.onnx")


def test_unverified_without_permission_unavailable(model_dir):
    clear_cache()
    for opts in ({"model": str(model_dir)}, {"model": str(model_dir), "allow_unverified_models": False}):
        r = CXRPipeline({}).run(load_study([get_testdata_file(RG1)], options=opts))
        assert r.status == "model_unavailable" and "not verified" in r.reason and not r.findings
    # permission can come from the constructor's options too (node-level setting)
    r = CXRPipeline({"allow_unverified_models": True, "model": str(model_dir)}).run(
        load_study([get_testdata_file(RG1)]))
    assert r.status == "ok" and r.model.verified is False


# --------------------------------------------------------------------------- openai backend
class _ChatServer:
    """A chat-completions endpoint on 127.0.0.1 that records requests; mode: ok | 500 | slow | garbage."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                if outer.mode == "500":
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"internal error")
                    return
                if outer.mode == "slow":
                    time.sleep(1.5)
                content = ("Findings: Right apical pneumothorax is seen. Possible small pleural effusion.\n"
                           "Impression: Pneumothorax. Possible pleural effusion.")
                if outer.mode == "garbage":
                    content = "I cannot help with that."
                if outer.mode == "omits":
                    content = "Findings: The lungs are clear. No pneumothorax.\nImpression: Normal chest."
                data = json.dumps({"model": "janus-pro-test", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_server():
    s = _ChatServer()
    yield s
    s.close()


def _llm_opts(model_dir, server, **kw):
    return _opts(model_dir, report_backend="openai",
                 openai={"base_url": server.url, "model": "janus-pro", "api_key": "k", "retries": 1,
                         "backoff_s": 0.0, "timeout_s": 5.0, **kw})


def test_openai_backend_sends_image_and_findings(model_dir, chat_server):
    r = CXRPipeline({}).run(load_study([get_testdata_file(RG1)], options=_llm_opts(model_dir, chat_server)))
    assert r.status == "ok" and len(chat_server.requests) == 1
    req = chat_server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k" and req["body"]["model"] == "janus-pro"
    parts = req["body"]["messages"][1]["content"]
    text = next(p["text"] for p in parts if p["type"] == "text")
    assert "pneumothorax: present" in text and "pleural effusion: possible" in text and "English" in text
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    assert url.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.mode == "L" and max(img.size) == 512
    a = np.asarray(img, np.float32) / 255
    assert lung_contrast(np.asarray(Image.fromarray(a, "F").resize((img.size[1], img.size[1])))) > 0  # windowed
    en = r.narrative["en"]
    assert en.findings.startswith(UNVERIFIED_BANNER) and "Right apical pneumothorax is seen." in en.findings
    assert en.impression.endswith("Pneumothorax. Possible pleural effusion.")
    assert r.details["report"]["backend"] == "openai" and r.details["report"]["model"] == "janus-pro-test"
    assert r.details["consistency"] == "ok"
    assert r.narrative["zh"].findings.startswith(UNVERIFIED_BANNER)  # the other language from the template


@pytest.mark.parametrize("mode,expect", [("500", "HTTP 500"), ("slow", "timed out"), ("garbage", "headings")])
def test_openai_failures_fall_back_to_template(model_dir, chat_server, mode, expect):
    chat_server.mode = mode
    opts = _llm_opts(model_dir, chat_server, timeout_s=0.5 if mode == "slow" else 5.0)
    r = CXRPipeline({}).run(load_study([get_testdata_file(RG1)], options=opts))
    assert r.status == "ok" and len(chat_server.requests) == 2  # one retry
    assert r.details["report"]["fallback"] is True and expect in r.details["report"]["error"]
    assert any("template report used instead" in w and expect in w for w in r.warnings)
    assert "There is a pneumothorax" in r.narrative["en"].findings  # the template text


def test_llm_text_that_omits_a_finding_is_flagged(model_dir, chat_server):
    chat_server.mode = "omits"
    r = CXRPipeline({}).run(load_study([get_testdata_file(RG1)], options=_llm_opts(model_dir, chat_server)))
    msgs = r.details["consistency"]
    assert any("Pneumothorax present but the report text negates it" in m for m in msgs)
    assert any("Pleural Effusion possible but the report text omits it" in m for m in msgs)
    assert any("report/classifier mismatch" in w for w in r.warnings)
    assert "Automated consistency check" in r.narrative["en"].findings
    assert "自动一致性核查" in r.narrative["zh"].findings


def test_pa_and_lateral_study_reads_the_pa_and_says_so(model_dir, tmp_path, rg1_result):
    from pydicom.uid import generate_uid

    lat = _variant(tmp_path, ViewPosition="LL", SeriesInstanceUID=generate_uid(), SOPInstanceUID=generate_uid(),
                   SeriesNumber=2)
    r = CXRPipeline({}).run(load_study([get_testdata_file(RG1), lat], options=_opts(model_dir)))
    assert r.status == "ok" and len(r.key_images) == 1
    assert r.key_images[0].sop_instance_uid == rg1_result.key_images[0].sop_instance_uid
    assert any("images not analysed" in w and "lateral view" in w for w in r.warnings)


def test_windowing_voi_lut_window_and_percentiles():
    from pydicom.dataset import Dataset

    from pipelines.cxr.preprocess import window

    px = np.linspace(0, 4095, 64 * 64, dtype=np.float32).reshape(64, 64)
    ds = Dataset()
    out, how = window(px, ds, None)
    assert how.startswith("percentile") and out.min() == 0 and out.max() == 1
    ds.WindowCenter, ds.WindowWidth = 2048, 2048
    out, how = window(px, ds, None)
    assert how == "window C2048/W2048" and out[0, 0] == 0 and out[-1, -1] == 1 and 0.45 < out[32, 0] < 0.55
    # a window that misses the data is a bad header, not a choice: fall back to percentiles
    ds.WindowCenter, ds.WindowWidth = 90000, 10
    assert window(px, ds, None)[1].startswith("percentile")
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.LUTData = list((np.sqrt(np.arange(4096) / 4095) * 65535).astype(int))
    ds.VOILUTSequence = [lut]
    out, how = window(px.astype(np.uint16), ds, None)
    assert how == "VOI LUT" and out[32, 0] > 0.6  # the square-root LUT brightens the mid-tones
    assert out[0, 0] == 0 and out[-1, -1] == pytest.approx(1.0, abs=1e-4)
    # values past the LUT's input range clamp to its ends (they must not wrap round to dark)
    lut.LUTDescriptor = [2048, 1024, 16]
    lut.LUTData = list((np.arange(2048) * 32).astype(int))
    out, _ = window(px, ds, None)
    assert out[0, 0] == 0 and out[-1, -1] == pytest.approx(2047 * 32 / 65535)
    assert np.all(np.diff(out.ravel()) >= 0)


def test_api_key_from_environment(model_dir, chat_server, monkeypatch):
    monkeypatch.setenv("AINODE_TEST_LLM_KEY", "from-env")
    opts = _llm_opts(model_dir, chat_server, api_key="", api_key_env="AINODE_TEST_LLM_KEY")
    CXRPipeline({}).run(load_study([get_testdata_file(RG1)], options=opts))
    assert chat_server.requests[0]["auth"] == "Bearer from-env"


def test_hot_polygon_is_the_hull_of_every_pixel_of_the_hot_area():
    """Built from each row's end pixels; must be the convex hull of all the area's pixel corners."""
    from scipy import ndimage
    from scipy.spatial import ConvexHull

    from pipelines.cxr.cam import hot_polygon, upsample
    from pipelines.cxr.preprocess import Geometry

    geom = Geometry(rows=224, cols=224, x0=0, y0=0, side=224, size=224)  # identity: model pixels = source pixels
    rng = np.random.default_rng(7)
    for _ in range(30):
        cam = upsample(rng.normal(size=(7, 7)).astype(np.float32), 224)
        lab, n = ndimage.label(cam >= 0.5)
        sizes = ndimage.sum(cam >= 0.5, lab, index=range(1, n + 1))
        ys, xs = np.nonzero(lab == int(np.argmax(sizes)) + 1)
        corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (-0.5, 0.5) for dy in (-0.5, 0.5)])
        expected = {tuple(np.clip(p, 0, 223)) for p in corners[ConvexHull(corners).vertices]}
        poly = hot_polygon(cam, geom)
        assert poly[0] == poly[-1] and set(poly[:-1]) == expected
    single = np.zeros((224, 224), np.float32)
    single[100, 50] = 1.0  # one hot pixel: still an area
    assert len(hot_polygon(single, geom)) == 5
