"""The model runner's safety rules, on a tiny ONNX graph so they run in milliseconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipelines.base import ModelUnavailable
from pipelines.models import (
    EvaluationRecord,
    InputSpec,
    LabelThreshold,
    Manifest,
    Normalisation,
    band,
    clear_cache,
    load_manifest,
    load_model,
    load_runner,
    select_providers,
    sha256_file,
    write_manifest,
)


def _tiny_onnx(path: Path) -> None:
    """probabilities = sigmoid(mean over H, W of the image) for 2 labels; cam = the image itself twice."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 16, 16])
    probs = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 2])
    cam = helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["n", 2, 16, 16])
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("Concat", ["m", "m"], ["mm"], axis=1),
        helper.make_node("Sigmoid", ["mm"], ["probabilities"]),
        helper.make_node("Concat", ["image", "image"], ["cam"], axis=1),
    ]
    graph = helper.make_graph(nodes, "tiny", [x], [probs, cam])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _model_dir(tmp_path: Path, verified: bool = False, sha: str | None = None) -> Path:
    d = tmp_path / "tiny"
    d.mkdir(exist_ok=True)
    _tiny_onnx(d / "model.onnx")
    m = Manifest(name="tiny", version="1", labels=["A", "B"],
                 input=InputSpec(size=16, channels=1, normalisation=Normalisation(kind="unit")),
                 thresholds={"A": LabelThreshold(possible=0.3, present=0.6)},
                 sha256=sha if sha is not None else sha256_file(d / "model.onnx"), verified=verified,
                 evaluation="local study 2026-01" if verified else "",
                 evaluation_record=EvaluationRecord(sha256="ab" * 32, date="2026-01-05", images=120,
                                                    aucs={"A": 0.81}) if verified else None)
    write_manifest(m, d / "manifest.yaml")
    return d


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def test_runs_and_batches(tmp_path):
    runner = load_model(_model_dir(tmp_path, verified=True))
    x = np.stack([np.zeros((1, 16, 16)), np.ones((1, 16, 16))]).astype(np.float32)
    out = runner.run(x)
    assert out["probabilities"].shape == (2, 2) and out["cam"].shape == (2, 2, 16, 16)
    assert np.allclose(out["probabilities"][:, 0], [0.5, 1 / (1 + np.exp(-1))], atol=1e-6)
    assert runner.identity.verified and runner.identity.sha256 == runner.sha256
    with pytest.raises(ValueError, match=r"wants \(N, 1, 16, 16\)"):
        runner.run(np.zeros((1, 3, 16, 16), np.float32))


def test_session_is_cached_per_path_and_hash(tmp_path):
    d = _model_dir(tmp_path, verified=True)
    a, b = load_model(d), load_model(d)
    assert a.session is b.session


def test_load_runner_from_parsed_manifest(tmp_path):
    d = _model_dir(tmp_path, verified=False)
    m = load_manifest(d / "manifest.yaml")
    assert load_runner(m, d, allow_unverified=True).manifest.name == "tiny"
    with pytest.raises(ModelUnavailable, match="not verified"):
        load_runner(m, d)


def test_model_name_resolves_under_weights_dir(tmp_path):
    _model_dir(tmp_path, verified=True)
    assert load_model("tiny", weights_dir=tmp_path).manifest.name == "tiny"


def test_hash_mismatch_is_refused(tmp_path):
    d = _model_dir(tmp_path, verified=True, sha="0" * 64)
    with pytest.raises(ModelUnavailable, match="SHA-256"):
        load_model(d)


def test_replaced_file_is_refused(tmp_path):
    d = _model_dir(tmp_path, verified=True)
    load_model(d)
    with open(d / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelUnavailable, match="changed or replaced"):
        load_model(d)


def test_missing_file_and_manifest(tmp_path):
    d = _model_dir(tmp_path, verified=True)
    (d / "model.onnx").unlink()
    with pytest.raises(ModelUnavailable, match="missing"):
        load_model(d)
    with pytest.raises(ModelUnavailable, match="no manifest"):
        load_model("nothing-here", weights_dir=tmp_path)


def test_empty_sha_is_refused(tmp_path):
    with pytest.raises(ModelUnavailable, match="no sha256"):
        load_model(_model_dir(tmp_path, sha=""), allow_unverified=True)


def test_unverified_needs_permission(tmp_path):
    d = _model_dir(tmp_path, verified=False)
    with pytest.raises(ModelUnavailable, match="not verified"):
        load_model(d)
    runner = load_model(d, allow_unverified=True)
    assert runner.identity.verified is False


def test_manifest_validation(tmp_path):
    p = tmp_path / "manifest.yaml"
    p.write_text("name: x\nversion: '1'\nlabels: [A]\ninput: {normalisation: {kind: unit}}\n"
                 "thresholds: {Z: {possible: 0.1, present: 0.2}}\n")
    with pytest.raises(ModelUnavailable, match="labels the model does not have"):
        load_manifest(p)
    p.write_text("name: x\nversion: '1'\nlabels: [A]\ninput: {normalisation: {kind: unit}}\nverified: true\n")
    with pytest.raises(ModelUnavailable, match="evaluation_record.*ainode weights verify"):
        load_manifest(p)
    # a free-text evaluation note is not evidence: verified still needs the record `weights verify` writes
    p.write_text("name: x\nversion: '1'\nlabels: [A]\ninput: {normalisation: {kind: unit}}\nverified: true\n"
                 "evaluation: 'trust me'\n")
    with pytest.raises(ModelUnavailable, match="evaluation_record"):
        load_manifest(p)
    p.write_text("name: x\nversion: '1'\nlabels: [A]\ninput: {normalisation: {kind: unit}}\n"
                 "thresholds: {A: {possible: 0.9, present: 0.2}}\n")
    with pytest.raises(ModelUnavailable, match="above present"):
        load_manifest(p)


def test_bands(tmp_path):
    m = load_manifest(_model_dir(tmp_path) / "manifest.yaml")
    assert [band(p, m, "A") for p in (0.1, 0.3, 0.59, 0.6, 0.99)] == \
        ["absent", "possible", "possible", "present", "present"]
    assert band(0.49, m, "B") == "absent" and band(0.5, m, "B") == "present"  # neutral default


def test_providers_filtered_and_cpu_last():
    chosen = select_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert chosen[-1] == "CPUExecutionProvider"
    import onnxruntime as ort

    assert set(chosen) <= set(ort.get_available_providers())
    assert select_providers(["NoSuchProvider"]) == ["CPUExecutionProvider"]


def test_shipped_manifest_templates_are_valid_and_unrunnable():
    root = Path(__file__).resolve().parent.parent / "weights"
    names = {"xrv-densenet121-res224-all", "chexnet-densenet121"}  # other pipelines' manifests have own tests
    for name in names:
        m = load_manifest(root / name / "manifest.yaml")
        assert m.verified is False and m.sha256 == ""
        with pytest.raises(ModelUnavailable):
            load_model(name, weights_dir=root, allow_unverified=True)
    xrv = load_manifest(root / "xrv-densenet121-res224-all" / "manifest.yaml")
    assert len(xrv.labels) == 18 and xrv.input.channels == 1 and xrv.input.normalisation.kind == "xrv"
    assert "Pneumothorax" in xrv.critical
    chex = load_manifest(root / "chexnet-densenet121" / "manifest.yaml")
    assert len(chex.labels) == 14 and chex.input.channels == 3 and chex.input.normalisation.kind == "imagenet"
