"""``python -m node.delivery``: the outbox delivered by a process of its own (tests kill -9 it)."""


from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from node.delivery.model import BackoffPolicy
from node.delivery.service import DeliveryService
from node.state import State

log = logging.getLogger("ainode.delivery")

def main(argv: list[str] | None = None) -> int:
    from node.config import load_config

    p = argparse.ArgumentParser(prog="python -m node.delivery", description="Deliver the outbox until SIGTERM.")
    p.add_argument("--config", required=True)
    p.add_argument("--storage-dir", help="defaults to node.storage_dir from the config")
    p.add_argument("--backoff-base", type=float, default=30.0, help="first retry delay in seconds")
    p.add_argument("--backoff-max", type=float, default=3600.0, help="longest retry delay in seconds")
    p.add_argument("--poll-interval", type=float, default=5.0)
    p.add_argument("--commitment-port", type=int, help="listen here for storage commitment reports")
    p.add_argument("--commitment-timeout", type=float, default=600.0, help="re-ask for commitment after (s)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, check_semantics=False)
    storage_dir = Path(args.storage_dir or cfg.node.storage_dir)
    state = State(storage_dir)
    svc = DeliveryService(state, cfg.destinations, storage_dir, cfg.node.ae_title,
                          backoff=BackoffPolicy(args.backoff_base, args.backoff_max),
                          poll_interval_s=args.poll_interval, commitment_port=args.commitment_port,
                          commitment_timeout_s=args.commitment_timeout)
    done = threading.Event()

    def _signal(signum: int, _frame: object) -> None:
        log.info("delivery: signal %d, stopping", signum)
        done.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    svc.start()
    log.info("delivery: running for %s", ", ".join(svc.destinations) or "no destinations")
    while not done.wait(0.5):
        pass
    svc.stop()
    state.close()
    return 0
