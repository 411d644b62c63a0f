"""Job leases in Redis: how the listener knows, within seconds, that a job's worker is gone.

Why: a job's Celery message is acknowledged late, so a dead *pool process* is noticed by its
parent at once; but when the whole worker (host, container, process group) dies, the message
comes back only after the broker's visibility timeout (task_time_limit + 60 s, 16 minutes by
default), and the study sat in PROCESSING all that time.

Workers never open the state database, so the lease lives in Redis, which both sides already use:
``ainode:lease:<job_id>`` holds the running attempt's token with a TTL of ``workers.lease_seconds``,
renewed every third of that by a thread of the worker. The listener re-queues a started job whose
key has expired. A run that lost its lease (a worker cut off from Redis, not dead) finds out at
its next renewal or, at the latest, just before it would write its summary, and then writes
nothing: only the run holding the lease completes a job, so results are never delivered twice.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlparse

import redis

log = logging.getLogger(__name__)

PREFIX = "ainode:lease:"
RETRY = "retry"  # value while a failed attempt waits for its Celery retry: the retry may take over

# take the lease if it is free, left for a retry, or held by a process known dead (ARGV[4]);
# renew / check / release only with our token
_ACQUIRE = """
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[3] or v == ARGV[4] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_HANDOVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def redis_client(url: str) -> redis.Redis:
    """The broker URL as Celery spells it (``redis+socket://`` for the embedded Redis) to a redis-py client."""
    if url.startswith("redis+socket://"):
        return redis.Redis(unix_socket_path=urlparse(url).path, socket_timeout=5)
    return redis.Redis.from_url(url, socket_timeout=5)


def key(job_id: str) -> str:
    return PREFIX + job_id


class LeaseLost(Exception):
    """Another attempt holds the job now: this one must not complete it."""


class Lease:
    """One attempt's hold on one job, renewed in the background while the attempt runs."""

    def __init__(self, client: redis.Redis, job_id: str, seconds: float):
        self.client = client
        self.key = key(job_id)
        self.ms = max(1000, int(seconds * 1000))
        # who holds it: a worker on the same host can tell at once when the holder died (a killed pool process)
        self.token = f"{uuid.uuid4().hex}|{socket.gethostname()}|{os.getpid()}"
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _call(self, script: str, *args: Any) -> int:
        return int(self.client.eval(script, 1, self.key, *args))

    def _dead_holder(self) -> str:
        """The current value when it names a process on this host that no longer runs, else ''."""
        raw = self.client.get(self.key)
        parts = raw.decode(errors="replace").split("|") if raw else []
        if len(parts) != 3 or parts[1] != socket.gethostname() or not parts[2].isdigit():
            return ""
        return "" if _alive(int(parts[2])) else raw.decode(errors="replace")  # type: ignore[union-attr]

    def acquire(self, done: Any = None, poll: float = 1.0) -> bool:
        """Wait until the lease is ours (True), or ``done()`` says another attempt finished the job (False)."""
        while not self._call(_ACQUIRE, self.token, self.ms, RETRY, self._dead_holder()):
            if done is not None and done():
                return False
            time.sleep(poll)
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.key}", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ms / 3000):
            try:
                if not self._call(_RENEW, self.token, self.ms):
                    log.error("%s: lease lost; this attempt will not complete the job", self.key)
                    self.lost.set()
                    return
            except redis.RedisError as exc:  # keep trying: the lease is still ours until it expires
                log.warning("%s: cannot renew the lease: %s", self.key, exc)

    def check(self) -> None:
        """Raise LeaseLost unless this attempt still holds the job (called just before completing it)."""
        if self.lost.is_set():
            raise LeaseLost(self.key)
        try:
            if self.client.get(self.key) != self.token.encode():
                self.lost.set()
                raise LeaseLost(self.key)
        except redis.RedisError as exc:
            raise LeaseLost(f"{self.key}: {exc}") from exc

    def _stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def release(self) -> None:
        self._stop_renewing()
        try:
            self._call(_RELEASE, self.token)
        except redis.RedisError:
            pass  # it expires on its own

    def hand_over(self, seconds: float) -> None:
        """A failed attempt whose Celery retry is due in ``seconds``: keep the job held for the retry."""
        self._stop_renewing()
        try:
            self._call(_HANDOVER, self.token, int(seconds * 1000) + self.ms, RETRY)
        except redis.RedisError:
            pass


def _alive(pid: int) -> bool:
    """A killed process stays a zombie until its parent reaps it: that counts as dead."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not os.path.isdir("/proc")  # no /proc entry on Linux: gone


def expired(client: redis.Redis, job_ids: list[str]) -> list[str]:
    """The jobs among ``job_ids`` whose lease is gone (listener side)."""
    if not job_ids:
        return []
    pipe = client.pipeline()
    for job_id in job_ids:
        pipe.exists(key(job_id))
    return [j for j, alive in zip(job_ids, pipe.execute(), strict=True) if not alive]
