"""Random-weight DenseNet-121 checkpoints saved exactly as each source project saves its own.

torchxrayvision pickles the whole ``torchxrayvision.models.DenseNet``; reproduce-chexnet pickles a
dict with the whole ``torchvision.models.densenet.DenseNet`` under ``'model'``. Neither package is
installed here, so the classes are registered under those module names only while pickling; the
importer must then read the files without them, as it will on a hospital's worker.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from pipelines.cxr import densenet as dn

_SAVED: dict[str, types.ModuleType | None] = {}


def _fake_modules(module_name: str) -> dict[type, type]:
    """Subclasses of our layers that claim to live in ``module_name`` (for pickling only).

    Fresh stand-in modules replace any real ones (the parity tests import the real torchxrayvision
    and torchvision) until ``_drop_modules`` puts the real ones back.
    """
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        _SAVED.setdefault(name, sys.modules.get(name))
        sys.modules[name] = types.ModuleType(name)
    mod = sys.modules[module_name]
    mapping: dict[type, type] = {}
    for base, cls_name in ((dn.DenseNet121, "DenseNet"), (dn._DenseLayer, "_DenseLayer"),
                           (dn._DenseBlock, "_DenseBlock"), (dn._Transition, "_Transition")):
        fake = type(cls_name, (base,), {"__module__": module_name, "__qualname__": cls_name})
        setattr(mod, cls_name, fake)
        mapping[base] = fake
    return mapping


def _drop_modules(root: str) -> None:
    for name in [n for n in sys.modules if n == root or n.startswith(root + ".")]:
        if name in _SAVED:
            original = _SAVED.pop(name)
            if original is not None:
                sys.modules[name] = original
                continue
            del sys.modules[name]


def random_densenet(num_classes: int, in_channels: int, sigmoid_head: bool, value_range: tuple[float, float],
                    seed: int = 0, calibration: np.ndarray | None = None) -> dn.DenseNet121:
    """Random weights with BatchNorm statistics taken from realistic inputs, so outputs are not saturated.

    ``calibration`` (N, C, 224, 224) is typically the real radiograph as the pipeline prepares it,
    mixed into random inputs in the model's value range.
    """
    torch.manual_seed(seed)
    net = dn.DenseNet121(num_classes, in_channels=in_channels, sigmoid_head=sigmoid_head)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batch
    lo, hi = value_range
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, in_channels, 224, 224, generator=g) * (hi - lo) + lo
    if calibration is not None:
        x = torch.cat([x, torch.from_numpy(np.asarray(calibration, np.float32))])
    net.train()
    with torch.no_grad():
        net(x)
    return net.eval()


_CACHE: dict[str, Path] = {}


def _rg1_tensor(channels: int, kind: str) -> np.ndarray:
    from pydicom.data import get_testdata_file

    from node.loader import load_study
    from pipelines.cxr.preprocess import prepare
    from pipelines.models import InputSpec, Normalisation

    norm = Normalisation(kind="xrv", range=(-1024.0, 1024.0)) if kind == "xrv" else Normalisation(
        kind="imagenet", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    s = load_study([get_testdata_file("RG1_UNCR.dcm")]).series[0]
    p = prepare(s.pixels[0], s.headers[0], s.photometric, s.window, InputSpec(channels=channels, normalisation=norm))
    return p.tensor[None]


def imported_model(fmt: str) -> Path:
    """Build, save in the project's own format, and import a random model once per test process.

    Returns the model directory (model.onnx + manifest.yaml, verified false). Callers copy it before
    editing anything.
    """
    if fmt in _CACHE:
        return _CACHE[fmt]
    from node.weights import import_checkpoint

    root = Path(tempfile.mkdtemp(prefix=f"ainode-{fmt}-"))
    if fmt == "torchxrayvision":
        net = random_densenet(18, 1, False, (-1024, 1024), calibration=_rg1_tensor(1, "xrv"))
        ckpt = save_xrv_checkpoint(net, root / "xrv.pt")
    else:
        net = random_densenet(14, 3, True, (-2.1, 2.6), calibration=_rg1_tensor(3, "imagenet"))
        ckpt = save_chexnet_checkpoint(net, root / "checkpoint")
    out = root / "model"
    import_checkpoint(fmt, ckpt, out)
    _CACHE[fmt] = out
    return out


def xrv_model(dest: Path, present: Iterable[str] = (), possible: Iterable[str] = (),
              critical: dict[str, Any] | None = None, thresholds: dict[str, Any] | None = None,
              own_thresholds: bool = False) -> Path:
    """A copy of the imported random torchxrayvision model in ``dest``, with thresholds that make the outcome
    deterministic: ``present`` labels present at any probability, ``possible`` ones possible below 1, all
    others absent (the random model never reaches 1); or ``thresholds`` as given, or the import's own
    (``own_thresholds``). ``critical`` as in a manifest."""
    src = imported_model("torchxrayvision")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "model.onnx", dest / "model.onnx")
    m = yaml.safe_load((src / "manifest.yaml").read_text())
    if thresholds is not None:
        m["thresholds"] = thresholds
    elif not own_thresholds:
        m["thresholds"] = {label: {"possible": 1.0, "present": 1.0} for label in m["labels"]}
        m["thresholds"].update({label: {"possible": 0.0, "present": 1.0} for label in possible})
        m["thresholds"].update({label: {"possible": 0.0, "present": 0.0} for label in present})
    if critical is not None:
        m["critical"] = critical
    (dest / "manifest.yaml").write_text(yaml.safe_dump(m, sort_keys=False))
    return dest


def checkpoint_of(fmt: str) -> Path:
    """The project-format checkpoint file ``imported_model(fmt)`` was imported from (same weights)."""
    root = imported_model(fmt).parent
    return root / ("xrv.pt" if fmt == "torchxrayvision" else "checkpoint")


def save_xrv_checkpoint(net: dn.DenseNet121, path: Path) -> Path:
    mapping = _fake_modules("torchxrayvision.models")
    try:
        originals = {}
        for m in net.modules():
            if type(m) in mapping:
                originals[m] = type(m)
                m.__class__ = mapping[type(m)]
        torch.save(net, str(path))
    finally:
        for m, cls in originals.items():
            m.__class__ = cls
        _drop_modules("torchxrayvision")
    return path


def save_chexnet_checkpoint(net: dn.DenseNet121, path: Path) -> Path:
    mapping = _fake_modules("torchvision.models.densenet")
    try:
        originals = {}
        for m in net.modules():
            if type(m) in mapping:
                originals[m] = type(m)
                m.__class__ = mapping[type(m)]
        state = {"model": net, "best_loss": 0.1234, "epoch": 7, "rng_state": torch.get_rng_state(), "LR": 0.001}
        torch.save(state, str(path))
    finally:
        for m, cls in originals.items():
            m.__class__ = cls
        _drop_modules("torchvision")
    return path
