"""Durable instance storage: bytes as received, on disk and fsynced before anyone says success.

Layout: ``spool/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``. UIDs name paths only after
``valid_uid`` accepted them, so a hostile UID can never climb out of the spool.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from node.config import UID_RE

log = logging.getLogger(__name__)

PREAMBLE = b"\x00" * 128 + b"DICM"


def valid_uid(uid: object) -> bool:
    """DICOM UID rules (PS3.5 9.1): 1-64 chars, digits and dots, no empty or zero-padded component."""
    return isinstance(uid, str) and 0 < len(uid) <= 64 and UID_RE.match(uid) is not None


class DiskFull(Exception):
    """Free space is below ``node.min_free_disk_mb``."""


@dataclass(frozen=True)
class Stored:
    path: Path
    size: int
    duplicate: bool


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IncomingFile:
    """An instance being received, streamed to ``spool/.incoming`` fragment by fragment.

    Nothing here is durable or visible to anyone until ``Spool.commit``; a crash leaves a ``.tmp``
    file that recovery deletes (it was never acknowledged).
    """

    def __init__(self, directory: Path, head: bytes):
        self.path = directory / f"{uuid.uuid4().hex}.tmp"
        self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self.size = 0
        self.write(head)

    def write(self, data: bytes | memoryview) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.size += n

    def sync_and_close(self) -> None:
        assert self.fd is not None
        fd, self.fd = self.fd, None
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def abandon(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
        self.path.unlink(missing_ok=True)


class Spool:
    def __init__(self, storage_dir: str | Path, min_free_mb: int = 1024):
        self.root = Path(storage_dir) / "spool"
        self.root.mkdir(parents=True, exist_ok=True)
        self.incoming_dir = self.root / ".incoming"
        self.incoming_dir.mkdir(exist_ok=True)
        self.min_free_bytes = int(min_free_mb) * 1024 * 1024
        self._known_dirs: set[Path] = set()

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not valid_uid(uid):
                raise ValueError(f"invalid UID {uid!r}")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        created = []
        d = directory
        while not d.exists():
            created.append(d)
            d = d.parent
        directory.mkdir(parents=True, exist_ok=True)
        for c in reversed(created):  # make each new directory entry itself durable
            _fsync_dir(c.parent)
        self._known_dirs.add(directory)

    def low_on_space(self, incoming: int = 0) -> bool:
        return self.free_bytes() - incoming < self.min_free_bytes

    def incoming(self, head: bytes) -> IncomingFile:
        """A new file for one instance as it arrives, starting with ``head`` (preamble and file meta)."""
        return IncomingFile(self.incoming_dir, head)

    def commit(self, incoming: IncomingFile, study_uid: str, series_uid: str, sop_uid: str) -> Stored:
        """fdatasync, link into place, fsync the directory. Raises DiskFull / ValueError / OSError and then
        leaves nothing behind.

        A file already present for this SOP Instance UID is kept (first copy wins): a re-send is a
        duplicate, and overwriting a file a worker may be reading would be worse than ignoring it.
        ``link`` rather than ``rename`` makes that check atomic when two associations race.
        """
        try:
            final = self.path_for(study_uid, series_uid, sop_uid)
            if final.exists():
                incoming.abandon()
                return Stored(final, final.stat().st_size, duplicate=True)
            if self.low_on_space():
                raise DiskFull(f"free space below {self.min_free_bytes // (1024 * 1024)} MB")
            if incoming.fd is not None:
                incoming.sync_and_close()
            self._ensure_dir(final.parent)
            try:
                os.link(incoming.path, final)
            except FileExistsError:
                incoming.abandon()
                return Stored(final, final.stat().st_size, duplicate=True)
        except BaseException:
            incoming.abandon()
            raise
        incoming.path.unlink(missing_ok=True)
        _fsync_dir(final.parent)
        return Stored(final, incoming.size, duplicate=False)

    def remove_temp_files(self) -> int:
        """Partial writes from a killed process were never acknowledged: delete them."""
        n = 0
        for tmp in [*self.incoming_dir.glob("*.tmp"), *self.root.glob("*/*/.*.tmp")]:
            tmp.unlink(missing_ok=True)
            n += 1
        return n

    def iter_instances(self) -> list[Path]:
        return sorted(self.root.glob("*/*/*.dcm"))

    def remove_study(self, study_uid: str) -> None:
        if valid_uid(study_uid):
            shutil.rmtree(self.root / study_uid, ignore_errors=True)
            self._known_dirs = {d for d in self._known_dirs if d.parent.name != study_uid}
