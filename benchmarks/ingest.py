"""Ingest speed: /usr/bin/storescu -> ainode vs -> DCMTK storescp, same files, same script.

    python benchmarks/ingest.py [--n 500] [--size 512] [--rounds 3]

Both receivers write every instance to disk. ainode also flushes each instance (one fdatasync: see
node/spool.py) and indexes it before answering; DCMTK does not flush at all. Prints instances/s of
both and the ratio per round (machines here are noisy: compare the ratio, not the absolute numbers),
the listener process's CPU time per instance (which a loaded machine disturbs far less than the
rate), and, for context, what one fdatasync of an instance-sized file costs on this disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.dicomgen import ct_series  # noqa: E402
from support.node import NodeProcess, base_config, free_port, wait_for, wait_port  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ENV = dict(os.environ, TCP_NODELAY="1")


def send(port: int, files: list[Path], aec: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([STORESCU, "-aet", "MODALITY1", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                   check=True, env=ENV, capture_output=True)
    return time.perf_counter() - t0


def dcmtk_rate(files: list[Path], tmp: Path) -> float:
    out = tmp / "storescp-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen([STORESCP, "-aet", "STORESCP", "-od", str(out), str(port)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        dt = send(port, files, "STORESCP")
        assert len(list(out.iterdir())) == len(files)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    return len(files) / dt


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process: steadier than wall time on a shared, loaded machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ainode_rate(files: list[Path], tmp: Path) -> tuple[float, float]:
    """(instances/s, listener CPU ms per instance)"""
    run = tmp / f"ainode-{time.time_ns()}"
    run.mkdir()
    cfg = base_config(run / "var", free_port())
    cfg["routes"] = []  # measure receiving, not processing
    node = NodeProcess(run, cfg).start()
    try:
        assert node.proc is not None
        cpu0 = cpu_seconds(node.proc.pid)
        dt = send(node.port, files, "AINODE")
        cpu = cpu_seconds(node.proc.pid) - cpu0
        spool = run / "var" / "spool"
        wait_for(lambda: len(list(spool.rglob("*.dcm"))) == len(files), 10)
    finally:
        node.stop()
    shutil.rmtree(run, ignore_errors=True)
    return len(files) / dt, 1000 * cpu / len(files)


def flush_ms(directory: Path, size: int, n: int = 50) -> float:
    """Median cost of writing and fdatasync-ing one instance-sized file: the floor a durable receiver pays."""
    data = os.urandom(size)
    times = []
    for i in range(n):
        path = directory / f"flush-{i}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        t0 = time.perf_counter()
        os.write(fd, data)
        os.fdatasync(fd)
        times.append(time.perf_counter() - t0)
        os.close(fd)
        path.unlink()
    return sorted(times)[n // 2] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        files = ct_series(tmp / "src", args.n, size=args.size, shuffle=False)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{args.n} instances, {args.size}x{args.size} 16-bit, {mb:.0f} MB, one association, TCP_NODELAY=1")
        ratios, cpus = [], []
        for r in range(args.rounds):
            ref = dcmtk_rate(files, tmp)
            ours, cpu_ms = ainode_rate(files, tmp)
            ratios.append(ours / ref)
            cpus.append(cpu_ms)
            print(f"round {r + 1}: DCMTK storescp {ref:6.1f} inst/s   ainode {ours:6.1f} inst/s   "
                  f"ratio {ours / ref:.2f}   listener CPU {cpu_ms:.2f} ms/instance")
        print(f"median ratio ainode/storescp: {sorted(ratios)[len(ratios) // 2]:.2f}")
        print(f"median listener CPU per instance: {sorted(cpus)[len(cpus) // 2]:.2f} ms")
        print(f"this disk: write + fdatasync of one {mb * 1e6 / args.n / 1024:.0f} KiB instance "
              f"{flush_ms(tmp, int(mb * 1e6 / args.n)):.2f} ms (median of 50)")


if __name__ == "__main__":
    main()
