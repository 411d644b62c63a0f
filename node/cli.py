"""``ainode``: run | serve | worker | echo | send | status | rerun | config check | route test | weights."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.config import Config, ConfigError, load_config
from node.status import status_data

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger("ainode")

EXIT_CONFIG = 2


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _load(args: argparse.Namespace, semantics: bool = True) -> Config:
    return load_config(args.config, check_semantics=semantics)


def _embedded_url(cfg: Config) -> str:
    from node.broker import EmbeddedRedis

    return EmbeddedRedis(cfg.node.storage_dir).url


# ------------------------------------------------------------------------------------------- run / serve
def _worker_cmd(args: argparse.Namespace, cfg: Config) -> list[str]:
    cmd = [sys.executable, "-m", "node.cli", "worker", "--queues", ",".join(cfg.workers.queues),
           "--concurrency", str(cfg.workers.concurrency), "--log-level", args.log_level]
    if args.config:
        cmd += ["--config", str(args.config)]
    return cmd


def _serve(args: argparse.Namespace, with_workers: bool) -> int:
    from node.broker import EmbeddedRedis, _die_with_parent
    from node.service import Listener

    cfg = _load(args)
    from node.web.auth import refusal

    if (why := refusal(cfg)) is not None:
        print(f"ainode: not starting: {why}", file=sys.stderr)
        return EXIT_CONFIG
    redis_srv = None
    url = cfg.broker.url
    if url is None:
        redis_srv = EmbeddedRedis(cfg.node.storage_dir)
        url = redis_srv.start()
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    hup = threading.Event()
    signal.signal(signal.SIGHUP, lambda _s, _f: hup.set())  # reload the config file (node.reload)
    workers: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ, AINODE_BROKER__URL=url)

    def spawn_worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen(_worker_cmd(args, cfg), env=env, start_new_session=True,
                                preexec_fn=lambda: _die_with_parent(signal.SIGKILL))

    if with_workers and cfg.workers.concurrency > 0:
        workers.append(spawn_worker())
    restarts: list[float] = []
    listener = Listener(cfg, url)
    web = None
    try:
        listener.start()
        if cfg.node.web_port:
            try:
                from node.web import WebServer

                web = WebServer(listener, cfg.node.web_host, cfg.node.web_port, config_path=args.config)
                web.start()
            except ImportError:
                pass
            except OSError as exc:
                log.error("status page not started on port %s: %s (node.web_port)", cfg.node.web_port, exc)
        print(f"ainode: {cfg.node.ae_title} listening on {cfg.node.host}:{listener.scp.port}; "
              f"broker {'embedded Redis' if redis_srv else 'external'}; "
              f"{cfg.workers.concurrency if with_workers else 0} worker process(es). Ctrl-C stops.", flush=True)
        while not stop.wait(1.0):
            if hup.is_set():
                hup.clear()
                reload_from_file(args, listener)
            for i, w in enumerate(workers):
                if w.poll() is not None:
                    restarts = [t for t in restarts if time.time() - t < 60] + [time.time()]
                    delay = min(30.0, 2.0 ** (len(restarts) - 1))  # a worker that cannot start must not spin
                    log.error("worker exited with %s; restarting it in %.0f s", w.returncode, delay)
                    if stop.wait(delay):
                        break
                    workers[i] = spawn_worker()
    finally:
        # order matters: workers finish (or give back) their task while Redis is still up
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(args.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("worker still busy after %d s: killed; its task will run again", args.stop_timeout)
                w.kill()
                w.wait()
        if web is not None:
            web.stop()
        listener.stop()
        if redis_srv is not None:
            redis_srv.stop()
        log.info("stopped")
    return 0


def reload_from_file(args: argparse.Namespace, listener: Any) -> bool:
    """SIGHUP: read the config file again; a file with problems changes nothing and says why."""
    from node.web.auth import refusal

    try:
        cfg = _load(args)
    except (ConfigError, OSError) as exc:
        log.error("reload refused, the running configuration stays: %s", exc)
        return False
    if (why := refusal(cfg)) is not None:
        log.error("reload refused, the running configuration stays: %s", why)
        return False
    listener.reload(cfg)
    return True


def cmd_run(args: argparse.Namespace) -> int:
    return _serve(args, with_workers=True)


def cmd_serve(args: argparse.Namespace) -> int:
    return _serve(args, with_workers=False)


def cmd_worker(args: argparse.Namespace) -> int:
    from node.tasks import make_app

    cfg = _load(args)
    url = cfg.broker.url or _embedded_url(cfg)
    app = make_app(url, task_time_limit=cfg.workers.task_time_limit_s, max_retries=cfg.workers.max_retries)
    queues = args.queues or ",".join(cfg.workers.queues)
    concurrency = args.concurrency or cfg.workers.concurrency or 1
    app.worker_main(["worker", "-Q", queues, "-c", str(concurrency), "-O", "fair", "--pool", "prefork",
                     "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"ainode-{os.getpid()}@%h",
                     "--loglevel", args.log_level.upper()])
    return 0


# ------------------------------------------------------------------------------------------- DICOM tools
def _parse_peer(text: str) -> tuple[str, str, int]:
    try:
        ae, rest = text.split("@", 1)
        host, port = rest.rsplit(":", 1)
        return ae, host, int(port)
    except ValueError:
        raise SystemExit(f"peer {text!r} must look like AE@HOST:PORT, e.g. PACS@10.0.0.5:104") from None


def _why_not(assoc: Association) -> str:
    """IT staff read this line to decide what to fix: the AE titles, or the network."""
    from node import scu

    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        return f"association rejected {scu.rejection_kind(rj)}ly: {scu.rejection_reason(rj)}"
    if assoc.is_aborted:
        return "association aborted by the peer"
    return "could not connect"


def cmd_echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from node import scu

    cfg = _load(args, semantics=False)
    ae_title, host, port = _parse_peer(args.peer)
    ae = AE(ae_title=cfg.node.ae_title)
    ae.add_requested_context(Verification)
    t0 = time.monotonic()
    assoc = scu.associate(ae, host, port, ae_title=ae_title)
    if not assoc.is_established:
        print(f"echo {ae_title}@{host}:{port}: {_why_not(assoc)}")
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    ok = bool(status) and status.Status == 0
    print(f"echo {ae_title}@{host}:{port}: {'success' if ok else 'failed'} in {1000 * (time.monotonic() - t0):.0f} ms")
    return 0 if ok else 1


def _files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return out


def cmd_send(args: argparse.Namespace) -> int:
    import pydicom
    from pynetdicom import AE

    from node import scu

    cfg = _load(args, semantics=False)
    ae_title, host, port = _parse_peer(args.to)
    datasets = []
    for f in _files(args.paths):
        try:
            datasets.append((f, pydicom.dcmread(f)))
        except Exception as exc:
            print(f"skip {f}: not DICOM ({exc})", file=sys.stderr)
    ae = AE(ae_title=cfg.node.ae_title)
    for sop, ts in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for _, d in datasets}):
        ae.add_requested_context(sop, [ts])
    assoc = scu.associate(ae, host, port, ae_title=ae_title)
    if not assoc.is_established:
        print(f"send: association with {ae_title}@{host}:{port} failed: {_why_not(assoc)}")
        return 1
    failed = 0
    for f, d in datasets:
        st = assoc.send_c_store(d)
        if not st or st.Status != 0:
            failed += 1
            print(f"send {f}: status 0x{getattr(st, 'Status', 0xFFFF):04X}", file=sys.stderr)
    assoc.release()
    print(f"sent {len(datasets) - failed}/{len(datasets)} to {ae_title}@{host}:{port}")
    return 0 if failed == 0 else 1


# ------------------------------------------------------------------------------------------- status
def _ts(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args, semantics=False)
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
              f"{_ts(s['first_received']):>8} {_ts(s['completed']):>8} {_ts(s['finished']):>8}  {jobs}")
        for e in s["errors"]:
            print(f"{'':<40} error: {e}")
        if s.get("critical_findings"):
            print(f"{'':<40} critical: {'; '.join(s['critical_findings'])}")
        if s.get("purged"):
            print(f"{'':<40} instances purged {_ts(s['purged'])} ({s['purge_reason']})")
        elif (s.get("retention") or {}).get("purge_after"):
            print(f"{'':<40} instances kept until {_ts(s['retention']['purge_after'])}")
        for dest, d in (s.get("delivery") or {}).items():
            states = ", ".join(f"{k} {v}" for k, v in sorted(d["states"].items()))
            err = f"; last error: {d['last_error']}" if d["last_error"] and not d["delivered"] else ""
            print(f"{'':<40} -> {dest}: {states}; last sent {_ts(d['last_sent'])}{err}")
        for c in s.get("conflicts") or []:
            what = {"kept_first": "different content, first copy kept", "replaced": "different content, replaced",
                    "refused": f"refused for study {c['sent_study_uid']}"}.get(c["action"], c["action"])
            print(f"{'':<40} conflict: SOP Instance UID {c['sop_uid']} from {c['calling_ae'] or '?'} at "
                  f"{_ts(c['at'])}: {what}")
        for n in s.get("notifications") or []:
            took = f" {n['latency_s']:.1f} s after completion" if n.get("latency_s") is not None else ""
            print(f"{'':<40} notify {n['channel']} ({n['finding']}): {n['state']}{took}")
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    """Ask the running listener to run a study's pipelines again; a purged study is answered here at once."""
    import sqlite3

    from node.lifecycle.rerun import purge_record, purged_message, submit

    cfg = _load(args, semantics=False)
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

    cfg = _load(args)
    studies: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for f in _files(args.paths):
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


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ainode", description="AI inference node for a DICOM network")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", type=Path, default=os.environ.get("AINODE_CONFIG"),
                        help="YAML config file (default: built-in defaults; env AINODE_CONFIG)")
    common.add_argument("--log-level", default=os.environ.get("AINODE_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="listener + embedded Redis + worker pool")
    run.add_argument("--stop-timeout", type=int, default=30, help="seconds a stopping worker may finish its task")
    run.set_defaults(fn=cmd_run)
    serve = sub.add_parser("serve", parents=[common], help="listener only (workers run elsewhere)")
    serve.set_defaults(fn=cmd_serve, stop_timeout=0)
    w = sub.add_parser("worker", parents=[common], help="a Celery worker")
    w.add_argument("--queues", help="comma-separated: cpu,gpu")
    w.add_argument("--concurrency", type=int)
    w.set_defaults(fn=cmd_worker)
    e = sub.add_parser("echo", parents=[common], help="C-ECHO a peer: AE@HOST:PORT")
    e.add_argument("peer")
    e.set_defaults(fn=cmd_echo)
    s = sub.add_parser("send", parents=[common], help="C-STORE files or folders to AE@HOST:PORT")
    s.add_argument("paths", nargs="+")
    s.add_argument("--to", required=True)
    s.set_defaults(fn=cmd_send)
    st = sub.add_parser("status", parents=[common], help="studies, jobs and deliveries")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)
    rr = sub.add_parser("rerun", parents=[common], help="run a study's pipelines again (the listener must run)")
    rr.add_argument("study_uid")
    rr.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the listener's answer")
    rr.set_defaults(fn=cmd_rerun)
    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    cc = csub.add_parser("check", parents=[common], help="validate a config file; exit 2 on problems")
    cc.add_argument("file", nargs="?", type=Path)
    cc.set_defaults(fn=cmd_config_check)
    r = sub.add_parser("route", help="routing tools")
    rsub = r.add_subparsers(dest="route_command", required=True)
    rt = rsub.add_parser("test", parents=[common], help="print the route files or folders would take")
    rt.add_argument("paths", nargs="+")
    rt.add_argument("--calling-ae", default="", help="calling AE title to assume")
    rt.set_defaults(fn=cmd_route_test)
    con = sub.add_parser("console", help="web console tools")
    consub = con.add_subparsers(dest="console_command", required=True)
    hp = consub.add_parser("hash-password", help="print an argon2 hash for console.users (password from the "
                           "terminal, or one line of stdin)")
    hp.set_defaults(fn=cmd_console_hash_password)
    wt = sub.add_parser("weights", help="import and inspect model weights", add_help=False)
    wt.add_argument("rest", nargs=argparse.REMAINDER)
    wt.set_defaults(fn=cmd_weights)
    from node import analyze
    from node.evaluate import cli as evaluate_cli

    analyze.register(sub, common)
    evaluate_cli.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["weights"]:  # its own parser, so `ainode weights --help` describes the import tool
        _setup_logging(os.environ.get("AINODE_LOG_LEVEL", "INFO"))
        from node import weights

        return int(weights.main(argv[1:]))
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "log_level", "INFO"))
    try:
        return int(args.fn(args) or 0)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(line, file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
