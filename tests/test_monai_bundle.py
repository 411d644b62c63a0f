"""MONAI bundles -> ONNX + manifest through MONAI's own bundle API, and the node running what was imported."""

from __future__ import annotations

import csv

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from pydicom.data import get_testdata_file

from node import weights as W
from node.loader import load_study
from pipelines import models
from pipelines.classifier import ClassifierPipeline
from pipelines.cxr import CXRPipeline
from tests.support.monai_bundles import CXR_LABELS, ICH_LABELS, cxr_bundle, head_ct_bundle
from tests.test_classifier import write_head_ct


@pytest.fixture(autouse=True)
def _fresh_cache():
    models.clear_cache()
    yield
    models.clear_cache()


def _monai_net(bundle):
    """The bundle's network exactly as MONAI builds it, with its saved weights."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.read_config(str(bundle / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    return net.eval()


def test_cxr_bundle_imports_with_parity_and_runs_in_the_cxr_pipeline(tmp_path, capsys):
    import torch

    bundle = cxr_bundle(tmp_path / "bundles")
    out = tmp_path / "model"
    rc = W.main(["import", "--format", "monai-bundle", "--bundle", str(bundle), "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "parity max |diff|" in printed.out and "verified false" in printed.out
    m = models.load_manifest(out / "manifest.yaml")
    assert m.labels == CXR_LABELS and m.verified is False and m.evaluation_record is None
    assert (m.input.size, m.input.channels, m.input.normalisation.kind) == (64, 1, "unit")
    assert m.output.cam is None and m.sha256 == models.sha256_file(out / "model.onnx")
    assert "MONAI bundle cxr_densenet_test" in m.source_url and "ScaleIntensity" in m.notes

    # independent parity: MONAI's network + the bundle's sigmoid vs the exported file
    x = np.random.default_rng(5).uniform(0, 1, (3, 1, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = torch.sigmoid(_monai_net(bundle)(torch.from_numpy(x))).numpy()
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert np.max(np.abs(got - ref)) <= 1e-4

    rg1 = get_testdata_file("RG1_UNCR.dcm")
    result = CXRPipeline({"model": str(out), "allow_unverified_models": True}).run(load_study([rg1]))
    assert result.status == "ok", result.reason
    assert list(result.details["probabilities"]) == CXR_LABELS and result.unverified

    # `ainode analyze` on the DICOM file gives the same numbers, keyed by the file name
    from node.cli import main

    assert main(["analyze", rg1, "--pipeline", "cxr", "--model", str(out), "--no-dicom",
                 "--out", str(tmp_path / "analysis")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "analysis" / "predictions.csv")))
    assert [r["image_id"] for r in rows] == ["RG1_UNCR.dcm"] and rows[0]["status"] == "ok"
    assert {k: float(rows[0][k]) for k in CXR_LABELS} == result.details["probabilities"]


def test_head_ct_25d_bundle_maps_window_and_slices_exactly(tmp_path):
    """The classifier pipeline, fed the imported manifest, computes what MONAI's own transforms + net compute."""
    import torch
    from monai.transforms import ScaleIntensityRange

    from node.monai_bundle import import_bundle

    bundle = head_ct_bundle(tmp_path / "bundles", size=64, window=(0.0, 80.0))
    out = tmp_path / "weights" / "ich25d"
    manifest, diff = import_bundle(bundle, out)
    assert diff <= 1e-4 and manifest.labels == ICH_LABELS
    raw = yaml.safe_load((out / "manifest.yaml").read_text())
    c = raw["classifier"]
    assert c["windows"] == [{"name": "bundle", "center": 40.0, "width": 80.0}] and c["context"] == [-1, 0, 1]
    assert c["modalities"] == ["CT"] and raw["input"]["size"] == 64 and raw["input"]["normalisation"]["kind"] == "unit"

    paths, hu = write_head_ct(tmp_path / "ct", n=8, rows=64, bleed_slice=3)
    study = load_study(paths, options={"model": str(out), "allow_unverified_models": True})
    result = ClassifierPipeline().run(study)
    assert result.status == "ok", result.reason
    got = np.array([result.details["series"][0]["probabilities"][lab] for lab in ICH_LABELS]).T  # (slices, labels)

    scaled = ScaleIntensityRange(a_min=0.0, a_max=80.0, b_min=0.0, b_max=1.0, clip=True)(hu).numpy()
    idx = np.clip(np.arange(len(hu))[:, None] + np.array([-1, 0, 1])[None], 0, len(hu) - 1)
    with torch.no_grad():
        ref = torch.sigmoid(_monai_net(bundle)(torch.from_numpy(scaled[idx].astype(np.float32)))).numpy()
    assert np.max(np.abs(got - ref)) <= 2e-5  # the pipeline's per-slice values are rounded to 5 decimals
    assert result.details["probabilities"]["any"] == pytest.approx(float(ref[:, 0].max()), abs=1e-6)

    # the same series through `ainode analyze` (one study -> one row named by its folder)
    from node.cli import main

    rc = main(["analyze", str(tmp_path / "ct"), "--pipeline", "classifier", "--model", str(out), "--no-dicom",
               "--out", str(tmp_path / "analysis")])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "analysis" / "predictions.csv")))
    assert len(rows) == 1 and rows[0]["image_id"] == "ct" and rows[0]["status"] == "ok"
    assert float(rows[0]["any"]) == pytest.approx(float(ref[:, 0].max()), abs=1e-6)


@pytest.mark.parametrize("case, reason", [
    ("3d", "3D volume"),
    ("zscore", "per-image z-score"),
    ("spacing", "resamples the volume"),
    ("noclip", "clip=false"),
])
def test_bundles_the_manifest_cannot_describe_are_refused(tmp_path, case, reason):
    from node.monai_bundle import BundleRefused, import_bundle

    load = [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"}]
    window = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 80, "b_min": 0.0,
              "b_max": 1.0, "clip": True}
    pre = {"3d": None,
           "zscore": [*load, window, {"_target_": "NormalizeIntensityd", "keys": "image"}],
           "spacing": [*load, {"_target_": "Spacingd", "keys": "image", "pixdim": [1, 1]}, window],
           "noclip": [*load, {**window, "clip": False}]}[case]
    bundle = head_ct_bundle(tmp_path / "b", size=32, spatial_shape=[32, 32, 16] if case == "3d" else None,
                            preprocessing=pre, name=f"refused_{case}")
    with pytest.raises(BundleRefused, match=reason):
        import_bundle(bundle, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.yaml").exists() and not (tmp_path / "out" / "model.onnx").exists()
