"""Run the external validators (dciodvfy, dsrdump, PixelMed DicomSRValidator) and write only what passes.

They run as parallel subprocesses: PixelMed's JVM start dominates (several seconds), so the three
validators of one object, and the objects of one result, overlap instead of queueing.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

SR_MODALITIES = {"SR", "KO"}
TIMEOUT_S = 120
JAVA_OPTS = "-Djdk.xml.xpathExprOpLimit=0 -Djdk.xml.xpathExprGrpLimit=0 -Djdk.xml.xpathTotalOpLimit=0"
PIXELMED_JAR = "/usr/share/java/pixelmed.jar"
DSRDUMP = "/usr/bin/dsrdump"  # full path: pynetdicom's console scripts do not shadow this one, but be explicit


class ValidationFailed(Exception):
    """An object failed validation; ``problems`` holds the validators' own lines."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []


def _run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, errors="replace")


def _dciodvfy(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        return ["dciodvfy: not installed (Debian package dicom3tools)"]
    p = _run([exe, str(path)])
    return [f"dciodvfy: {line.strip()}" for line in (p.stdout + p.stderr).splitlines()
            if line.startswith("Error")]


def _dsrdump(path: Path) -> list[str]:
    exe = DSRDUMP if Path(DSRDUMP).exists() else shutil.which("dsrdump")
    if exe is None:
        return ["dsrdump: not installed (Debian package dcmtk)"]
    p = _run([exe, str(path)])
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return [f"dsrdump: exit {p.returncode}: " + " | ".join(tail)]
    bad = [line for line in p.stderr.splitlines() if line.startswith(("E:", "F:"))]
    return [f"dsrdump: {line}" for line in bad]


def _pixelmed(path: Path) -> list[str]:
    java = shutil.which("java")
    if java is None or not Path(PIXELMED_JAR).exists():
        return ["DicomSRValidator: not installed (Debian package pixelmed-apps)"]
    env = dict(os.environ)
    env["JAVA_TOOL_OPTIONS"] = (env.get("JAVA_TOOL_OPTIONS", "") + " " + JAVA_OPTS).strip()
    # Only pixelmed.jar on the class path: the Debian wrapper's '/usr/share/java/*' costs seconds per start.
    p = _run([java, "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-cp", PIXELMED_JAR,
              "com.pixelmed.validate.DicomSRValidator", str(path)], env=env)
    out = p.stdout + p.stderr
    problems = [f"DicomSRValidator: {line.strip()}" for line in out.splitlines() if line.startswith("Error:")]
    if p.returncode != 0 and not problems:
        problems.append(f"DicomSRValidator: exit {p.returncode}: {out.strip().splitlines()[-1:] }")
    return problems


def _is_sr(ds: Dataset) -> bool:
    return str(ds.get("Modality", "")) in SR_MODALITIES


def validate(obj: Path | Dataset) -> list[str]:
    """Problems the validators report; an empty list means valid.

    A missing validator counts as a problem: the node promises PACS objects that passed all three.
    """
    return validate_many([obj])[0]


def validate_many(objs: list[Path | Dataset]) -> list[list[str]]:
    """Validate several objects at once, all validator processes sharing one pool."""
    with tempfile.TemporaryDirectory(prefix="ainode-validate-") as tmp:
        jobs: list[tuple[Path, bool]] = []
        for i, obj in enumerate(objs):
            if isinstance(obj, Dataset):
                path = Path(tmp) / f"{i}.dcm"
                obj.save_as(path, enforce_file_format=True)
                jobs.append((path, _is_sr(obj)))
            else:
                path = Path(obj)
                jobs.append((path, _is_sr(pydicom.dcmread(path, stop_before_pixels=True))))
        workers = max(2, min(8, sum(3 if sr else 1 for _, sr in jobs)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # PixelMed first: its JVM start is the long pole, the others finish while it warms up.
            futures = [[pool.submit(c, p) for c in (([_pixelmed, _dsrdump] if sr else []) + [_dciodvfy])]
                       for p, sr in jobs]
            results: list[list[str]] = []
            for fs in futures:
                problems: list[str] = []
                for f in fs:
                    try:
                        problems.extend(f.result())
                    except subprocess.TimeoutExpired as exc:
                        problems.append(f"validator timed out: {exc.cmd[0]}")
                results.append(problems)
    return results


def _describe(ds: Dataset) -> str:
    return f"{ds.get('Modality', '?')} {ds.get('SOPInstanceUID', '?')} ({ds.get('SeriesDescription', '')})"


def write_validated(datasets: list[Dataset], directory: Path) -> list[Path]:
    """Validate every dataset, then write all as <SOPInstanceUID>.dcm (tmp + fsync + rename).

    All or nothing: a result is delivered as a set (the KOS points at the SR and SC), so if any object
    fails, nothing is written and ValidationFailed carries the validators' lines.
    """
    directory = Path(directory)
    reports = validate_many(list(datasets))
    failed = [(ds, probs) for ds, probs in zip(datasets, reports) if probs]
    if failed:
        lines = [f"{_describe(ds)}: {p}" for ds, probs in failed for p in probs]
        raise ValidationFailed("result objects failed validation:\n" + "\n".join(lines), lines)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for ds in datasets:
        final = directory / f"{ds.SOPInstanceUID}.dcm"
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                ds.save_as(fh, enforce_file_format=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        written.append(final)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)  # make the renames durable too
    finally:
        os.close(dfd)
    log.info("wrote %d validated result objects to %s", len(written), directory)
    return written
