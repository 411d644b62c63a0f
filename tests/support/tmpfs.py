"""A small tmpfs mounted for a test: a file system that is really full at its size, so disk watermarks and
0xA700 are exercised against the kernel's own accounting rather than a simulated quota.

Needs root or password-less sudo (``./scripts/test`` installs its Debian peers the same way). Without
either, the test fails with that reason: a skipped test would hide that the rule was never checked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def tmpfs(path: Path, mb: int) -> Iterator[str]:
    """Mount a ``mb`` MB tmpfs at ``path`` for the block; yields how it was mounted."""
    path.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={mb}m,mode=0755", "tmpfs", str(path)]
    prefix: list[str] = []
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 and shutil.which("sudo"):
        prefix = ["sudo", "-n"]
        r = subprocess.run(prefix + cmd, capture_output=True, text=True)
        if r.returncode == 0:
            subprocess.run(prefix + ["chown", f"{os.getuid()}:{os.getgid()}", str(path)], check=True)
    if r.returncode != 0:
        raise RuntimeError(f"cannot mount a {mb} MB tmpfs at {path} ({r.stderr.strip()}): capping storage_dir "
                           "honestly needs root or password-less sudo")
    try:
        yield f"tmpfs {mb} MB ({'mounted with sudo' if prefix else 'mounted as root'})"
    finally:
        for _ in range(40):
            if subprocess.run(prefix + ["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)  # a process of the node may still hold a file open
