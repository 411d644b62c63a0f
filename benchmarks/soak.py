"""Soak: does the node stay flat when studies never stop coming? Disk, memory, state, latency over time.

    python benchmarks/soak.py --minutes 20 --interval 10 --fs-mb 256 --out soak-out   # the full run
    python benchmarks/soak.py --minutes 2 --interval 4 --out /tmp/soak                # what tests/test_soak.py runs

It mounts a tmpfs, so it runs as root or with password-less sudo.

A real ``ainode run`` whose ``storage_dir`` is a small tmpfs mounted for the run (``--fs-mb``, so the disk
really is full when the node thinks it is), DCMTK storescp as the PACS (one file per reception, so a
duplicate shows), and ``--senders`` threads each sending a fresh study on its own association with
/usr/bin/storescu, then pausing ``--pause`` seconds: a mix of CT series and CR radiographs, through the
model-free ``echo`` pipeline (3 result objects per study), with ``retention`` seconds of retention.

Every ``--interval`` seconds it records disk used, listener / worker / Redis RSS, state database and WAL
size, the listener's open file descriptors and the studies the node holds; instances/s and end-to-end
latency (storescu's exit to the last result object's arrival at the PACS) are binned per interval
afterwards. Writes ``soak.csv``, ``studies.csv`` and ``soak.png`` to ``--out`` and checks the steady
state (after ``--warmup`` of the run): disk under the high watermark, RSS and database size flat, no
0xA700, every study's results delivered exactly once. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.dcmtk import StoreSCP  # noqa: E402
from support.dicomgen import copy_with_new_uids, ct_series, sample_file  # noqa: E402
from support.node import NodeProcess, base_config, free_port, wait_for  # noqa: E402
from support.tmpfs import tmpfs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_report import RESULTS_PER_STUDY, add_rates, checks, pct, study_rows, write_outputs  # noqa: E402

ENV = dict(os.environ, TCP_NODELAY="1")


@dataclass
class Options:
    minutes: float = 2.0
    senders: int = 2
    pause: float = 6.0
    fs_mb: int = 192
    retention_s: float = 10.0
    high: float = 80.0
    low: float = 60.0
    ct_share: float = 0.6
    ct_slices: int = 16
    ct_size: int = 256
    interval: float = 5.0
    warmup: float = 0.3  # fraction of the run before the steady-state checks start
    workers: int = 2
    drain_s: float = 60.0
    out: Path = Path("soak-out")


@dataclass
class Sent:
    study_uid: str
    modality: str
    instances: int
    bytes: int
    t_start: float
    t_end: float
    ok: bool
    out_of_resources: int
    error: str = ""


@dataclass
class Run:
    opts: Options
    sent: list[Sent] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    arrivals: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


# --------------------------------------------------------------------------------------------- senders
def _storescu(port: int, files: list[Path]) -> tuple[bool, int, str]:
    r = subprocess.run(["/usr/bin/storescu", "-aet", "MODALITY1", "-aec", "AINODE", "127.0.0.1", str(port),
                        *map(str, files)], capture_output=True, text=True, env=ENV, timeout=300)
    text = r.stdout + r.stderr
    a700 = max(text.lower().count("0xa7"), int(r.returncode == 0xA7))  # storescu exits with the status >> 8
    return r.returncode == 0 and "Store Failed" not in text and not a700, a700, text[-500:] if r.returncode else ""


def sender(run: Run, port: int, work: Path, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    o = run.opts
    cr = sample_file("RG1_UNCR.dcm")
    n = 0
    while not stop.is_set():
        d = work / f"s{seed}-{n}"
        n += 1
        if rng.random() < o.ct_share:
            files = ct_series(d, o.ct_slices, size=o.ct_size, seed=rng.randrange(1 << 30), shuffle=False)
            modality = "CT"
        else:
            files = [copy_with_new_uids(cr, d / "cr.dcm")]
            modality = "CR"
        import pydicom

        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        size = sum(f.stat().st_size for f in files)
        t0 = time.time()
        ok, a700, err = _storescu(port, files)
        t1 = time.time()
        with run.lock:
            run.sent.append(Sent(uid, modality, len(files), size, t0, t1, ok, a700, err))
        shutil.rmtree(d, ignore_errors=True)
        stop.wait(o.pause)


# --------------------------------------------------------------------------------------------- observation
def pacs_arrivals(pacs_dir: Path) -> dict[str, list[tuple[str, float]]]:
    """Study UID -> [(file name, mtime)] of what storescp received (``-su S``: one folder per study)."""
    out: dict[str, list[tuple[str, float]]] = {}
    for d in pacs_dir.glob("S_*"):
        files = []
        for f in d.iterdir():
            with contextlib.suppress(FileNotFoundError):
                files.append((f.name, f.stat().st_mtime))
        out[d.name[2:]] = files
    return out


def _rss(p: psutil.Process) -> int:
    try:
        return int(p.memory_info().rss)
    except psutil.Error:
        return 0


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


def sample(node: NodeProcess, storage: Path, t0: float) -> dict[str, Any]:
    assert node.proc is not None
    listener = psutil.Process(node.proc.pid)
    worker = redis = 0
    for c in listener.children(recursive=True):
        try:
            name = " ".join(c.cmdline())
        except psutil.Error:
            continue
        if "redis-server" in name:
            redis += _rss(c)
        else:
            worker += _rss(c)
    st = os.statvfs(storage)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    size = used + st.f_bavail * st.f_frsize
    db = storage / "state.db"
    row: dict[str, Any] = {
        "t": round(time.time() - t0, 2), "disk_used_mb": round(used / 2**20, 2),
        "disk_used_percent": round(100.0 * used / size, 2), "listener_rss_mb": round(_rss(listener) / 2**20, 2),
        "worker_rss_mb": round(worker / 2**20, 2), "redis_rss_mb": round(redis / 2**20, 2),
        "db_mb": round(db.stat().st_size / 2**20, 3) if db.exists() else 0.0,
        "wal_mb": round(os.path.getsize(f"{db}-wal") / 2**20, 3) if os.path.exists(f"{db}-wal") else 0.0,
        "aof_mb": round(sum(f.stat().st_size for f in (storage / "redis").glob("*.aof")) / 2**20, 3),
        "spool_mb": round(_du(storage / "spool") / 2**20, 2), "outbox_mb": round(_du(storage / "outbox") / 2**20, 2),
        "results_mb": round(_du(storage / "results") / 2**20, 2),
        "open_fds": listener.num_fds(),
    }
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
        row["studies_held"] = conn.execute("SELECT COUNT(*) FROM studies").fetchone()[0]
        row["studies_busy"] = conn.execute("SELECT COUNT(*) FROM studies WHERE state IN ('receiving','complete',"
                                           "'queued','processing')").fetchone()[0]
        row["instances_held"] = conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
        row["summaries"] = conn.execute("SELECT COUNT(*) FROM study_summaries").fetchone()[0]
        st = conn.execute("SELECT data FROM storage_status WHERE id=1").fetchone()
        if st:
            import json

            data = json.loads(st[0])
            row["storage_state"] = data["state"]
            row["held"] = ";".join(f"{n} {k}" for k, n in sorted(data["held"].items()))
        conn.close()
    except sqlite3.Error:
        pass
    return row


def warm_up(port: int, work: Path, pacs_dir: Path, timeout: float = 400) -> float:
    """One CT and one CR study, off the clock: the first report of each kind starts the workers' imports and
    PixelMed's validation of its shape (a JVM; minutes on a loaded 2-core machine). Returns the seconds."""
    import pydicom

    t = time.time()
    uids = []
    cr = copy_with_new_uids(sample_file("RG1_UNCR.dcm"), work / "cr.dcm")
    for files in (ct_series(work / "ct", 4, size=64), [cr]):
        uids.append(str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID))
        if not _storescu(port, files)[0]:
            raise RuntimeError("the warm-up study was not accepted")
    wait_for(lambda: all(len(pacs_arrivals(pacs_dir).get(u, [])) >= RESULTS_PER_STUDY for u in uids), timeout, 1.0,
             "results of the warm-up studies")
    shutil.rmtree(work, ignore_errors=True)
    return time.time() - t


def sampler(run: Run, node: NodeProcess, storage: Path, t0: float, stop: threading.Event) -> None:
    while not stop.wait(run.opts.interval):
        with contextlib.suppress(psutil.Error, OSError):
            run.samples.append(sample(node, storage, t0))


# --------------------------------------------------------------------------------------------- the run
def soak(o: Options) -> tuple[list[str], dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="ainode-soak-") as d:
        tmp = Path(d)
        storage = tmp / "var"
        with tmpfs(storage, o.fs_mb) as how:
            return _soak(o, tmp, storage, how)


def _soak(o: Options, tmp: Path, storage: Path, how: str) -> tuple[list[str], dict[str, Any]]:
    run = Run(o)
    scp = StoreSCP(tmp / "pacs", aet="PACS", extra_args=["-su", "S"]).start()
    port = free_port()
    cfg = base_config(storage, port, min_free_disk_mb=max(4, o.fs_mb // 10), retention_hours=o.retention_s / 3600,
                      failed_retention_hours=o.retention_s / 3600, disk_high_water_percent=o.high,
                      disk_low_water_percent=o.low, lifecycle_seconds=1, db_maintenance_seconds=10,
                      housekeeping_seconds=5)
    cfg["workers"] = {"concurrency": o.workers}
    cfg["destinations"] = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": scp.port}]
    cfg["delivery"] = {"poll_seconds": 1, "retry_base_seconds": 2}
    cfg["routes"] = [
        {"name": "cr", "match": {"Modality": "CR"}, "pipelines": ["echo"], "destinations": ["pacs"],
         "complete_on": "release"},
        {"name": "ct", "match": {"Modality": "CT"}, "pipelines": ["echo"], "destinations": ["pacs"],
         "complete_on": "quiet", "quiet_seconds": 1},
    ]
    node = NodeProcess(tmp, cfg).start()
    stop = threading.Event()
    duration = o.minutes * 60
    try:
        warm = warm_up(port, tmp / "warm", scp.outdir)
        t0 = time.time()
        threads = [threading.Thread(target=sampler, args=(run, node, storage, t0, stop), daemon=True)]
        threads += [threading.Thread(target=sender, args=(run, port, tmp / "work", stop, i), daemon=True)
                    for i in range(o.senders)]
        for th in threads:
            th.start()
        time.sleep(duration)
        stop.set()
        for th in threads[1:]:
            th.join(120)
        # drain: every acknowledged study's results at the PACS, then a few more samples
        want = {s.study_uid for s in run.sent if s.ok}
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: all(len(v) >= RESULTS_PER_STUDY for k, v in pacs_arrivals(scp.outdir).items()
                                 if k in want) and want <= set(pacs_arrivals(scp.outdir)), o.drain_s, 1.0)
        time.sleep(3)  # a duplicate, if any, would come now
        threads[0].join(0.1)
        run.arrivals = pacs_arrivals(scp.outdir)
        final = sample(node, storage, t0)
    finally:
        stop.set()
        node.stop()
        scp.stop()
        o.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(node.log, o.out / "node.log")  # for the post-mortem of a failed check
    studies = study_rows(run, t0)
    add_rates(run, studies)
    problems = checks(run, studies, duration)
    ok = [s for s in studies if s["latency_s"] is not None]
    lat = [s["latency_s"] for s in ok]
    n_inst = sum(s["instances"] for s in studies if s["ok"])
    summary = {
        "storage": how, "warm_up_s": round(warm, 1), "minutes": o.minutes, "senders": o.senders,
        "studies": len(studies),
        "instances": n_inst, "gigabytes": round(sum(s["bytes"] for s in studies) / 1e9, 3),
        "instances_per_s": round(n_inst / duration, 2),
        "latency_p50_s": round(pct(lat, 50), 2), "latency_p95_s": round(pct(lat, 95), 2),
        "latency_p99_s": round(pct(lat, 99), 2), "latency_max_s": round(max(lat, default=float("nan")), 2),
        "disk_max_percent": max(r["disk_used_percent"] for r in run.samples),
        "final": final,
    }
    title = (f"ainode soak: {o.minutes:g} min, {o.senders} senders, {len(studies)} studies / {n_inst} instances "
             f"({summary['gigabytes']} GB) into a {how}; retention {o.retention_s:g} s; "
             f"latency p50 {summary['latency_p50_s']} s p95 {summary['latency_p95_s']} s")
    summary["png"] = str(write_outputs(run, studies, o.out, title))
    return problems, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Options()
    ap.add_argument("--minutes", type=float, default=d.minutes)
    ap.add_argument("--senders", type=int, default=d.senders)
    ap.add_argument("--pause", type=float, default=d.pause, help="seconds each sender waits between studies")
    ap.add_argument("--fs-mb", type=int, default=d.fs_mb, help="size of the tmpfs storage_dir")
    ap.add_argument("--retention-s", type=float, default=d.retention_s)
    ap.add_argument("--high", type=float, default=d.high, help="disk_high_water_percent")
    ap.add_argument("--low", type=float, default=d.low, help="disk_low_water_percent")
    ap.add_argument("--ct-share", type=float, default=d.ct_share)
    ap.add_argument("--ct-slices", type=int, default=d.ct_slices)
    ap.add_argument("--ct-size", type=int, default=d.ct_size)
    ap.add_argument("--interval", type=float, default=d.interval)
    ap.add_argument("--warmup", type=float, default=d.warmup)
    ap.add_argument("--workers", type=int, default=d.workers)
    ap.add_argument("--out", type=Path, default=d.out)
    a = ap.parse_args(argv)
    o = Options(minutes=a.minutes, senders=a.senders, pause=a.pause, fs_mb=a.fs_mb, retention_s=a.retention_s,
                high=a.high, low=a.low, ct_share=a.ct_share, ct_slices=a.ct_slices, ct_size=a.ct_size,
                interval=a.interval, warmup=a.warmup, workers=a.workers, out=a.out)
    problems, summary = soak(o)
    for k, v in summary.items():
        print(f"{k}: {v}")
    for p in problems:
        print(f"FAIL: {p}")
    print("steady state: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
