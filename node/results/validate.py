"""Run the external validators (dciodvfy, dsrdump, PixelMed DicomSRValidator); ``writer`` writes what passes.

They run as parallel subprocesses: PixelMed's JVM start dominates (several seconds), so the three
validators of one object, and the objects of one result, overlap instead of queueing.

PixelMed checks template conformance: which content items exist, their value types, relationships,
concept names, coded values and units. It does not depend on numbers, text, dates or UIDs, which is
all that differs between two results of the same pipeline with the same findings. So a content tree
whose *shape* (``template_shape``) PixelMed already passed is not sent again, and repeated identical
sibling subtrees are checked through two representatives (``prune_repeats``); dciodvfy and dsrdump
still check every object in full. That takes PixelMed's seconds off every result but the first of its
kind, which is what keeps a chest X-ray within its one-second budget.

Whole-document shapes are not enough: a chest X-ray has a group per label, so every new combination of
present findings is a new document shape, and 18 groups cost PixelMed 10-14 s. Template rules apply
per content item in its context, so knowledge is also kept per measurement group (``_split``): a group
whose shape passed inside a document with the same *frame* (everything but the groups: top level, root
concept, templates, observer context, image library, notes, and the groups' mode, below) is dropped
before the document goes to PixelMed; a document whose frame and groups all passed is not sent at all.
One thing in PixelMed's rules for a group depends on its siblings, and it is part of the frame: its
TID 1500 (2022) picks which group templates (1410, 1411, 1501) to apply to *all* groups from counts
across groups (exactly one SCOORD Image Region makes it apply TID 1410 to every group; IMAGE regions,
segments and 3D regions select TID 1411; none of these, TID 1501). ``_mode`` computes that choice, and
the pruned document keeps known groups until its choice is the full document's. The group templates it
calls (1410, 1411, 1501, 1419, 1502, 300, 4019 and below) look only at a group's own subtree, and the
group rows are 1-n, so one group is enough to keep. Only a document that passed records its frame and
every one of its group shapes; a failed or never-validated group is never known.

What passed is kept in memory and on disk (``_PassedCache``): one empty file per key, in a folder named
after the validator (the PixelMed jar, our server class and this module: a change of any of them starts
afresh), so every worker process of a node and every restart share it.
"""
from __future__ import annotations

import atexit
import hashlib
import io
import logging
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

SR_MODALITIES = {"SR", "KO"}
TIMEOUT_S = 120
#: Validator threads per pool: each mostly waits on a subprocess (or on the PixelMed server).
MAX_WORKERS = 8
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


def _java_env() -> dict[str, str]:
    env = dict(os.environ)
    env["JAVA_TOOL_OPTIONS"] = (env.get("JAVA_TOOL_OPTIONS", "") + " " + JAVA_OPTS).strip()
    return env


# C1 only: the C2 compiler spends more time on PixelMed's huge generated translet than it saves (measured
# 8 s vs 16 s CPU per SR). Only pixelmed.jar on the class path: the Debian wrapper's '/usr/share/java/*'
# adds seconds of class-path scanning per start.
JAVA_FLAGS = ["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xss8m"]
SERVER_SOURCE = Path(__file__).parent / "java" / "SRValidatorServer.java"
SERVER_END = "@@AINODE-END@@"
SERVER_READY = "@@AINODE-READY@@"


def _server_classes() -> Path | None:
    """Where SRValidatorServer.class is: compiled once per source/jar version when a JDK is present,
    else the copy shipped next to the source (built with ``javac --release 11``), else None."""
    javac = shutil.which("javac")
    shipped = SERVER_SOURCE.parent if (SERVER_SOURCE.parent / "SRValidatorServer.class").exists() else None
    if javac is None or not SERVER_SOURCE.exists():
        return shipped
    digest = hashlib.sha256(SERVER_SOURCE.read_bytes() + str(Path(PIXELMED_JAR).stat().st_mtime).encode())
    cache = Path(os.environ.get("AINODE_CACHE_DIR", Path.home() / ".cache" / "ainode"))
    target = cache / f"pixelmed-server-{digest.hexdigest()[:12]}"
    if (target / "SRValidatorServer.class").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".javac-", dir=cache))
    p = _run([javac, "-cp", PIXELMED_JAR, "-d", str(tmp), str(SERVER_SOURCE)])
    if p.returncode != 0:
        log.warning("could not compile the PixelMed validator server (%s); using the command-line tool",
                    p.stderr.strip()[-300:])
        shutil.rmtree(tmp, ignore_errors=True)
        return shipped
    try:
        os.replace(tmp, target)
    except OSError:  # another worker won the race; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class PixelMedServer:
    """One JVM running DicomSRValidator for the life of the process, fed one file path per line.

    Its first validation costs what the command-line tool costs; later ones are several times cheaper
    because the JVM, the stylesheet and the JIT stay warm. Requests are serialised by a lock.
    """

    def __init__(self, classes: Path):
        self.classes = classes
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()

    def _start(self) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [shutil.which("java") or "java", *JAVA_FLAGS, "-cp", f"{PIXELMED_JAR}:{self.classes}",
             "SRValidatorServer"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, encoding="utf-8", errors="replace", env=_java_env(), bufsize=1)
        self.lines = queue.Queue()
        # A thread owns stdout: select() on a buffered pipe misses lines already in Python's buffer.
        threading.Thread(target=self._pump, args=(proc, self.lines), daemon=True).start()
        self._read_until(SERVER_READY, time.monotonic() + TIMEOUT_S)
        return proc

    @staticmethod
    def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)  # EOF: the server died

    def _read_until(self, sentinel: str, deadline: float) -> list[str]:
        out: list[str] = []
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise subprocess.TimeoutExpired("SRValidatorServer", TIMEOUT_S) from None
            if line is None:
                raise RuntimeError("PixelMed validator server exited")
            if line == sentinel:
                return out
            out.append(line)

    def validate(self, path: Path) -> str:
        with self.lock:
            for attempt in (1, 2):  # a dead server (OOM, killed) is restarted once
                try:
                    if self.proc is None or self.proc.poll() is not None:
                        self.proc = self._start()
                    assert self.proc.stdin is not None
                    self.proc.stdin.write(f"{path}\n")
                    self.proc.stdin.flush()
                    return "\n".join(self._read_until(SERVER_END, time.monotonic() + TIMEOUT_S))
                except (OSError, RuntimeError, subprocess.TimeoutExpired):
                    self.close()
                    if attempt == 2:
                        raise
                    log.warning("PixelMed validator server failed; restarting it")
            raise AssertionError("unreachable")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


_server: PixelMedServer | None = None
_server_lock = threading.Lock()


def _pixelmed_server() -> PixelMedServer | None:
    global _server
    if os.environ.get("AINODE_PIXELMED_SERVER", "1") == "0":
        return None
    with _server_lock:
        if _server is not None and _server.pid != os.getpid():  # forked (Celery prefork): never share pipes
            _server = None
        if _server is None:
            classes = _server_classes()
            if classes is None:
                return None
            _server = PixelMedServer(classes)
            atexit.register(_server.close)
        return _server


_TREE_KEYS = ("RelationshipType", "ValueType", "TemporalRangeType", "GraphicType", "ContinuityOfContent")
_CODE_SEQS = ("ConceptNameCodeSequence", "ConceptCodeSequence", "MeasurementUnitsCodeSequence",
              "ContentTemplateSequence")
_TOP_KEYS = ("SOPClassUID", "CompletionFlag", "VerificationFlag", "PreliminaryFlag", "ContinuityOfContent")
IMAGING_MEASUREMENTS = ("126010", "DCM")
MEASUREMENT_GROUP = ("125007", "DCM")
# What PixelMed's TID 1500 counts across all groups to choose their templates: (value type, concept,
# relationship or None for any). Copied from its DicomSRDescriptionsCompiled.xsl (pixelmed 20220618).
_MODE_ITEMS = (("SCOORD", "111030", "CONTAINS"), ("IMAGE", "111030", "CONTAINS"), ("IMAGE", "121214", None),
               ("IMAGE", "121191", None), ("SCOORD3D", "121233", None))

#: Called with the path of each file actually handed to PixelMed (the pruned copy when pruned): for tests
#: and benchmarks that want to see what was checked.
on_pixelmed: Callable[[Path], None] | None = None


class _PassedCache:
    """Keys (sha256 hex) of shapes PixelMed passed: in memory, and as empty files in one folder on disk.

    An empty file is created in one step, so a reader sees a key or does not, and no lock is needed;
    two workers recording the same key create the same empty file. If the folder cannot be made or
    written, the cache says so once and goes on in memory.
    """

    def __init__(self) -> None:
        self.memory: set[str] = set()
        self.lock = threading.Lock()
        self._folder: Path | None = None
        self._resolved = False

    def folder(self) -> Path | None:
        with self.lock:
            if not self._resolved:
                self._resolved = True
                self._folder = self._open()
            return self._folder

    @staticmethod
    def _open() -> Path | None:
        setting = os.environ.get("AINODE_PIXELMED_CACHE")
        if setting is not None and setting.strip().lower() in ("", "0", "off"):
            return None
        if setting:
            folder = Path(setting)
        else:
            try:
                digest = hashlib.sha256(Path(PIXELMED_JAR).read_bytes())
                for part in (SERVER_SOURCE, Path(__file__)):
                    digest.update(part.read_bytes() if part.exists() else b"")
            except OSError:
                return None  # no PixelMed: nothing will pass to remember
            cache = Path(os.environ.get("AINODE_CACHE_DIR", Path.home() / ".cache" / "ainode"))
            folder = cache / f"pixelmed-passed-{digest.hexdigest()[:16]}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            os.listdir(folder)
        except OSError as exc:
            log.warning("PixelMed results cannot be shared on disk (%s); each worker keeps its own", exc)
            return None
        return folder

    def known(self, key: str) -> bool:
        if key in self.memory:
            return True
        folder = self.folder()
        if folder is not None and (folder / key).exists():
            self.memory.add(key)
            return True
        return False

    def record(self, keys: set[str]) -> None:
        keys = keys - self.memory
        if not keys:
            return
        self.memory.update(keys)
        folder = self.folder()
        if folder is None:
            return
        try:
            for key in keys:
                os.close(os.open(folder / key, os.O_WRONLY | os.O_CREAT, 0o644))
        except OSError as exc:
            log.warning("PixelMed results cannot be shared on disk (%s); each worker keeps its own", exc)
            with self.lock:
                self._folder = None


_passed = _PassedCache()
_passed_shapes = _passed.memory  # the in-memory view, for tests and callers that only look


def _code(item: Dataset, seq: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    codes = item.get(seq) or [Dataset()]
    return str(codes[0].get("CodeValue", "")), str(codes[0].get("CodingSchemeDesignator", ""))


def _item_line(item: Dataset, depth: int) -> str:
    parts = [str(depth)] + [str(item.get(k, "")) for k in _TREE_KEYS]
    for seq in _CODE_SEQS:
        for code in item.get(seq, []):
            parts.append(f"{seq}={code.get('CodeValue', '')}^{code.get('CodingSchemeDesignator', '')}"
                         f"^{code.get('TemplateIdentifier', '')}")
    for mv in item.get("MeasuredValueSequence", []):
        for code in mv.get("MeasurementUnitsCodeSequence", []):
            parts.append(f"unit={code.get('CodeValue', '')}^{code.get('CodingSchemeDesignator', '')}")
    parts.append(f"refs={len(item.get('ReferencedSOPSequence', []))}")
    return "|".join(parts)


def _item_shape(item: Dataset, out: list[str], depth: int) -> None:
    out.append(_item_line(item, depth))
    for child in item.get("ContentSequence", []):
        _item_shape(child, out, depth + 1)


def _top_lines(ds: Dataset) -> list[str]:
    out = ["|".join(str(ds.get(k, "")) for k in _TOP_KEYS)]
    for seq in ("ConceptNameCodeSequence", "ContentTemplateSequence"):
        for code in ds.get(seq, []):
            out.append(f"{seq}={code.get('CodeValue', '')}^{code.get('TemplateIdentifier', '')}")
    out.append(f"predecessors={'PredecessorDocumentsSequence' in ds}")
    return out


def template_shape(ds: Dataset) -> str:
    """A hash of everything template validation looks at, and of nothing else."""
    out = _top_lines(ds)
    for item in ds.get("ContentSequence", []):
        _item_shape(item, out, 1)
    return hashlib.sha256("\n".join(out).encode()).hexdigest()


def _subtree_key(item: Dataset) -> str:
    out: list[str] = []
    _item_shape(item, out, 0)
    return "\n".join(out)


def _is_group(item: Dataset) -> bool:
    return item.get("ValueType") == "CONTAINER" and _code(item) == MEASUREMENT_GROUP


def _group_counts(group: Dataset) -> tuple[int, ...]:
    """How many of each ``_MODE_ITEMS`` kind the group holds (its direct children, as PixelMed's XPath)."""
    counts = [0] * len(_MODE_ITEMS)
    for child in group.get("ContentSequence", []):
        vt, (cv, csd), rel = child.get("ValueType"), _code(child), child.get("RelationshipType")
        for i, (want_vt, want_cv, want_rel) in enumerate(_MODE_ITEMS):
            if vt == want_vt and cv == want_cv and csd == "DCM" and want_rel in (None, rel):
                counts[i] += 1
    return tuple(counts)


def _mode(counts: list[tuple[int, ...]]) -> tuple[bool, bool, bool]:
    """Which group templates PixelMed's TID 1500 applies to every group: (TID 1410, TID 1411, TID 1501)."""
    scoord, image, segment, volume, region3d = (sum(c[i] for c in counts) for i in range(len(_MODE_ITEMS)))
    return (scoord == 1 or segment > 0, image > 1 or volume > 0 or region3d > 0,
            image == segment == volume == region3d == 0 and len(counts) > 0)


class _Split:
    """A document as its frame and its measurement groups, each with the key PixelMed's verdict is kept under."""

    def __init__(self, ds: Dataset, parent: Dataset, groups: list[Dataset]):
        self.parent, self.groups = parent, groups
        self.counts = [_group_counts(g) for g in groups]
        self.mode = _mode(self.counts)
        full, frame = _top_lines(ds), _top_lines(ds)
        group_lines: list[str] = []
        for item in ds.get("ContentSequence", []):
            if item is not parent:
                _item_shape(item, full, 1)
                _item_shape(item, frame, 1)
                continue
            full.append(_item_line(item, 1))
            frame.append(_item_line(item, 1))
            in_run = False
            for child in item.get("ContentSequence", []):
                lines: list[str] = []
                _item_shape(child, lines, 2)
                full.extend(lines)
                if _is_group(child):
                    group_lines.append("\n".join(lines))
                    if not in_run:
                        frame.append("<measurement groups>")
                    in_run = True
                else:
                    frame.extend(lines)
                    in_run = False
        frame.append(f"group templates={self.mode}")
        self.shape = hashlib.sha256("\n".join(full).encode()).hexdigest()  # == template_shape(ds)
        self.frame = hashlib.sha256(("frame\n" + "\n".join(frame)).encode()).hexdigest()
        self.keys = [hashlib.sha256(f"{self.frame}\n{lines}".encode()).hexdigest() for lines in group_lines]

    @staticmethod
    def of(ds: Dataset) -> _Split | None:
        """The split of a TID 1500-like document (one Imaging Measurements container with groups), else None."""
        parents = [it for it in ds.get("ContentSequence", [])
                   if it.get("ValueType") == "CONTAINER" and _code(it) == IMAGING_MEASUREMENTS]
        if len(parents) != 1:
            return None
        groups = [c for c in parents[0].get("ContentSequence", []) if _is_group(c)]
        return _Split(ds, parents[0], groups) if groups else None

    def all_known(self) -> bool:
        return _passed.known(self.frame) and all(_passed.known(k) for k in self.keys)

    def prune(self) -> int:
        """Drop the groups already known in this frame, keeping PixelMed's template choice; returns how many."""
        keep = [not _passed.known(k) for k in self.keys]
        if not any(keep):
            keep[0] = True  # (the frame itself is not known: it needs one group to be checked with)
        if _mode([c for c, k in zip(self.counts, keep) if k]) != self.mode:
            # Add known groups until every count PixelMed compares is what the full document has (each
            # capped at 2: it tests = 0, = 1, > 0, > 1), which makes its choice the same.
            def capped(ks: list[bool]) -> list[int]:
                return [min(2, sum(c[i] for c, k in zip(self.counts, ks) if k)) for i in range(len(_MODE_ITEMS))]

            target = capped([True] * len(keep))
            for i in range(len(keep)):
                now = capped(keep)
                if now == target:
                    break
                if not keep[i] and any(min(2, n + c) > n for n, c, t in zip(now, self.counts[i], target) if n < t):
                    keep[i] = True
        dropped = keep.count(False)
        if dropped:
            kept = {id(g) for g, k in zip(self.groups, keep) if k}
            self.parent.ContentSequence = [c for c in self.parent.ContentSequence if not _is_group(c) or id(c) in kept]
        return dropped


def prune_repeats(ds: Dataset, keep: int = 2) -> int:
    """Keep at most ``keep`` siblings of each identical subtree shape; returns how many were dropped.

    A CT quality report repeats one measurement-group shape dozens of times, and PixelMed's XSLT time
    grows steeply with tree size (94 s for one such report here). Template rules apply per item, so
    one representative of each distinct shape checks them all; two are kept so that "at most one"
    cardinality rules still see a repeat. A malformed group has a shape of its own and is always kept.
    (It keeps PixelMed's group-template choice too: counts of 0, 1 and more than 1 stay so.)
    """
    dropped = 0
    items = ds.get("ContentSequence")
    if not items:
        return 0
    seen: dict[str, int] = {}
    kept = []
    for item in items:
        key = _subtree_key(item)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= keep:
            kept.append(item)
            dropped += prune_repeats(item, keep)
        else:
            dropped += 1
    if dropped:
        ds.ContentSequence = kept
    return dropped


def _pixelmed(path: Path) -> list[str]:
    """PixelMed's verdict on ``path``, from what already passed where that suffices, else on a pruned copy.

    On success the full document's shape, its frame and all its group keys are recorded: every group
    that was dropped before sending is either known in this frame or a repeat of one that was sent.
    """
    try:
        ds = pydicom.dcmread(path)
        split = _Split.of(ds)
        full_shape = split.shape if split is not None else template_shape(ds)
    except Exception:  # unreadable: let the validator say why
        ds, split, full_shape = None, None, ""
    if full_shape and _passed.known(full_shape):
        return []  # (pruning is a function of the shape: this tree prunes to one that passed)
    if split is not None and split.all_known():
        _passed.record({full_shape})
        return []
    try:
        dropped = split.prune() if split is not None else 0
        dropped += prune_repeats(ds) if ds is not None else 0
        if dropped and split is not None and (_Split.of(ds) or split).mode != split.mode:
            raise AssertionError("pruning changed PixelMed's group templates")
        shape = template_shape(ds) if dropped else full_shape
    except Exception:
        log.exception("could not prune %s for PixelMed; it gets the whole document", path)
        dropped, shape = 0, ""
    learned = {full_shape, shape} | ({split.frame, *split.keys} if split is not None else set())
    if shape and _passed.known(shape):
        _passed.record(learned - {""})
        return []
    if ds is not None and dropped:
        with tempfile.TemporaryDirectory(prefix="ainode-pixelmed-") as tmp:
            pruned = Path(tmp) / "pruned.dcm"
            ds.save_as(pruned, enforce_file_format=True)
            problems = _pixelmed_run(pruned)
    else:
        problems = _pixelmed_run(path)
    if not problems and full_shape:
        _passed.record(learned - {""})
    return problems


def _pixelmed_run(path: Path) -> list[str]:
    java = shutil.which("java")
    if java is None or not Path(PIXELMED_JAR).exists():
        return ["DicomSRValidator: not installed (Debian package pixelmed-apps)"]
    if on_pixelmed is not None:
        on_pixelmed(path)
    server = _pixelmed_server()
    if server is not None:
        try:
            out = server.validate(path)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            return [f"DicomSRValidator: server failed: {exc}"]
        return [f"DicomSRValidator: {line.strip()}" for line in out.splitlines() if line.startswith("Error:")]
    p = _run([java, *JAVA_FLAGS, "-cp", PIXELMED_JAR, "com.pixelmed.validate.DicomSRValidator", str(path)],
             env=_java_env())
    out = p.stdout + p.stderr
    problems = [f"DicomSRValidator: {line.strip()}" for line in out.splitlines() if line.startswith("Error:")]
    if p.returncode != 0 and not problems:
        problems.append(f"DicomSRValidator: exit {p.returncode}: {out.strip().splitlines()[-1:]}")
    return problems


def _is_sr(ds: Dataset) -> bool:
    return str(ds.get("Modality", "")) in SR_MODALITIES


def validate(obj: Path | Dataset | bytes) -> list[str]:
    """Problems the validators report; an empty list means valid.

    A missing validator counts as a problem: the node promises PACS objects that passed all three.
    """
    return validate_many([obj])[0]


def encode_part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def checks_for(is_sr: bool, pixelmed: bool = True) -> list[Callable[[Path], list[str]]]:
    """The validators one object needs; PixelMed first, its JVM being the long pole when it has to run."""
    return ([_pixelmed] if is_sr and pixelmed else []) + ([_dsrdump] if is_sr else []) + [_dciodvfy]


def pixelmed_passed(ds: Dataset) -> bool:
    """Whether PixelMed already passed this object's content-tree shape, or its frame and every one of its
    measurement groups (in this process, or in any worker of this node: see ``_PassedCache``).

    Computed on the dataset itself, before it is written: its Part 10 encoding has the same shape,
    and parsing a chest X-ray's 46 kB SR back costs six times as much, on the worker's critical path.
    """
    split = _Split.of(ds)
    if split is None:
        return _passed.known(template_shape(ds))
    if _passed.known(split.shape):
        return True
    if split.all_known():
        _passed.record({split.shape})
        return True
    return False


def problems_of(futures: list[Future[list[str]]]) -> list[str]:
    """One object's problems from its validators' futures; a validator that timed out is a problem too."""
    problems: list[str] = []
    for f in futures:
        try:
            problems.extend(f.result())
        except subprocess.TimeoutExpired as exc:
            problems.append(f"validator timed out: {exc.cmd}")
    return problems


def validate_many(objs: list[Path | Dataset | bytes]) -> list[list[str]]:
    """Validate several objects at once (datasets, files or Part 10 bytes), sharing one process pool."""
    with tempfile.TemporaryDirectory(prefix="ainode-validate-") as tmp:
        jobs: list[tuple[Path, bool]] = []
        for i, obj in enumerate(objs):
            if isinstance(obj, (Dataset, bytes)):
                data = obj if isinstance(obj, bytes) else encode_part10(obj)
                path = Path(tmp) / f"{i}.dcm"
                path.write_bytes(data)
            else:
                path = Path(obj)
            header = obj if isinstance(obj, Dataset) else pydicom.dcmread(path, stop_before_pixels=True)
            jobs.append((path, _is_sr(header)))
        workers = max(2, min(MAX_WORKERS, sum(len(checks_for(sr)) for _, sr in jobs)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [[pool.submit(c, p) for c in checks_for(sr)] for p, sr in jobs]
            return [problems_of(fs) for fs in futures]
