"""Shared fixtures: real node processes, real DCMTK tools. Nothing here mocks a peer."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests.support without installing tests

from support.node import NodeProcess, base_config, free_port  # noqa: E402

REQUIRED_TOOLS = ["/usr/bin/storescu", "/usr/bin/storescp", "/usr/bin/echoscu", "/usr/bin/dsrdump", "dciodvfy",
                  "/usr/bin/dcmcjpls", "/usr/bin/dcmcrle", "Orthanc", "java"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """A missing peer tool is a failure of the test set-up, never a silent skip."""
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise pytest.UsageError(f"required tools missing: {missing}; run ./scripts/test, which installs them")


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    started: list[NodeProcess] = []

    def make(config: dict[str, Any] | None = None, env: dict[str, str] | None = None, start: bool = True,
             **node: Any) -> NodeProcess:
        cfg = config or base_config(tmp_path / "var", free_port(), **node)
        n = NodeProcess(tmp_path, cfg, env=env)
        started.append(n)
        return n.start() if start else n

    yield make
    for n in started:
        n.stop()
