"""Shared fixtures: real node processes, real DCMTK tools. Nothing here mocks a peer."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests.support without installing tests

from support.node import NodeProcess, base_config, free_port  # noqa: E402

# What PixelMed passed is remembered on disk across processes and runs (node.results.validate); a test run
# starts from nothing, so every shape it relies on is really checked by PixelMed in this run. Node processes
# the tests start inherit the folder, as a node's workers share theirs.
_PIXELMED_CACHE = tempfile.mkdtemp(prefix="ainode-test-pixelmed-")
os.environ["AINODE_PIXELMED_CACHE"] = _PIXELMED_CACHE

REQUIRED_TOOLS = ["/usr/bin/storescu", "/usr/bin/storescp", "/usr/bin/echoscu", "/usr/bin/dsrdump", "dciodvfy",
                  "/usr/bin/dcmcjpls", "/usr/bin/dcmcrle", "Orthanc", "java", "/usr/bin/docker-compose", "chromium"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """A missing peer tool is a failure of the test set-up, never a silent skip."""
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise pytest.UsageError(f"required tools missing: {missing}; run ./scripts/test, which installs them")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_PIXELMED_CACHE, ignore_errors=True)


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


@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node with the default test configuration, shared by the tests of a module (started once)."""
    tmp = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    n = NodeProcess(tmp, base_config(tmp / "var", free_port())).start()
    yield n
    n.stop()
