"""The operations console and the monitoring endpoints (``/healthz``, ``/metrics``, ``/api/status``).

See README "Console". Submodules: ``server`` (app and HTTP server), ``auth`` (users, roles, CSRF),
``audit`` (append-only log), ``metrics`` (Prometheus), ``data`` (queries), ``views`` (pages),
``actions`` (re-run, re-send, retry, cancel), ``configedit`` (editing and hot reload).
"""

from __future__ import annotations

from typing import Any

from node.web.health import health

__all__ = ["WebServer", "health"]


def __getattr__(name: str) -> Any:
    if name == "WebServer":  # the server pulls in uvicorn and Starlette: only when asked for
        from node.web.server import WebServer

        return WebServer
    raise AttributeError(name)
