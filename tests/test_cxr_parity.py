"""Same weights, same numbers: ainode's cxr probabilities against the reference implementations' own paths.

torchxrayvision's DICOM path on the real CR (RG1: 15-bit MONOCHROME1 with a window) and on NIH
ChestX-ray14 radiographs wrapped as tagless DX (no window: full stored range) and as inverted
MONOCHROME1 CR; reproduce-chexnet's torchvision transforms on the same PNG files. Random weights
(the parity is about the input path, not the values), imported the way a hospital imports real ones.
A bounded sample of the 156 dev images keeps this test short; ``benchmarks/cxr_parity.py`` runs all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file
from support.cxr_data import dev_images, read_png, save, wrap
from support.cxr_models import checkpoint_of, imported_model
from support.reference import (
    ainode_probabilities,
    chexnet_model,
    chexnet_probabilities,
    import_references,
    xrv_model,
    xrv_probabilities,
)

from node.weights import XRV_ALL_OP_THRESHS, checkpoint_state
from pipelines.cxr.labels import op_norm

TOLERANCE = 0.01


def _sample(n: int = 6) -> list[Path]:
    pngs = dev_images()
    assert len(pngs) >= 100, "the NIH dev radiographs (shared/data/nih-cxr-frontal-dev) are missing"
    return pngs[:: len(pngs) // n][:n]


def _wrapped(tmp_path: Path, pngs: list[Path], forms: tuple[str, ...]) -> list[Path]:
    return [save(wrap(read_png(p), form), tmp_path / form / f"{p.stem}.dcm") for p in pngs for form in forms]


def test_torchxrayvision_dicom_path(tmp_path):
    model_dir = imported_model("torchxrayvision")
    net = xrv_model(checkpoint_state(checkpoint_of("torchxrayvision"), "torchxrayvision"))
    files = [Path(get_testdata_file("RG1_UNCR.dcm"))] + _wrapped(tmp_path, _sample(), ("DX", "CR-MONOCHROME1"))
    ours = ainode_probabilities(model_dir, files)
    ref = np.stack([xrv_probabilities(net, f) for f in files])
    worst = np.abs(ours - ref).max(axis=1)
    assert worst.max() <= TOLERANCE, dict(zip((f.name for f in files), worst.round(4)))
    # the comparison has teeth: the images give the model different inputs and it answers differently
    assert np.ptp(ref, axis=0).max() > 5 * TOLERANCE
    # MONOCHROME1 stored inverted and read back gives the DX numbers (both forms of one image)
    assert np.abs(ours[1::2] - ours[2::2]).max() < 1e-4


def test_chexnet_torchvision_path(tmp_path):
    model_dir = imported_model("chexnet")
    net = chexnet_model(checkpoint_state(checkpoint_of("chexnet"), "chexnet"))
    pngs = _sample()
    files = _wrapped(tmp_path, pngs, ("DX", "CR-MONOCHROME1"))
    ours = ainode_probabilities(model_dir, files)
    ref = np.stack([chexnet_probabilities(net, p) for p in pngs for _ in range(2)])
    worst = np.abs(ours - ref).max(axis=1)
    assert worst.max() <= TOLERANCE, dict(zip((f"{f.parent.name}/{f.name}" for f in files), worst.round(4)))
    assert np.ptp(ref, axis=0).max() > 5 * TOLERANCE


@pytest.mark.parametrize("p", [0.0, 0.004, 0.05, 0.1032, 0.3, 0.999])
def test_op_norm_is_torchxrayvision_mapping(p):
    """The README's mapping from ainode's raw probability + threshold to torchxrayvision's op_norm value."""
    xrv, _ = import_references()
    t = torch.tensor(XRV_ALL_OP_THRESHS)
    ref = xrv.models.op_norm(torch.full((1, len(t)), p), t)[0].numpy()
    ours = np.array([op_norm(p, float(x)) for x in t])
    assert np.abs(ours - ref).max() < 1e-6
    assert all(abs(op_norm(float(x), float(x)) - 0.5) < 1e-6 for x in t)  # the threshold maps to 0.5
