"""The reference implementations' own paths from file to probabilities, for parity with ainode.

torchxrayvision: ``xrv.utils.read_xray_dcm(path, voi_lut=True)`` -> ``XRayCenterCrop`` ->
``XRayResizer(224)`` -> ``xrv.models.DenseNet`` with sigmoid (no ``op_threshs``: raw probabilities).
reproduce-chexnet: ``PIL.Image.open(png).convert('RGB')`` -> ``Resize(224)`` -> ``CenterCrop(224)``
-> ``ToTensor`` -> ``Normalize(ImageNet)`` -> torchvision ``densenet121`` with a Linear+Sigmoid head.

Both packages are test extras. PyPI's torchvision wheel cannot load its compiled operators beside
the CPU build of torch ("operator torchvision::nms does not exist", raised while importing
``torchvision._meta_registrations``); DenseNet needs none of them, so that module is replaced by an
empty one before the import.
"""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def import_references() -> tuple[Any, Any]:
    """(torchxrayvision, torchvision), importable beside CPU torch."""
    if "torchvision" not in sys.modules:
        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision
    import torchxrayvision as xrv

    return xrv, torchvision


def xrv_model(state: dict[str, Any]) -> Any:
    xrv, _ = import_references()
    net = xrv.models.DenseNet(weights=None, num_classes=state["classifier.weight"].shape[0], apply_sigmoid=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def xrv_probabilities(net: Any, dcm: Path) -> np.ndarray:
    """torchxrayvision's DICOM path, exactly as its README shows it."""
    import torch

    xrv, _ = import_references()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Converting MONOCHROME1 to MONOCHROME2 ..."
        img = xrv.utils.read_xray_dcm(str(dcm), voi_lut=True)
    img = xrv.datasets.XRayCenterCrop()(img[None, ...])
    img = xrv.datasets.XRayResizer(224)(img)
    with torch.no_grad():
        return net(torch.from_numpy(img)[None]).numpy()[0]


def chexnet_model(state: dict[str, Any]) -> Any:
    import torch

    _, torchvision = import_references()
    net = torchvision.models.densenet121(weights=None)
    n = state["classifier.0.weight"].shape[0]
    net.classifier = torch.nn.Sequential(torch.nn.Linear(net.classifier.in_features, n), torch.nn.Sigmoid())
    net.load_state_dict(state, strict=True)
    return net.eval()


def chexnet_probabilities(net: Any, png: Path) -> np.ndarray:
    """reproduce-chexnet's evaluation transforms (``Scale`` is today's ``Resize``) on the image file."""
    import torch
    from PIL import Image

    _, torchvision = import_references()
    t = torchvision.transforms
    tf = t.Compose([t.Resize(224), t.CenterCrop(224), t.ToTensor(),
                    t.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    x = tf(Image.open(png).convert("RGB"))
    with torch.no_grad():
        return net(x[None]).numpy()[0]


def ainode_probabilities(model_dir: Path, dcms: list[Path], refused: list[Path] | None = None) -> np.ndarray:
    """The cxr pipeline's own path (loader, input checks, preprocessing, ONNX Runtime): (N, labels).

    With ``refused`` given, images the input checks refuse are listed there and left out of the rows."""
    from node.loader import load_study
    from pipelines.cxr import CXRPipeline

    pipe = CXRPipeline({"model": str(model_dir), "allow_unverified_models": True})
    out = []
    for p in dcms:
        study = load_study([p])
        runner = pipe.model(study)
        images, why = pipe.prepare_images(study, runner.manifest.input)
        if not images and refused is not None:
            refused.append(p)
            continue
        assert images, why
        out.append(runner.run(np.stack([images[0].prepared.tensor]))[runner.manifest.output.probabilities][0])
    return np.stack(out)
