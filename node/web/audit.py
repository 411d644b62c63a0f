"""Append-only audit log: one JSON line per login and per admin action, for whoever investigates later.

Lines are written with O_APPEND in one ``write`` each, so concurrent writers never interleave and nothing
already written is ever rewritten. Secrets are masked before they reach the file, and the console never
passes patient data to it (studies are named by UID only).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

SECRET_KEYS = ("password", "password_hash", "token", "bearer_token", "secret", "api_key")
MASK = "***"


def mask_secrets(value: Any) -> Any:
    """A copy with every secret-looking key's value replaced by ``***`` (presence stays visible)."""
    if isinstance(value, dict):
        return {k: (MASK if v not in (None, "") and any(s in str(k).lower() for s in SECRET_KEYS)
                    else mask_secrets(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


class AuditLog:
    """``max_bytes`` bounds the file: past it, the file is renamed ``<name>.<UTC time>`` (never rewritten)
    and a new one begins; the newest ``keep`` renamed files stay, so a flood of failed sign-ins cannot
    fill the disk the studies need, while weeks of ordinary use stay on the node for whoever looks."""

    def __init__(self, path: str | Path, max_bytes: int = 64 * 2**20, keep: int = 8):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.keep = max_bytes, keep
        self._lock = threading.Lock()

    def rotated(self) -> list[Path]:
        """The renamed files, oldest first."""
        return sorted(self.path.parent.glob(self.path.name + ".*"))

    def _rotate(self, size: int) -> None:
        if size <= self.max_bytes:
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        n = 1
        while target.exists():  # two rotations within a second
            target = self.path.with_name(f"{self.path.name}.{stamp}-{n}")
            n += 1
        os.rename(self.path, target)
        for old in self.rotated()[:-self.keep] if self.keep > 0 else self.rotated():
            old.unlink(missing_ok=True)

    def write(self, *, who: str, role: str, ip: str, action: str, target: str = "", outcome: str = "ok",
              before: Any = None, after: Any = None, detail: str = "") -> dict[str, Any]:
        entry: dict[str, Any] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ts": round(time.time(), 3),
                                 "who": who, "role": role, "from": ip, "action": action, "target": target,
                                 "outcome": outcome}
        if detail:
            entry["detail"] = detail
        if before is not None or after is not None:
            entry["before"] = mask_secrets(before)
            entry["after"] = mask_secrets(after)
        line = (json.dumps(entry, default=str, sort_keys=False) + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            self._rotate(size)
        return entry

    def tail(self, n: int = 200) -> list[dict[str, Any]]:
        """The newest ``n`` entries, newest first."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:  # from the end: the file may be tens of MB
            f.seek(0, os.SEEK_END)
            end = pos = f.tell()
            data = b""
            while pos > 0 and data.count(b"\n") <= n:
                pos = max(0, pos - 65536)
                f.seek(pos)
                data = f.read(end - pos)
        lines = data.decode("utf-8", errors="replace").splitlines()[-n:]
        out = []
        for line in reversed(lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out
