"""Durable instance storage: bytes as received, on disk and fsynced before anyone says success.

Layout: ``spool/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``. UIDs name paths only after
``valid_uid`` accepted them, so a hostile UID can never climb out of the spool.
"""

from __future__ import annotations

import logging
import os
import shutil
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


class Spool:
    def __init__(self, storage_dir: str | Path, min_free_mb: int = 1024):
        self.root = Path(storage_dir) / "spool"
        self.root.mkdir(parents=True, exist_ok=True)
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

    def store(self, study_uid: str, series_uid: str, sop_uid: str, chunks: list[bytes]) -> Stored:
        """Write, fsync, rename, fsync the directory. Raises DiskFull / ValueError / OSError.

        A file already present for this SOP Instance UID is kept (first copy wins): a re-send is a
        duplicate, and overwriting a file a worker may be reading would be worse than ignoring it.
        """
        final = self.path_for(study_uid, series_uid, sop_uid)
        size = sum(len(c) for c in chunks)
        if final.exists():
            return Stored(final, final.stat().st_size, duplicate=True)
        if self.free_bytes() - size < self.min_free_bytes:
            raise DiskFull(f"free space below {self.min_free_bytes // (1024 * 1024)} MB")
        self._ensure_dir(final.parent)
        tmp = final.with_name(f".{sop_uid}.{os.getpid()}.{id(chunks)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            try:
                os.writev(fd, chunks)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        return Stored(final, size, duplicate=False)

    def remove_temp_files(self) -> int:
        """Partial writes from a killed process were never acknowledged: delete them."""
        n = 0
        for tmp in self.root.glob("*/*/.*.tmp"):
            tmp.unlink(missing_ok=True)
            n += 1
        return n

    def iter_instances(self) -> list[Path]:
        return sorted(self.root.glob("*/*/*.dcm"))

    def remove_study(self, study_uid: str) -> None:
        if valid_uid(study_uid):
            shutil.rmtree(self.root / study_uid, ignore_errors=True)
            self._known_dirs = {d for d in self._known_dirs if d.parent.name != study_uid}
