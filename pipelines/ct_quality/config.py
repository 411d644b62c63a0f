"""Settings of the ct_quality pipeline: packaged YAML defaults overlaid by route / site options.

Defaults live in ``defaults.yaml`` (beside this file) so a physicist can read and change every
threshold and reference level without touching code.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")


@lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    with DEFAULTS_FILE.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def settings(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults, then each layer in order. A layer may hold our keys flat or under ``ct_quality``
    (the node passes route options and ``pipelines.ct_quality`` config in one dict)."""
    cfg = _defaults()
    for layer in layers:
        if not layer:
            continue
        flat = {k: v for k, v in layer.items() if k in cfg}
        cfg = _merge(cfg, flat)
        nested = layer.get("ct_quality")
        if isinstance(nested, dict):
            cfg = _merge(cfg, nested)
    return cfg
