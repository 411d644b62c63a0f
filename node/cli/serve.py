"""``ainode run | serve | worker``: the listener, the embedded Redis and the worker pool, and reload."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from node.cli.common import EXIT_CONFIG, load
from node.config import Config, ConfigError

log = logging.getLogger("ainode")


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

    cfg = load(args)
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
        cfg = load(args)
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

    cfg = load(args)
    url = cfg.broker.url or _embedded_url(cfg)
    app = make_app(url, task_time_limit=cfg.workers.task_time_limit_s, max_retries=cfg.workers.max_retries)
    queues = args.queues or ",".join(cfg.workers.queues)
    concurrency = args.concurrency or cfg.workers.concurrency or 1
    app.worker_main(["worker", "-Q", queues, "-c", str(concurrency), "-O", "fair", "--pool", "prefork",
                     "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"ainode-{os.getpid()}@%h",
                     "--loglevel", args.log_level.upper()])
    return 0
