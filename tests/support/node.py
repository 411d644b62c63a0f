"""Start ``ainode run`` as a real subprocess with a temp config, and talk to it like IT staff would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
TEST_PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what or predicate}")


def storescu(port: int, files: list[Path] | list[str], aet: str = "MODALITY1", aec: str = "AINODE",
             extra: list[str] | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [STORESCU, "-aet", aet, "-aec", aec, *(extra or []), "127.0.0.1", str(port), *map(str, files)]
    env = dict(os.environ, TCP_NODELAY="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"storescu failed ({r.returncode}): {r.stderr[-2000:]}")
    return r


def spool_files(storage: Path) -> list[Path]:
    """Files with content in the spool, each once: an empty pool file holds nothing, and a pool name not
    yet settled is a second link to a stored instance."""
    out = []
    for p in (storage / "spool").rglob("*"):
        try:
            st = p.stat()
        except FileNotFoundError:  # settled meanwhile
            continue
        if p.is_file() and st.st_size and not (p.parent.name == ".incoming" and st.st_nlink > 1):
            out.append(p)
    return sorted(out)


def base_config(storage: Path, port: int, **node: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "node": {"ae_title": "AINODE", "host": "127.0.0.1", "port": port, "storage_dir": str(storage),
                 "min_free_disk_mb": 1, "web_port": None, **node},
        "workers": {"concurrency": 1},
        "peers": [{"ae_title": "MODALITY1"}, {"ae_title": "STORESCU"}],
        "routes": [{"name": "everything", "match": {"Modality": ["CT", "CR", "DX", "MR"]}, "pipelines": ["probe"],
                    "complete_on": "release", "quiet_seconds": 3, "max_wait_seconds": 120}],
    }
    return cfg


class NodeProcess:
    """``ainode run`` in its own process group; stdout/stderr go to ``log`` for post-mortems."""

    def __init__(self, tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None):
        self.tmp = tmp
        self.config = config
        self.port = int(config["node"]["port"])
        self.storage = Path(config["node"]["storage_dir"])
        self.config_path = tmp / "ainode.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log = tmp / "node.log"
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(TEST_PLUGINS), os.environ.get("PYTHONPATH", "")]), **(env or {}))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "node.cli", "run", "--config", str(self.config_path),
                                      "--stop-timeout", "10"], stdout=self._logf, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        wait_port(self.port)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._logf.close()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "node.cli", *args, "--config", str(self.config_path)],
                              capture_output=True, text=True, env=self.env, timeout=60)

    def status(self) -> list[dict[str, Any]]:
        r = self.cli("status", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["studies"]

    def study(self, study_uid: str) -> dict[str, Any] | None:
        return next((s for s in self.status() if s["study_uid"] == study_uid), None)

    def wait_study(self, study_uid: str, states: tuple[str, ...] = ("DONE",), timeout: float = 90) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            s = self.study(study_uid)
            return s if s and s["state"] in states else None

        try:
            return wait_for(check, timeout, 0.25, f"study {study_uid} in {states}")
        except TimeoutError:
            raise AssertionError(f"study not {states}: {self.study(study_uid)}\n--- node log ---\n"
                                 f"{self.log.read_text(errors='replace')[-4000:]}") from None

    def result(self, job_id: str) -> dict[str, Any]:
        return json.loads((self.storage / "results" / job_id / "result.json").read_text())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")
