"""``ainode weights import``: both public checkpoint formats, parity, and the refusal paths.

Random-weight DenseNet-121s are saved exactly as each project saves its checkpoints (whole pickled
model; CheXNet's dict with 'model'), without either project installed, then imported.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch  # (a test extra: missing, the session must fail, not skip)
from support.cxr_models import (  # noqa: E402
    _rg1_tensor,
    imported_model,
    random_densenet,
    save_chexnet_checkpoint,
)

from node import weights as W  # noqa: E402
from pipelines.models import load_manifest, load_model, sha256_file  # noqa: E402


@pytest.mark.parametrize("fmt,labels,channels,norm", [
    ("torchxrayvision", 18, 1, "xrv"),
    ("chexnet", 14, 3, "imagenet"),
])
def test_import_each_format_with_parity(fmt, labels, channels, norm):
    d = imported_model(fmt)
    m = load_manifest(d / "manifest.yaml")
    assert len(m.labels) == labels and m.input.channels == channels and m.input.normalisation.kind == norm
    assert m.verified is False and m.sha256 == sha256_file(d / "model.onnx")
    assert m.labels == (W.XRV_ALL_LABELS if fmt == "torchxrayvision" else W.CHEXNET_LABELS)
    runner = load_model(d, allow_unverified=True)
    out = runner.run(_rg1_tensor(channels, norm))
    assert out["probabilities"].shape == (1, labels)
    assert out["cam"].shape == (1, labels, 7, 7)


def test_parity_against_the_original_network_on_the_real_radiograph(tmp_path):
    """Independent of the import's own check: torch forward of the reloaded checkpoint vs the ONNX file."""
    d = imported_model("torchxrayvision")
    ckpt = next(d.parent.glob("*.pt"))
    state = W.checkpoint_state(ckpt, "torchxrayvision")
    net = W.build_network("torchxrayvision", state)
    x = _rg1_tensor(1, "xrv")
    with torch.no_grad():
        ref = torch.sigmoid(net(torch.from_numpy(x))).numpy()
    got = load_model(d, allow_unverified=True).run(x)["probabilities"]
    assert np.max(np.abs(ref - got)) <= 1e-4
    # The CAM's spatial mean plus the bias is the logit: the map explains the reported score.
    cam = load_model(d, allow_unverified=True).run(x)["cam"]
    logit = cam.mean(axis=(2, 3)) + net.linear.bias.detach().numpy()
    assert np.allclose(1 / (1 + np.exp(-logit)), got, atol=1e-4)


def test_checkpoint_loads_without_either_project_installed():
    """In a fresh interpreter where torchxrayvision and torchvision cannot be imported, as on a node without
    them (this test session imports both for the parity tests)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ckpt = next(imported_model("chexnet").parent.glob("checkpoint"))
    code = ("import sys\nsys.modules['torchxrayvision'] = None\nsys.modules['torchvision'] = None\n"
            "import node.weights as W\n"
            f"state = W.checkpoint_state({str(ckpt)!r}, 'chexnet')\n"
            "assert 'classifier.0.weight' in state and 'features.denseblock4.denselayer16.conv2.weight' in state\n"
            "print('ok', len(state))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert r.returncode == 0 and r.stdout.startswith("ok "), r.stdout + r.stderr


def test_old_torchvision_key_names_and_dataparallel_prefix():
    state = {"module.features.denseblock1.denselayer1.norm.1.weight": 1,
             "module.features.denseblock1.denselayer1.conv.2.weight": 2,
             "module.classifier.0.bias": 3, "op_threshs": 4}
    assert W.normalise_keys(state) == {"features.denseblock1.denselayer1.norm1.weight": 1,
                                       "features.denseblock1.denselayer1.conv2.weight": 2,
                                       "classifier.0.bias": 3}


def test_cli_import_never_verifies(tmp_path, capsys):
    """--verified is gone: an import is always verified: false; `weights verify` is the only way to true."""
    net = random_densenet(14, 3, True, (-2.1, 2.6), seed=3)
    ckpt = save_chexnet_checkpoint(net, tmp_path / "checkpoint")
    rc = W.main(["import", "--format", "chexnet", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m"),
                 "--verified", "--evaluation", "Local AUC study 2026, report QA-17"])
    assert rc == 2 and "ainode weights verify" in capsys.readouterr().err
    assert not (tmp_path / "m" / "manifest.yaml").exists()
    rc = W.main(["import", "--format", "chexnet", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m"),
                 "--name", "chexnet-site", "--version", "2026.1"])
    assert rc == 0
    m = load_manifest(tmp_path / "m" / "manifest.yaml")
    assert not m.verified and m.evaluation_record is None and m.name == "chexnet-site" and m.version == "2026.1"
    assert W.main(["check", str(tmp_path / "m")]) == 0


def test_wrong_format_and_wrong_labels_fail(tmp_path):
    ckpt = next(imported_model("chexnet").parent.glob("checkpoint"))
    with pytest.raises(W.ImportFailed, match="is --format torchxrayvision right"):
        W.import_checkpoint("torchxrayvision", ckpt, tmp_path / "a")
    with pytest.raises(W.ImportFailed, match="14 outputs but 2 labels"):
        W.import_checkpoint("chexnet", ckpt, tmp_path / "b", labels=["A", "B"])
    assert not (tmp_path / "a" / "manifest.yaml").exists() and not (tmp_path / "b" / "manifest.yaml").exists()


def test_parity_failure_writes_nothing(tmp_path, monkeypatch):
    ckpt = next(imported_model("chexnet").parent.glob("checkpoint"))
    monkeypatch.setattr(W, "parity", lambda *a, **k: 0.5)
    with pytest.raises(W.ImportFailed, match="parity check failed"):
        W.import_checkpoint("chexnet", ckpt, tmp_path / "p")
    assert not (tmp_path / "p" / "model.onnx").exists() and not (tmp_path / "p" / "manifest.yaml").exists()


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_arbitrary_callables(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"model": _Evil()}, str(p), pickle_protocol=2)
    with pytest.raises(W.ImportFailed, match="does not load"):
        W.load_checkpoint(p)
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(W.ImportFailed):
        W.load_checkpoint(p)
    with pytest.raises(W.ImportFailed, match="does not exist"):
        W.load_checkpoint(tmp_path / "missing.pt")
    assert pickle  # keep the import: the module is what torch.load is told to use
