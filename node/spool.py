"""Durable instance storage: bytes as received, on disk and flushed before anyone says success.

Layout: ``spool/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``. UIDs name paths only after
``valid_uid`` accepted them, so a hostile UID can never climb out of the spool.

One flush per instance. The textbook durable write costs two (fdatasync the file, then fsync the
directory that gained its name), and on the virtual disks we run on each flush costs 1.5-2 ms, more
than everything else an instance needs. So an instance is written into a file from a pool whose
directory entries were made durable ahead of time (``spool/.incoming``, one directory fsync per
batch), and that file's single ``fdatasync`` is the moment it is safe: the answer goes out then. Its
final name is a hard link made at once (visible to everyone at once); a background thread makes
those links durable in batches and then drops the pool names. After a crash, recovery finds any pool
file whose link may have been lost and links it again.

A pool file holds a certificate in the DICOM preamble (PS3.10 7.1 leaves the preamble to the
implementation): magic, total size, and a CRC-32 of everything after the preamble, written before
the flush. Only a file whose certificate matches its content was flushed whole; anything else in
the pool was never acknowledged and is deleted.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import pydicom

from node.config import UID_RE

log = logging.getLogger(__name__)

PREAMBLE = b"\x00" * 128 + b"DICM"
CERT_MAGIC = b"AINODE-SPOOL-1\x00\x00"
CERT = struct.Struct("<16sQI")  # magic, file size, CRC-32 of bytes 128..end
POOL_TARGET = 64


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


def certified(path: Path) -> bool:
    """True when the file's preamble certificate matches its size and content: it was flushed whole."""
    try:
        with open(path, "rb") as f:
            head = f.read(CERT.size)
            if len(head) < CERT.size:
                return False
            magic, size, crc = CERT.unpack(head)
            if magic != CERT_MAGIC or size != os.fstat(f.fileno()).st_size or size < 132:
                return False
            f.seek(128)
            actual = 0
            while chunk := f.read(1 << 20):
                actual = zlib.crc32(chunk, actual)
            return actual == crc
    except OSError:
        return False


class IncomingFile:
    """An instance being received, streamed into a pool file fragment by fragment.

    ``durable_name`` says whether the file's directory entry was flushed before it was handed out
    (a pool file) or not (the pool ran dry): commit then flushes the directory itself.
    """

    def __init__(self, path: Path, head: bytes, durable_name: bool):
        self.path = path
        self.durable_name = durable_name
        flags = os.O_WRONLY if durable_name else os.O_WRONLY | os.O_CREAT | os.O_EXCL
        self.fd: int | None = os.open(path, flags, 0o640)
        self.size = 0
        self._crc = 0
        if not head.startswith(PREAMBLE):
            raise ValueError("head must start with the preamble and DICM")
        self.write(head)

    def write(self, data: bytes | memoryview) -> None:
        assert self.fd is not None
        view = memoryview(data)
        skip = max(0, 128 - self.size)  # the preamble holds the certificate, so the CRC starts after it
        if len(view) > skip:
            self._crc = zlib.crc32(view[skip:], self._crc)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.size += n

    def sync_and_close(self) -> None:
        """Certify, then the one flush; afterwards the content is safe under the pool name."""
        assert self.fd is not None
        fd, self.fd = self.fd, None
        try:
            os.pwrite(fd, CERT.pack(CERT_MAGIC, self.size, self._crc), 0)
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
        self._dirs_lock = threading.Lock()
        self._pool: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self._pool_low = threading.Event()
        self._settle: queue.SimpleQueue[tuple[Path, Path] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._last_refill_warning = -1e9
        # set by the storage lifecycle while the disk is above its high watermark and nothing may be deleted
        self.blocked: str | None = None

    # ------------------------------------------------------------------ background work
    def start(self) -> None:
        """Pool refill and link settling run in the background; without start() every commit does both
        flushes itself (tests and tools that only read the spool never start it)."""
        for name, target in (("ainode-spool-pool", self._refill), ("ainode-spool-settle", self._settler)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._pool_low.set()

    def stop(self) -> None:
        self._stopping = True
        self._pool_low.set()
        self._settle.put(None)
        for t in self._threads:
            t.join(10)
        self._threads.clear()

    def _refill(self) -> None:
        while not self._stopping:
            self._pool_low.wait()
            self._pool_low.clear()
            if self._stopping:
                return
            try:
                made = []
                while self._pool.qsize() + len(made) < POOL_TARGET:
                    path = self.incoming_dir / f"{uuid.uuid4().hex}.part"
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
                    made.append(path)
                if made:
                    _fsync_dir(self.incoming_dir)
                    for path in made:
                        self._pool.put(path)
            except OSError as exc:  # full disk: instances fall back to the two-flush path and report it
                if time.monotonic() - self._last_refill_warning > 60:
                    self._last_refill_warning = time.monotonic()
                    log.warning("spool pool cannot be refilled: %s", exc)

    def _settler(self) -> None:
        done = False
        while not done:
            batch = [self._settle.get()]
            while True:
                try:
                    batch.append(self._settle.get(timeout=0.005))
                except queue.Empty:
                    break
            done = None in batch
            items = [b for b in batch if b is not None]
            for directory in {d for d, _ in items}:
                try:
                    _fsync_dir(directory)
                except OSError:  # purged meanwhile
                    pass
            for _, pool_name in items:
                pool_name.unlink(missing_ok=True)

    def pooled(self) -> int:
        """Pool names ready to hand out: created *and* made durable (a name on disk is not yet one)."""
        return self._pool.qsize()

    # ------------------------------------------------------------------ the hot path
    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not valid_uid(uid):
                raise ValueError(f"invalid UID {uid!r}")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def low_on_space(self, incoming: int = 0) -> bool:
        return self.blocked is not None or self.free_bytes() - incoming < self.min_free_bytes

    def refusal(self) -> str:
        """Why ``low_on_space`` said yes, in words for the log."""
        return self.blocked or f"free space below {self.min_free_bytes // (1024 * 1024)} MB (node.min_free_disk_mb)"

    def incoming(self, head: bytes) -> IncomingFile:
        """A file for one instance as it arrives, starting with ``head`` (preamble and file meta)."""
        try:
            path = self._pool.get_nowait()
            durable = True
        except queue.Empty:
            path = self.incoming_dir / f"{uuid.uuid4().hex}.tmp"
            durable = False
        if self._threads and self._pool.qsize() < POOL_TARGET // 2:
            self._pool_low.set()
        return IncomingFile(path, head, durable)

    def _ensure_dir(self, directory: Path) -> None:
        with self._dirs_lock:
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
        with self._dirs_lock:
            self._known_dirs.add(directory)

    def commit(self, incoming: IncomingFile, study_uid: str, series_uid: str, sop_uid: str) -> Stored:
        """Flush, then give the file its final name. Raises DiskFull / ValueError / OSError and then
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
                raise DiskFull(self.refusal())
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
        if incoming.durable_name and self._threads:
            self._settle.put((final.parent, incoming.path))  # safe already: the pool name is durable
        else:
            incoming.path.unlink(missing_ok=True)
            _fsync_dir(final.parent)
        return Stored(final, incoming.size, duplicate=False)

    def replace(self, incoming: IncomingFile, study_uid: str, series_uid: str, sop_uid: str) -> Stored:
        """Swap the stored copy of an instance for ``incoming`` (``node.duplicates: replace``): flushed first,
        then renamed over the old name in one step, so a reader sees the old file or the new, never a mix
        (one that has the old file open keeps reading the old content)."""
        try:
            final = self.path_for(study_uid, series_uid, sop_uid)
            if self.low_on_space():
                raise DiskFull(f"free space below {self.min_free_bytes // (1024 * 1024)} MB")
            if incoming.fd is not None:
                incoming.sync_and_close()
            self._ensure_dir(final.parent)
            os.replace(incoming.path, final)
        except BaseException:
            incoming.abandon()
            raise
        _fsync_dir(final.parent)
        _fsync_dir(incoming.path.parent)
        return Stored(final, incoming.size, duplicate=False)

    # ------------------------------------------------------------------ recovery and housekeeping
    def recover_incoming(self) -> tuple[int, int]:
        """After any stop: link certified pool files whose final name may have been lost; delete the rest
        (partial writes and unused pool files were never acknowledged). Returns (linked, removed)."""
        linked = removed = 0
        for path in sorted(self.incoming_dir.iterdir()):
            if path.is_file() and certified(path):
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True)
                    final = self.path_for(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                          str(ds.SOPInstanceUID))
                    if not final.exists():
                        self._ensure_dir(final.parent)
                        os.link(path, final)
                        _fsync_dir(final.parent)
                        linked += 1
                except Exception as exc:
                    log.error("certified spool file %s cannot be placed (%s); kept for inspection", path.name, exc)
                    continue
            elif path.is_file() and path.stat().st_size > 0:
                removed += 1
            path.unlink(missing_ok=True)
        for tmp in self.root.glob("*/*/.*.tmp"):  # partial writes of earlier versions
            tmp.unlink(missing_ok=True)
            removed += 1
        return linked, removed

    def iter_instances(self) -> list[Path]:
        return sorted(self.root.glob("*/*/*.dcm"))

    def remove_study(self, study_uid: str) -> None:
        if valid_uid(study_uid):
            shutil.rmtree(self.root / study_uid, ignore_errors=True)
            with self._dirs_lock:
                self._known_dirs = {d for d in self._known_dirs if d.parent.name != study_uid}
