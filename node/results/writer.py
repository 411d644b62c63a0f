"""Write result objects to the outbox all or nothing, validating each one as soon as it exists.

Why validate while encoding: the worker makes the objects one after another (the SRs, then the
Secondary Capture, then the KOS). The validators are subprocesses, so an SR's validators run while the
worker composes the SC, instead of every validator waiting for the last object; on a two-core worker
that is a good part of a chest X-ray's one-second budget.

Why validate the staged file itself: each object is encoded once, written under a temporary name
(``.tmp-*``, which nothing delivers) in its outbox folder, validated there and renamed into place only
when every object of the result passed. What was validated is byte for byte what the PACS receives,
and no byte is written twice.
"""

from __future__ import annotations

import logging
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pydicom.dataset import Dataset

from .validate import (
    MAX_WORKERS,
    SR_MODALITIES,
    ValidationFailed,
    checks_for,
    encode_part10,
    pixelmed_passed,
    problems_of,
)

log = logging.getLogger(__name__)


@dataclass
class _Staged:
    ds: Dataset
    tmp: Path
    checks: list[Future[list[str]]]
    synced: Future[None]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe(ds: Dataset) -> str:
    return f"{ds.get('Modality', '?')} {ds.get('SOPInstanceUID', '?')} ({ds.get('SeriesDescription', '')})"


class ValidatedWriter:
    """``add`` each object as it is made, then ``commit``: all objects land in ``directory`` or none does.

    Use as a context manager: leaving the block without a commit (an exception while encoding) removes
    whatever was staged. An object must not change after ``add``: its bytes are taken there.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._pool = ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="validate")
        self._staged: list[_Staged] = []
        self._done = False

    def __enter__(self) -> ValidatedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._done:
            self.abort()

    def add(self, ds: Dataset) -> None:
        """Encode ``ds``, stage it in the outbox folder and start its validators and its fsync."""
        blob = encode_part10(ds)
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=self.directory)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        is_sr = str(ds.get("Modality", "")) in SR_MODALITIES
        checks = [self._pool.submit(check, tmp) for check in checks_for(is_sr, is_sr and not pixelmed_passed(ds))]
        self._staged.append(_Staged(ds, tmp, checks, self._pool.submit(_fsync, tmp)))

    def commit(self) -> list[Path]:
        """Wait for every validator; rename all staged files into place, or raise ValidationFailed."""
        try:
            reports = [(s.ds, problems_of(s.checks)) for s in self._staged]
            failed = [(ds, probs) for ds, probs in reports if probs]
            if failed:
                lines = [f"{describe(ds)}: {p}" for ds, probs in failed for p in probs]
                raise ValidationFailed("result objects failed validation:\n" + "\n".join(lines), lines)
            written = []
            for s in self._staged:
                s.synced.result()  # data durable before the name is
                final = self.directory / f"{s.ds.SOPInstanceUID}.dcm"
                os.replace(s.tmp, final)
                written.append(final)
            if written:
                _fsync(self.directory)  # make the renames durable too
            self._done = True
            self._pool.shutdown()
        except BaseException:
            self.abort()
            raise
        log.info("wrote %d validated result objects to %s", len(written), self.directory)
        return written

    def abort(self) -> None:
        """Stop and remove everything staged (validators are waited for: they may still read the files)."""
        self._done = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        for s in self._staged:
            s.tmp.unlink(missing_ok=True)
        self._staged = []


def write_validated(datasets: list[Dataset], directory: Path) -> list[Path]:
    """Validate every dataset, then write all as <SOPInstanceUID>.dcm (tmp + fsync + rename).

    All or nothing: a result is delivered as a set (the KOS points at the SR and SC), so if any object
    fails, nothing is written and ValidationFailed carries the validators' lines.
    """
    with ValidatedWriter(directory) as writer:
        for ds in datasets:
            writer.add(ds)
        return writer.commit()
