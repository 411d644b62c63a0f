"""``ainode``: run | serve | worker | echo | send | status | rerun | config check | route test | weights."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from node.cli.admin import (
    cmd_config_check,
    cmd_console_hash_password,
    cmd_rerun,
    cmd_route_test,
    cmd_status,
    cmd_weights,
)
from node.cli.common import EXIT_CONFIG, setup_logging
from node.cli.dicom import cmd_echo, cmd_send
from node.cli.serve import cmd_run, cmd_serve, cmd_worker
from node.config import ConfigError


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
        setup_logging(os.environ.get("AINODE_LOG_LEVEL", "INFO"))
        from node import weights

        return int(weights.main(argv[1:]))
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"))
    try:
        return int(args.fn(args) or 0)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(line, file=sys.stderr)
        return EXIT_CONFIG


__all__ = ["build_parser", "main"]
