"""Find pipelines through the ``ainode.pipelines`` entry-point group, so hospitals can add their own."""

from __future__ import annotations

import logging
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

from pipelines.base import Pipeline

log = logging.getLogger(__name__)
GROUP = "ainode.pipelines"


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def available_pipelines() -> list[str]:
    return sorted(_entry_points())


def pipeline_class(name: str) -> type[Pipeline]:
    eps = _entry_points()
    if name not in eps:
        raise KeyError(f"no pipeline {name!r} installed; installed: {', '.join(sorted(eps)) or 'none'}")
    cls = eps[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Pipeline)):
        raise TypeError(f"entry point {name!r} does not name a Pipeline subclass")
    return cls
