"""The manifest-driven classifier on a synthetic head CT written as real DICOM, with a tiny ONNX model.

The model is built with ``onnx.helper`` (conv -> ReLU -> global average pool -> linear -> sigmoid): random
weights, except that the first label reads only the brain-window channel with positive weights, so a
hyperdense "bleed" makes its slice the top-scoring one. Expected values come from independent numpy
windowing and a separate ONNX Runtime session, never from the pipeline's own helpers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pydicom
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.loader import load_study
from node.notify import events_from_result
from pipelines import models
from pipelines.base import PipelineResult, Refused
from pipelines.classifier import ClassifierPipeline, ClassifierSpec, preprocess, split_manifest
from pipelines.classifier.preprocess import stack_context, windowed_planes
from pipelines.models import InputSpec, Normalisation

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
WINDOWS = [(40.0, 80.0), (80.0, 200.0), (600.0, 2800.0)]
N_SLICES, SIZE, BLEED_SLICE = 8, 128, 5
CT = "1.2.840.10008.5.1.4.1.1.2"


# --------------------------------------------------------------------------- synthetic data
def head_slice(rows: int, bleed: bool, rng: np.random.Generator) -> np.ndarray:
    """HU: air, a 7 mm skull ring at ~1000 HU, brain at 35 HU, optionally a 75 HU haematoma."""
    y, x = np.mgrid[:rows, :rows].astype(np.float32)
    c = (rows - 1) / 2
    r = np.hypot((x - c) / (0.42 * rows), (y - c) / (0.47 * rows))
    hu = np.full((rows, rows), -1000.0, np.float32)
    hu[r < 1.0] = 1000.0
    hu[r < 0.9] = 35.0
    if bleed:
        hu[np.hypot(x - 0.62 * rows, y - 0.45 * rows) < 0.09 * rows] = 75.0
    return hu + rng.normal(0, 2.0, hu.shape).astype(np.float32) * (r < 0.9)


def write_head_ct(directory: Path, n: int = N_SLICES, rows: int = 256, bleed_slice: int | None = BLEED_SLICE,
                  modality: str = "CT") -> tuple[list[Path], np.ndarray]:
    """Files written in shuffled order with InstanceNumber = position index + 1; returns paths and HU truth."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    truth = np.stack([head_slice(rows, i == bleed_slice, rng) for i in range(n)])
    paths = []
    for i in rng.permutation(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CT
        ds.SOPClassUID = CT
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.BodyPartExamined, ds.SeriesNumber, ds.InstanceNumber = modality, "HEAD", 2, int(i) + 1
        ds.PatientID, ds.PatientName, ds.AccessionNumber = "P1", "Test^Head", "ACC-ICH-1"
        ds.StudyDate, ds.StudyTime = "20261123", "101500"
        ds.ImagePositionPatient = [-125.0, -125.0, 5.0 * float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [250 / rows, 250 / rows], 5.0
        ds.Rows = ds.Columns = rows
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 80
        ds.PixelData = np.clip(np.round(truth[i] + 1024), 0, 65535).astype(np.uint16).tobytes()
        p = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths, np.round(truth + 1024).clip(0, 65535) - 1024


def build_model(path: Path, n_labels: int = len(LABELS), channels: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    feats = 8
    conv_w = rng.normal(0, 0.5, (feats, channels, 3, 3)).astype(np.float32)
    conv_w[0] = 0.0
    conv_w[0, 0] = np.abs(rng.normal(0, 0.5, (3, 3)))  # feature 0 sees only the brain window, positively
    lin_w = rng.normal(0, 0.5, (n_labels, feats)).astype(np.float32)
    lin_w[0] = 0.0
    lin_w[0, 0] = 12.0  # label "any" = feature 0
    lin_b = np.zeros(n_labels, np.float32)
    lin_b[0] = -12.0 * float(np.abs(conv_w[0, 0]).sum()) * 0.3
    nodes = [
        helper.make_node("Conv", ["image", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "lin_w", "lin_b"], ["logits"], transB=1),
        helper.make_node("Sigmoid", ["logits"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes, "ich-test",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_labels])],
        [numpy_helper.from_array(conv_w, "conv_w"), numpy_helper.from_array(lin_w, "lin_w"),
         numpy_helper.from_array(lin_b, "lin_b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def write_manifest(weights: Path, name: str = "ich-test", *, size: int = SIZE, critical: float | None = 0.5,
                   present: float = 0.5, verified: bool = False, sha256: str | None = None,
                   classifier: dict | None = None, with_model: bool = True) -> Path:
    d = weights / name
    onnx_path = d / "model.onnx"
    if with_model and not onnx_path.exists():
        build_model(onnx_path)
    data = {
        "name": name, "version": "0.1-test", "task": "classification", "labels": LABELS,
        "input": {"name": "image", "size": size, "channels": 3, "normalisation": {"kind": "unit"}, "crop": "none"},
        "output": {"probabilities": "probabilities", "cam": None},
        "thresholds": {"any": {"possible": min(present, 0.3), "present": present}},
        "critical": {"any": critical} if critical is not None else {},
        "sha256": sha256 if sha256 is not None else (models.sha256_file(onnx_path) if onnx_path.exists() else ""),
        "verified": verified, "evaluation": "test fixture" if verified else "", "licence": "test",
        "evaluation_record": {"sha256": "ab" * 32, "date": "2026-01-05", "images": 50, "aucs": {"any": 0.9}}
        if verified else None,
        "classifier": classifier or {
            "mode": "slices", "modalities": ["CT"],
            "windows": [{"name": n, "center": c, "width": w} for n, (c, w) in zip(["brain", "subdural", "bone"],
                                                                                   WINDOWS)],
            "context": [0], "aggregation": {"method": "max"}, "key_images": 3, "primary_label": "any",
            "labels": {"any": {"code": {"value": "1386000", "scheme": "SCT", "meaning": "Intracranial hemorrhage"},
                               "en": "Intracranial haemorrhage", "zh": "颅内出血"}},
        },
    }
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.yaml").write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return d / "manifest.yaml"


def independent_hu(paths: list[Path]) -> np.ndarray:
    """HU slices sorted by z, read with plain pydicom (not node.loader)."""
    dss = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack([d.pixel_array.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept)
                     for d in dss])


def expected_windows(hu: np.ndarray) -> np.ndarray:
    """(slices, 3, H, W): each window mapped to [0, 1] by its lower and upper bound."""
    out = [np.clip((hu - (c - w / 2)) / w, 0.0, 1.0) for c, w in WINDOWS]
    return np.stack(out, axis=1).astype(np.float32)


@pytest.fixture(autouse=True)
def _fresh_model_cache():
    models.clear_cache()
    yield
    models.clear_cache()


@pytest.fixture
def series_dir(tmp_path) -> tuple[list[Path], np.ndarray]:
    return write_head_ct(tmp_path / "study")


def _study(paths: list[Path], weights: Path, **options: object):
    opts = {"model": "ich-test", "weights_dir": str(weights), "allow_unverified_models": True, **options}
    return load_study(paths, options=opts)


def _direct_probs(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], {"image": x})[0]


# --------------------------------------------------------------------------- preprocessing
def test_tensors_have_manifest_hu_windows(series_dir, tmp_path) -> None:
    paths, _ = series_dir
    weights = tmp_path / "weights"
    write_manifest(weights, size=256)  # native size: no resize, so values must match exactly
    study = _study(paths, weights)
    runner, spec = ClassifierPipeline().load(study)
    x = preprocess(study.series[0], spec, runner.manifest.input)
    expected = expected_windows(independent_hu(paths))
    assert x.shape == (N_SLICES, 3, 256, 256) and x.dtype == np.float32
    np.testing.assert_allclose(x, expected, atol=1e-6)
    brain = expected[0, 0, 128, 100]  # a brain pixel at ~35 HU: (35 - 0) / 80 in the brain window
    assert 0.38 < brain < 0.5 and x[0, 2, 5, 5] == 0.0  # air is black in the bone window
    assert x[BLEED_SLICE, 0].mean() > x[0, 0].mean()  # the bleed brightens the brain window


def test_resize_to_manifest_size(series_dir, tmp_path) -> None:
    paths, _ = series_dir
    weights = tmp_path / "weights"
    write_manifest(weights, size=64)
    study = _study(paths, weights)
    runner, spec = ClassifierPipeline().load(study)
    x = preprocess(study.series[0], spec, runner.manifest.input)
    assert x.shape == (N_SLICES, 3, 64, 64)
    full = expected_windows(independent_hu(paths))
    block = full.reshape(N_SLICES, 3, 64, 4, 64, 4).mean(axis=(3, 5))  # area average as reference
    assert np.abs(x - block).mean() < 0.02


def test_context_slices_and_channel_order(series_dir) -> None:
    paths, _ = series_dir
    series = load_study(paths).series[0]
    hu = independent_hu(paths)
    inp = InputSpec(name="image", size=256, channels=3, normalisation=Normalisation(kind="unit"), crop="none")
    brain = np.clip((hu - 0) / 80, 0, 1).astype(np.float32)
    spec = ClassifierSpec(windows=[{"center": 40, "width": 80}], context=[-1, 0, 1])
    x = preprocess(series, spec, inp)
    for i in range(N_SLICES):
        for k, off in enumerate((-1, 0, 1)):
            np.testing.assert_allclose(x[i, k], brain[min(max(i + off, 0), N_SLICES - 1)], atol=1e-6)
    # two windows x three slices: window-major groups a window's slices together, slice-major the reverse
    two = [{"center": 40, "width": 80}, {"center": 600, "width": 2800}]
    planes = windowed_planes(series, ClassifierSpec(windows=two, context=[-1, 0, 1]), inp)
    wm = stack_context(planes, ClassifierSpec(windows=two, context=[-1, 0, 1]))
    sm = stack_context(planes, ClassifierSpec(windows=two, context=[-1, 0, 1], channel_order="slice_major"))
    bone = np.clip((hu - (600 - 1400)) / 2800, 0, 1).astype(np.float32)
    i = 3
    np.testing.assert_allclose(wm[i, 1], brain[i], atol=1e-6)
    np.testing.assert_allclose(wm[i, 3], bone[i - 1], atol=1e-6)
    np.testing.assert_allclose(sm[i, 1], bone[i - 1], atol=1e-6)
    np.testing.assert_allclose(sm[i, 2], brain[i], atol=1e-6)
    # batching (the path run() takes) gives the same tensors as one pass
    spec_b = ClassifierSpec(windows=two[:1], context=[-1, 0, 1], batch_size=3)
    np.testing.assert_array_equal(preprocess(series, spec_b, inp), x)


# --------------------------------------------------------------------------- inference and result
def test_scores_key_slices_and_measurements_match_direct_inference(series_dir, tmp_path) -> None:
    paths, _ = series_dir
    weights = tmp_path / "weights"
    manifest = write_manifest(weights)
    study = _study(paths, weights)
    pipe = ClassifierPipeline()
    pipe.check(study)
    result = pipe.run(study)
    assert result.status == "ok", result.reason
    runner, spec = pipe.load(study)
    direct = _direct_probs(manifest.parent / "model.onnx", preprocess(study.series[0], spec, runner.manifest.input))
    [series_details] = result.details["series"]
    for j, label in enumerate(LABELS):
        np.testing.assert_allclose(series_details["probabilities"][label], direct[:, j], atol=1e-4)
    frames = study.series[0].frames
    assert int(np.argmax(direct[:, 0])) == BLEED_SLICE  # the bleed drives the "any" score
    top3 = [frames[i] for i in np.argsort(-direct[:, 0])[:3]]
    any_f = result.findings[0]
    assert any_f.code.value == "1386000" and any_f.label == "Intracranial haemorrhage"
    assert any_f.probability == pytest.approx(float(direct[:, 0].max()), abs=1e-5)
    assert any_f.key_images == top3 and result.key_images == top3
    probs = {(m.region.image.sop_instance_uid): m.value for m in result.measurements
             if m.group.startswith("Intracranial haemorrhage")}
    assert len(probs) == 3
    for ref in top3:
        i = frames.index(ref)
        assert probs[ref.sop_instance_uid] == pytest.approx(float(direct[i, 0]), abs=1e-5)
    m0 = next(m for m in result.measurements if m.region.image == top3[0])
    assert m0.code.value == "122157" and m0.unit.value == "1" and m0.series_uid == frames[0].series_uid
    assert m0.region.graphic_type == "POLYLINE" and m0.region.points[2] == (255.0, 255.0)
    [ov] = result.overlays
    assert ov.kind == "image" and ov.array.dtype == np.uint8 and ov.array.ndim == 3 and ov.array.shape[2] == 3
    assert len({m.group for m in result.measurements}) == len(result.measurements)  # one NUM per group
    assert "Intracranial haemorrhage" in result.narrative["en"].findings
    assert "颅内出血" in result.narrative["zh"].findings
    loaded = PipelineResult.load(result.save(tmp_path / "out").parent)  # crosses the worker boundary intact
    assert loaded.findings[0].key_images == top3 and loaded.measurements[0].region.graphic_type == "POLYLINE"


def test_critical_above_threshold_only(series_dir, tmp_path) -> None:
    paths, _ = series_dir
    weights = tmp_path / "weights"
    manifest = write_manifest(weights, name="probe")
    study = _study(paths, weights, model="probe")
    runner, spec = ClassifierPipeline().load(study)
    direct = _direct_probs(manifest.parent / "model.onnx", preprocess(study.series[0], spec, runner.manifest.input))
    top, second = np.sort(direct[:, 0])[::-1][:2]
    assert top - second > 0.01
    between = float((top + second) / 2)

    def run(name: str, present: float, critical: float | None) -> PipelineResult:
        write_manifest(weights, name=name, present=present, critical=critical)
        return ClassifierPipeline().run(_study(paths, weights, model=name))

    hit = run("crit-hit", present=between, critical=between)
    assert hit.critical and hit.findings[0].present and hit.findings[0].critical
    assert hit.findings[0].key_images[0] == study.series[0].frames[BLEED_SLICE]
    assert "Critical finding suggested by AI" in hit.narrative["en"].critical
    [event] = events_from_result(hit, {"StudyInstanceUID": study.study_uid}, {"completed": 1.0})
    assert event.code.value == "1386000" and event.unverified
    present_only = run("crit-miss", present=between, critical=float(min(1.0, top + 0.001)))
    assert present_only.findings[0].present and not present_only.critical
    below = run("below", present=float(min(1.0, top + 0.001)), critical=float(min(1.0, top + 0.001)))
    assert not below.findings[0].present and not below.critical and below.narrative["en"].critical == ""
    assert events_from_result(below, {"StudyInstanceUID": study.study_uid}, {}) == []


def test_topk_mean_aggregation(series_dir, tmp_path) -> None:
    paths, _ = series_dir
    weights = tmp_path / "weights"
    write_manifest(weights)
    cls = yaml.safe_load((weights / "ich-test" / "manifest.yaml").read_text())["classifier"]
    cls["aggregation"] = {"method": "topk_mean", "k": 3}
    write_manifest(weights, name="topk", classifier=cls)
    r = ClassifierPipeline().run(_study(paths, weights, model="topk"))
    p = np.asarray(r.details["series"][0]["probabilities"]["any"])
    assert r.findings[0].probability == pytest.approx(float(np.sort(p)[-3:].mean()), abs=1e-5)


# --------------------------------------------------------------------------- unavailable, unverified, refused
def test_missing_model_is_unavailable(series_dir, tmp_path) -> None:
    paths, _ = series_dir
    weights = tmp_path / "weights"
    r = ClassifierPipeline().run(_study(paths, weights, model="nothing-here"))
    assert r.status == "model_unavailable" and not r.findings and "no manifest" in r.reason
    write_manifest(weights, name="no-file", with_model=False, sha256="")
    r = ClassifierPipeline().run(_study(paths, weights, model="no-file"))
    assert r.status == "model_unavailable" and not r.findings and "missing" in r.reason
    write_manifest(weights, name="bad-hash", sha256="0" * 64)
    r = ClassifierPipeline().run(_study(paths, weights, model="bad-hash"))
    assert r.status == "model_unavailable" and "SHA-256" in r.reason
    with pytest.raises(models.ModelUnavailable):
        ClassifierPipeline().check(_study(paths, weights, model="bad-hash"))


def test_unverified_model_needs_permission_and_is_flagged(series_dir, tmp_path) -> None:
    paths, _ = series_dir
    weights = tmp_path / "weights"
    write_manifest(weights, verified=False)
    denied = ClassifierPipeline().run(_study(paths, weights, allow_unverified_models=False))
    assert denied.status == "model_unavailable" and "not verified" in denied.reason
    allowed = ClassifierPipeline().run(_study(paths, weights, allow_unverified_models=True))
    assert allowed.status == "ok" and allowed.model is not None and allowed.model.verified is False
    assert allowed.unverified and any("UNVERIFIED" in w for w in allowed.warnings)
    write_manifest(weights, name="checked", verified=True)
    ok = ClassifierPipeline().run(_study(paths, weights, model="checked", allow_unverified_models=False))
    assert ok.status == "ok" and not ok.unverified


def test_refuses_series_the_model_does_not_take(tmp_path) -> None:
    paths, _ = write_head_ct(tmp_path / "mr", n=3, rows=64, modality="MR")
    weights = tmp_path / "weights"
    write_manifest(weights)
    study = _study(paths, weights)
    with pytest.raises(Refused, match="modality MR"):
        ClassifierPipeline().check(study)
    assert ClassifierPipeline().run(study).status == "refused"


def test_shipped_head_ct_manifest() -> None:
    path = ROOT / "weights" / "head-ct-ich" / "manifest.yaml"
    manifest, spec = split_manifest(path)
    assert manifest.labels == LABELS and manifest.verified is False and manifest.sha256 == ""
    assert [(w.center, w.width) for w in spec.windows] == WINDOWS and spec.channels == manifest.input.channels == 3
    assert spec.code("any").value == "1386000" and "any" in manifest.critical
    assert all(spec.labels[label].code is not None for label in LABELS)
    study = load_study([pydicom.data.get_testdata_file("693_UNCR.dcm")], options={"allow_unverified_models": True})
    r = ClassifierPipeline().run(study)  # operator has not supplied weights: unavailable, never random
    assert r.status == "model_unavailable" and not r.findings
