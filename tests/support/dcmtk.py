"""DCMTK's ``storescp`` as a test peer: the reference C-STORE SCP most PACS vendors test against.

Always the Debian binaries by full path: pynetdicom installs console scripts with the same names
that shadow them on PATH.  ``TCP_NODELAY=1`` is set because Debian's DCMTK otherwise leaves Nagle's
algorithm on and every instance costs ~50 ms on loopback.

Usage::

    with StoreSCP(tmp_path / "scp", aet="STORESCP") as scp:
        scp.port
        scp.files()          # every received file (unique names: a re-sent instance shows twice)
        scp.sop_uids()       # SOP Instance UIDs received, one entry per reception
        scp.stop(); scp.start()
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Self

from pydicom import dcmread

from .orthanc import free_port

STORESCP = "/usr/bin/storescp"
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"


def dcmtk_env() -> dict[str, str]:
    """The environment to run any DCMTK tool with (Nagle off)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def echo(port: int, called_aet: str, host: str = "127.0.0.1", calling_aet: str = "ECHOSCU",
         timeout: float = 5.0) -> bool:
    """C-ECHO with DCMTK's echoscu; True when the peer answered Success."""
    r = subprocess.run([ECHOSCU, "-aet", calling_aet, "-aec", called_aet, "-to", str(int(timeout)), host,
                        str(port)], env=dcmtk_env(), capture_output=True, timeout=timeout + 5, check=False)
    return r.returncode == 0


class StoreSCP:
    """``/usr/bin/storescp`` writing every received instance into ``outdir``.

    ``unique_filenames=True`` (default) gives each reception its own file, so a test can tell
    "delivered exactly once" from "delivered twice".  ``accept_all=True`` accepts every transfer
    syntax DCMTK knows (``+xa``), like a permissive PACS; ``extra_args`` go to storescp verbatim
    (e.g. ``["+xi"]`` for implicit VR little endian only).
    """

    def __init__(self, outdir: str | Path, aet: str = "STORESCP", port: int | None = None,
                 unique_filenames: bool = True, accept_all: bool = True, extra_args: list[str] | None = None):
        self.outdir = Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.port = port or free_port()
        self.args = ["--aetitle", aet, "--output-directory", str(self.outdir)]
        if unique_filenames:
            self.args.append("+uf")
        if accept_all:
            self.args.append("+xa")
        self.args += list(extra_args or [])
        self.log_path = self.outdir.parent / f"storescp-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> StoreSCP:
        """Start and return once it answers C-ECHO (the port being open is not enough for storescp)."""
        if self.running:
            return self
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self._log = log
        self.proc = subprocess.Popen([STORESCP, *self.args, str(self.port)], stdout=log, stderr=subprocess.STDOUT,
                                     env=dcmtk_env(), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"storescp exited with {self.proc.returncode}: {self.log_tail()}")
            if echo(self.port, self.aet, timeout=2):
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"storescp did not answer C-ECHO within {timeout} s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
        self._log.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def files(self) -> list[Path]:
        """Completely received files (storescp writes in place; hidden/partial names are skipped)."""
        return sorted(p for p in self.outdir.rglob("*") if p.is_file() and not p.name.startswith("."))

    def sop_uids(self) -> list[str]:
        """One SOP Instance UID per received file, sorted (duplicates kept, so tests can count them)."""
        return sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.files())

    def transfer_syntaxes(self) -> list[str]:
        return sorted(str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in self.files())
