"""A real Orthanc (Debian ``/usr/sbin/Orthanc``) as a test peer: a PACS we did not write.

Mocks agree with whatever we believe DICOM says; Orthanc disagrees in the ways real PACS do
(called-AE checks, transfer syntax choices, DICOMweb multipart parsing), so delivery and receive tests
run against it.  Each instance lives in its own temp dir on free ports, keeps those ports across
``stop()``/``start()`` (so a "destination down" test can bring the same PACS back), and is killed on
exit even when the test fails.

Usage::

    with Orthanc(tmp_path / "pacs", aet="PACS", peers={"AINODE": ("AINODE", "127.0.0.1", 11112)},
                 dicomweb=True) as pacs:
        pacs.dicom_port, pacs.http_url, pacs.dicomweb_url
        pacs.instances()                 # list of Orthanc instance ids
        pacs.sop_uids(study_uid)         # SOP Instance UIDs stored for one study
        pacs.stop(); pacs.start()        # same ports, same storage (pacs.kill() for a crash)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Self

import requests

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

Peer = tuple[str, str, int] | dict[str, Any]


def free_port() -> int:
    """A port nobody listens on right now (the kernel's choice; tiny race, acceptable in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
    """Block until something accepts TCP connections on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


class Orthanc:
    """One Orthanc process with its own storage, config and log under ``workdir``.

    ``peers`` maps a modality name to ``(aet, host, port)`` or to a full Orthanc modality dict
    (e.g. ``{"AET": ..., "Host": ..., "Port": ..., "AllowStorageCommitment": True}``).
    ``check_called_aet=True`` makes Orthanc reject associations addressed to another AE title
    (A-ASSOCIATE-RJ permanent, "called AE title not recognised"), which is how real PACS refuse a
    misconfigured sender.  ``extra`` is merged last into the Orthanc configuration.
    """

    def __init__(self, workdir: str | Path, aet: str = "ORTHANC", peers: dict[str, Peer] | None = None,
                 dicomweb: bool = False, check_called_aet: bool = False, extra: dict[str, Any] | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.dicomweb = dicomweb
        self.proc: subprocess.Popen[bytes] | None = None
        modalities: dict[str, Any] = {}
        for name, peer in (peers or {}).items():
            modalities[name] = list(peer) if isinstance(peer, tuple) else peer
        self.config: dict[str, Any] = {
            "Name": f"test-{aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": check_called_aet,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": modalities,
            "DicomScuTimeout": 10,
            "DicomAssociationCloseDelay": 0,  # else its SCU associations (commitment reports) linger 5 s
            "DicomScpTimeout": 30,
            "SaveJobs": False,
            "WebDavEnabled": False,  # its upload thread alone makes a graceful stop take 2 s longer
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 8,
            "DicomThreadsCount": 4,
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [],
        }
        if dicomweb:
            self.config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}
        self.config.update(extra or {})
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"

    # ------------------------------------------------------------------ lifecycle
    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The STOW/QIDO/WADO-RS base URL (only served when constructed with ``dicomweb=True``)."""
        return f"{self.http_url}/dicom-web"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> Orthanc:
        """Start (or restart) on the same ports and storage; returns when REST and DICOM both answer."""
        if self.running:
            return self
        self.config_path.write_text(json.dumps(self.config, indent=2))
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self._log = log
        self.proc = subprocess.Popen([ORTHANC_BIN, "--verbose", str(self.config_path)], stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + self.log_tail())
            try:
                if requests.get(f"{self.http_url}/system", timeout=1).ok:
                    wait_port(self.dicom_port, timeout=max(1.0, deadline - time.monotonic()))
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer within {timeout} s; see {self.log_path}")

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful stop (SIGTERM; Orthanc needs ~3 s), SIGKILL if it hangs; storage stays for ``start()``."""
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

    def kill(self) -> None:
        """SIGKILL: a crashed PACS (and a fast teardown); ``start()`` brings it back on the same storage."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None
        self._log.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()  # the temp dir is thrown away anyway; a graceful stop would cost every test 3 s

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # ------------------------------------------------------------------ REST helpers
    def get(self, path: str, **kw: Any) -> Any:
        r = requests.get(f"{self.http_url}{path}", timeout=kw.pop("timeout", 10), **kw)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: Any, **kw: Any) -> Any:
        r = requests.post(f"{self.http_url}{path}", json=body, timeout=kw.pop("timeout", 30), **kw)
        r.raise_for_status()
        return r.json()

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance (a re-sent SOP Instance UID does not add one)."""
        return list(self.get("/instances"))

    def studies(self) -> list[str]:
        return list(self.get("/studies"))

    def study_uids(self) -> list[str]:
        """StudyInstanceUID of every stored study."""
        return [self.get(f"/studies/{sid}")["MainDicomTags"]["StudyInstanceUID"] for sid in self.studies()]

    def sop_uids(self, study_uid: str | None = None) -> list[str]:
        """SOP Instance UIDs stored (optionally only in one study), sorted; duplicates impossible by design."""
        query = {"StudyInstanceUID": study_uid} if study_uid else {}
        found = self.post("/tools/find", {"Level": "Instance", "Query": query, "Expand": True})
        return sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in found)

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{orthanc_id}/simplified-tags"))

    def statistics(self) -> dict[str, Any]:
        return dict(self.get("/statistics"))
