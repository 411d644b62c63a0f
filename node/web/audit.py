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
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

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
            finally:
                os.close(fd)
        return entry

    def tail(self, n: int = 200) -> list[dict[str, Any]]:
        """The newest ``n`` entries, newest first."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
        out = []
        for line in reversed(lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out
