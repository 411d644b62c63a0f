"""``ainode status | rerun | config check | route test | weights | console hash-password``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from node.cli.common import EXIT_CONFIG, load
from node.cli.dicom import dicom_files
from node.config import ConfigError, load_config
from node.status import status_data


def clock(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load(args, semantics=False)
    data = status_data(cfg)
    if args.json:
        print(json.dumps(data, indent=1, default=str))
        return 0
    st = data.get("storage")
    if st:
        print(f"storage: {st['state']}, disk {st['disk_used_percent']:.1f}% used (high water "
              f"{st['high_water_percent']:g}%, low {st['low_water_percent']:g}%), {st['deletable']} study(ies)"
              f" deletable, {st['purged_total']} purged since start" + (f"; {st['reason']}" if st["reason"] else ""))
    if not data["studies"]:
        print(data.get("note", "no studies"))
        return 0
    print(f"{'STUDY':<40} {'STATE':<11} {'N':>5} {'ROUTE':<14} {'RECEIVED':>8} {'COMPLETE':>8} {'FINISHED':>8}  JOBS")
    for s in data["studies"]:
        state = ("CRITICAL " if s["critical"] else "") + (s["state"] or "")
        jobs = ", ".join(f"{j['pipeline']}:{j['state']}" for j in s["jobs"])
        print(f"{s['study_uid'][:40]:<40} {state:<11} {s['instances']:>5} {(s['route'] or '-')[:14]:<14} "
              f"{clock(s['first_received']):>8} {clock(s['completed']):>8} {clock(s['finished']):>8}  {jobs}")
        for e in s["errors"]:
            print(f"{'':<40} error: {e}")
        if s.get("critical_findings"):
            print(f"{'':<40} critical: {'; '.join(s['critical_findings'])}")
        if s.get("purged"):
            print(f"{'':<40} instances purged {clock(s['purged'])} ({s['purge_reason']})")
        elif (s.get("retention") or {}).get("purge_after"):
            print(f"{'':<40} instances kept until {clock(s['retention']['purge_after'])}")
        for dest, d in (s.get("delivery") or {}).items():
            states = ", ".join(f"{k} {v}" for k, v in sorted(d["states"].items()))
            err = f"; last error: {d['last_error']}" if d["last_error"] and not d["delivered"] else ""
            print(f"{'':<40} -> {dest}: {states}; last sent {clock(d['last_sent'])}{err}")
        for c in s.get("conflicts") or []:
            what = {"kept_first": "different content, first copy kept", "replaced": "different content, replaced",
                    "refused": f"refused for study {c['sent_study_uid']}"}.get(c["action"], c["action"])
            print(f"{'':<40} conflict: SOP Instance UID {c['sop_uid']} from {c['calling_ae'] or '?'} at "
                  f"{clock(c['at'])}: {what}")
        for n in s.get("notifications") or []:
            took = f" {n['latency_s']:.1f} s after completion" if n.get("latency_s") is not None else ""
            print(f"{'':<40} notify {n['channel']} ({n['finding']}): {n['state']}{took}")
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    """Ask the running listener to run a study's pipelines again; a purged study is answered here at once."""
    import sqlite3

    from node.lifecycle.rerun import purge_record, purged_message, submit

    cfg = load(args, semantics=False)
    storage = Path(cfg.node.storage_dir)
    db = storage / "state.db"
    if db.exists():
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        live = conn.execute("SELECT 1 FROM studies WHERE study_uid=?", (args.study_uid,)).fetchone()
        record = purge_record(lambda q, p: conn.execute(q, p).fetchall(), args.study_uid)
        conn.close()
        if record is not None and live is None:
            print(f"rerun: {purged_message(args.study_uid, record['purged'], record['purge_reason'])}",
                  file=sys.stderr)
            return 1
    answer = submit(storage, args.study_uid)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        if answer.exists():
            data = json.loads(answer.read_text(encoding="utf-8"))
            answer.unlink(missing_ok=True)
            print(f"rerun: {data['message']}", file=sys.stdout if data["ok"] else sys.stderr)
            return 0 if data["ok"] else 1
        time.sleep(0.2)
    print(f"rerun: no answer from the listener within {args.wait:g} s (is `ainode run` running on {storage}?);"
          " the request stays queued and is answered when it runs", file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------------- config / route
def cmd_config_check(args: argparse.Namespace) -> int:
    path = args.file or args.config
    if path is None:
        print("config check: give the file, e.g. ainode config check config/ainode.yaml", file=sys.stderr)
        return EXIT_CONFIG
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for p in exc.problems:
            print(f"{path}: {p}")
        print(f"{len(exc.problems)} problem(s) found", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"{path}: cannot read: {exc}")
        return EXIT_CONFIG
    from node.policy import route_policy_problems

    policy_problems, notes = route_policy_problems(cfg)  # critical:/thresholds: keys against the manifests
    for note in notes:
        print(f"{path}: note: {note}", file=sys.stderr)
    if policy_problems:
        for p in policy_problems:
            print(f"{path}: {p}")
        print(f"{len(policy_problems)} problem(s) found", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{path}: OK ({len(cfg.peers)} peer(s), {len(cfg.destinations)} destination(s), "
          f"{len(cfg.routes)} route(s))")
    return 0


def cmd_route_test(args: argparse.Namespace) -> int:
    from collections import defaultdict

    import pydicom

    from node.routing import route
    from node.scp import series_tags

    cfg = load(args)
    studies: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for f in dicom_files(args.paths):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:
            continue
        tags = series_tags(ds, {k for r in cfg.routes for k in r.match})
        tags.update(calling_ae=args.calling_ae, called_ae=cfg.node.ae_title)
        studies[str(ds.StudyInstanceUID)].setdefault(str(ds.SeriesInstanceUID), tags)
    if not studies:
        print("no DICOM files found")
        return 1
    for study_uid, series in studies.items():
        decision = route(cfg.routes, list(series.values()))
        names = [f"{r.name} -> {', '.join(r.pipelines)}" for r in decision.routes]
        print(f"{study_uid}: {'; '.join(names) if names else 'no route'}")
        for t in series.values():
            print(f"  series {t.get('Modality', '?')} {t.get('BodyPartExamined', '')} "
                  f"{t.get('SeriesDescription', '')}".rstrip())
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from node import weights

    return int(weights.main(args.rest))


def cmd_console_hash_password(args: argparse.Namespace) -> int:
    import getpass

    from node.web.auth import hash_password

    password = getpass.getpass("console password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        print("console hash-password: use at least 8 characters", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0
