"""Random-weight MONAI bundles laid out as the MONAI Bundle Specification says (docs: mb_specification).

``ModelName/configs/metadata.json`` (the mandatory keys and ``network_data_format``),
``configs/inference.json`` (a complete inference config as Model Zoo bundles write it: ``network_def``,
``preprocessing``, ``dataset``, ``inferer``, ``postprocessing``, ``evaluator``, ``run``),
``models/model.pt`` (the state dict), ``docs/README.md`` and ``docs/license.txt``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def write_bundle(root: Path, name: str, *, network_def: dict[str, Any], inputs: dict[str, Any],
                 outputs: dict[str, Any], preprocessing: list[dict[str, Any]], postprocessing: list[dict[str, Any]],
                 task: str, seed: int = 0, save_weights: bool = True) -> Path:
    import monai
    import torch
    from monai.bundle import ConfigParser

    b = root / name
    (b / "configs").mkdir(parents=True, exist_ok=True)
    (b / "models").mkdir(exist_ok=True)
    (b / "docs").mkdir(exist_ok=True)
    meta = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": "0.1.0", "changelog": {"0.1.0": "random weights for ainode tests"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__, "required_packages_version": {},
        "name": name, "task": task, "description": f"{task}; RANDOM WEIGHTS, for import tests only",
        "authors": "ainode tests", "copyright": "Copyright (c) ainode tests", "intended_use": "Testing only.",
        "data_source": "none", "data_type": "dicom",
        "network_data_format": {"inputs": {"image": inputs}, "outputs": {"pred": outputs}},
    }
    inference = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.png')))",
        "device": "$torch.device('cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers"},
        "initialize": ["$monai.utils.set_determinism(seed=123)"],
        "run": ["$@evaluator.run()"],
    }
    (b / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    (b / "configs" / "inference.json").write_text(json.dumps(inference, indent=2), encoding="utf-8")
    (b / "docs" / "README.md").write_text(f"# {name}\n\n{task}. Random weights: for tests only.\n", encoding="utf-8")
    (b / "docs" / "license.txt").write_text("Apache License 2.0 (test bundle)\n", encoding="utf-8")
    if save_weights:
        torch.manual_seed(seed)
        parser = ConfigParser({"network_def": network_def})
        net = parser.get_parsed_content("network_def")
        torch.save(net.state_dict(), b / "models" / "model.pt")
    return b


CXR_LABELS = ["Pneumothorax", "Effusion", "Cardiomegaly"]
ICH_LABELS = ["any", "subdural"]


def cxr_bundle(root: Path, size: int = 64) -> Path:
    """A 2D DenseNet121 chest radiograph classifier (sigmoid outputs), as a MONAI classification bundle."""
    return write_bundle(
        root, "cxr_densenet_test", task="Chest X-ray multi-label classification",
        network_def={"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1, "out_channels": 3},
        inputs={"type": "image", "format": "magnitude", "modality": "DX", "num_channels": 1,
                "spatial_shape": [size, size], "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                "channel_def": {"0": "image"}},
        outputs={"type": "probabilities", "format": "classes", "num_channels": 3, "spatial_shape": [1, 3],
                 "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                 "channel_def": {str(i): lab for i, lab in enumerate(CXR_LABELS)}},
        preprocessing=[{"_target_": "LoadImaged", "keys": "image"},
                       {"_target_": "EnsureChannelFirstd", "keys": "image"},
                       {"_target_": "ScaleIntensityd", "keys": "image", "minv": 0.0, "maxv": 1.0},
                       {"_target_": "Resized", "keys": "image", "spatial_size": [size, size]},
                       {"_target_": "EnsureTyped", "keys": "image"}],
        postprocessing=[{"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                        {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5}])


def head_ct_bundle(root: Path, size: int = 64, window: tuple[float, float] = (0.0, 80.0),
                   spatial_shape: list[int] | None = None, preprocessing: list[dict[str, Any]] | None = None,
                   name: str = "head_ct_ich_25d_test") -> Path:
    """A 2.5D DenseNet121 (three neighbouring HU-windowed slices as channels) haemorrhage classifier."""
    shape = spatial_shape or [size, size]
    return write_bundle(
        root, name, task="Head CT intracranial haemorrhage slice classification (2.5D)",
        network_def={"_target_": "DenseNet121", "spatial_dims": len(shape), "in_channels": 3, "out_channels": 2},
        inputs={"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 3,
                "spatial_shape": shape, "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                "channel_def": {"0": "slice -1", "1": "slice 0", "2": "slice +1"}},
        outputs={"type": "probabilities", "format": "classes", "num_channels": 2, "spatial_shape": [1, 2],
                 "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                 "channel_def": {str(i): lab for i, lab in enumerate(ICH_LABELS)}},
        preprocessing=preprocessing or [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": window[0], "a_max": window[1],
             "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "Resized", "keys": "image", "spatial_size": shape},
            {"_target_": "EnsureTyped", "keys": "image"}],
        postprocessing=[{"_target_": "Activationsd", "keys": "pred", "sigmoid": True}],
        save_weights=len(shape) == 2)
