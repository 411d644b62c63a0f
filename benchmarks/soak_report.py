"""Analysis and chart of a soak run (benchmarks/soak.py): rates and latency per interval, steady-state checks,
CSV and PNG."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

RESULTS_PER_STUDY = 3  # echo: measurement SR, narrative SR, summary SC (no findings, no KOS)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def study_rows(run: Any, t0: float) -> list[dict[str, Any]]:
    rows = []
    for s in run.sent:
        got = run.arrivals.get(s.study_uid, [])
        done = max((m for _, m in got), default=None) if len(got) >= RESULTS_PER_STUDY else None
        rows.append({"study_uid": s.study_uid, "modality": s.modality, "instances": s.instances, "bytes": s.bytes,
                     "sent_at": round(s.t_end - t0, 3), "send_s": round(s.t_end - s.t_start, 3), "ok": s.ok,
                     "out_of_resources": s.out_of_resources, "results": len(got),
                     "latency_s": round(done - s.t_end, 3) if done else None,
                     "done_at": round(done - t0, 3) if done else None})
    return rows


def add_rates(run: Any, studies: list[dict[str, Any]]) -> None:
    """instances/s and latency percentiles for the interval before each sample."""
    prev = 0.0
    for row in run.samples:
        t = row["t"]
        n = sum(s["instances"] for s in studies if s["ok"] and prev < s["sent_at"] <= t)
        lat = [s["latency_s"] for s in studies if s["done_at"] is not None and prev < s["done_at"] <= t]
        row["instances_per_s"] = round(n / (t - prev), 2) if t > prev else 0.0
        row["studies_done"] = len(lat)
        for q in (50, 95, 99):
            row[f"latency_p{q}_s"] = round(pct(lat, q), 3) if lat else ""
        prev = t


def checks(run: Any, studies: list[dict[str, Any]], duration: float) -> list[str]:
    """Steady state: what must hold after warm-up; each failure is one line."""
    o = run.opts
    problems = []
    steady = [r for r in run.samples if r["t"] >= o.warmup * duration and r["t"] <= duration]
    if len(steady) < 6:
        return [f"only {len(steady)} samples after warm-up: run longer or sample more often"]
    third = max(2, len(steady) // 3)
    first, last = steady[:third], steady[-third:]
    worst = max(r["disk_used_percent"] for r in run.samples)
    if worst >= o.high:
        problems.append(f"disk reached {worst:.1f}% used, not under the high watermark {o.high:g}%")
    for key, rel, floor in (("listener_rss_mb", 0.15, 12.0), ("worker_rss_mb", 0.15, 40.0),
                            ("redis_rss_mb", 0.5, 8.0), ("db_mb", 0.25, 0.25)):
        a = statistics.median(r[key] for r in first)
        b = statistics.median(r[key] for r in last)
        if b > a * (1 + rel) and b - a > floor:
            problems.append(f"{key} grew from {a:.2f} to {b:.2f} after warm-up (allowed {rel:.0%} or {floor:g})")
    fd_a, fd_b = max(r["open_fds"] for r in first), max(r["open_fds"] for r in last)
    if fd_b > fd_a + 10:
        problems.append(f"listener open fds grew from {fd_a} to {fd_b}")
    refused = sum(s["out_of_resources"] for s in studies)
    if refused:
        problems.append(f"{refused} C-STORE(s) answered 0xA700 (out of resources) while retention allowed space")
    failed = [s for s in studies if not s["ok"]]
    if failed:
        problems.append(f"{len(failed)} study send(s) failed, e.g. {failed[0]['study_uid']}")
    wrong = [s for s in studies if s["ok"] and s["results"] != RESULTS_PER_STUDY]
    if wrong:
        problems.append(f"{len(wrong)} of {len(studies)} studies did not get exactly {RESULTS_PER_STUDY} result "
                        f"objects at the PACS, e.g. {wrong[0]['study_uid']}: {wrong[0]['results']}")
    busy = max(r.get("studies_busy", 0) for r in last)
    if busy > max(10, 3 * o.senders * 2):
        problems.append(f"backlog: {busy} studies still receiving/queued/processing at the end")
    if not any(r.get("summaries", 0) for r in run.samples):
        problems.append("no study was ever purged: retention did not run")
    return problems


def write_outputs(run: Any, studies: list[dict[str, Any]], out: Path, title: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in run.samples for k in r))
    with open(out / "soak.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(run.samples)
    with open(out / "studies.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(studies[0]) if studies else ["study_uid"])
        w.writeheader()
        w.writerows(studies)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] / 60 for r in run.samples]
    fig, ax = plt.subplots(3, 2, figsize=(13, 10), sharex=True)
    a = ax[0][0]
    a.plot(t, [r["instances_per_s"] for r in run.samples], label="instances/s received")
    a.set_ylabel("instances/s")
    a2 = a.twinx()
    a2.plot(t, [r["studies_done"] for r in run.samples], color="tab:gray", alpha=0.6, label="studies delivered")
    a2.set_ylabel("studies delivered / interval")
    a.legend(loc="upper left")
    a2.legend(loc="upper right")
    a = ax[0][1]
    for q, c in ((50, "tab:green"), (95, "tab:orange"), (99, "tab:red")):
        a.plot(t, [r[f"latency_p{q}_s"] if r[f"latency_p{q}_s"] != "" else float("nan") for r in run.samples],
               color=c, label=f"p{q}")
    a.set_ylabel("end-to-end latency (s)")
    a.legend()
    a = ax[1][0]
    a.plot(t, [r["disk_used_percent"] for r in run.samples], label="disk used")
    a.axhline(run.opts.high, color="tab:red", ls="--", label=f"high water {run.opts.high:g}%")
    a.axhline(run.opts.low, color="tab:orange", ls=":", label=f"low water {run.opts.low:g}%")
    a.set_ylim(0, 100)
    a.set_ylabel(f"storage_dir disk used (% of {run.opts.fs_mb} MB)")
    a.legend()
    a = ax[1][1]
    for k in ("listener_rss_mb", "worker_rss_mb", "redis_rss_mb"):
        a.plot(t, [r[k] for r in run.samples], label=k.replace("_mb", ""))
    a.set_ylabel("RSS (MB)")
    a.legend()
    a = ax[2][0]
    a.plot(t, [r["db_mb"] for r in run.samples], label="state.db")
    a.plot(t, [r["wal_mb"] for r in run.samples], label="state.db-wal")
    a.plot(t, [r["aof_mb"] for r in run.samples], label="redis AOF")
    a.plot(t, [r["outbox_mb"] + r["results_mb"] for r in run.samples], label="outbox + results")
    a.set_ylabel("MB")
    a.set_xlabel("minutes")
    a.legend()
    a = ax[2][1]
    a.plot(t, [r["open_fds"] for r in run.samples], label="listener open fds")
    a.plot(t, [r.get("studies_held", 0) for r in run.samples], label="studies in state db")
    a.plot(t, [r.get("studies_busy", 0) for r in run.samples], label="studies not finished")
    a.set_xlabel("minutes")
    a.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = out / "soak.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
