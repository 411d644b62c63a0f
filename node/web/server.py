"""The console's HTTP server: a Starlette app served by uvicorn on its own thread inside the listener.

The listener owns the state database; the console reads it through the listener's handle and asks the
listener's own components (job manager, delivery service) to act, so there is exactly one writer.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from node.web.audit import AuditLog
from node.web.auth import Authenticator, Identity, LoginThrottle, csrf_ok, is_loopback, session_secret
from node.web.metrics import CONTENT_TYPE, NodeMetrics

if TYPE_CHECKING:
    from node.service import Listener

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
READ_METHODS = ("GET", "HEAD")


class Denied(Exception):
    def __init__(self, status: int, message: str, retry_after_s: float = 0.0):
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


def _fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _fmt_dur(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class Console:
    """Everything one request needs: who asks, the listener, the audit log, the templates."""

    def __init__(self, listener: Listener, host: str, config_path: str | Path | None = None):
        self.listener = listener
        self.host = host
        self.config_path = Path(config_path) if config_path else None
        storage = Path(listener.cfg.node.storage_dir)
        self._audit = AuditLog(listener.cfg.console.audit_log or storage / "audit.jsonl")
        self.metrics = NodeMetrics(listener)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.filters["t"] = _fmt_time
        self.templates.env.filters["dur"] = _fmt_dur
        self.secret = session_secret(storage)
        self._throttle = LoginThrottle()

    @property
    def audit(self) -> AuditLog:
        """One file for the console's life, bounded by the limits of the configuration now in force."""
        cc = self.listener.cfg.console
        self._audit.max_bytes, self._audit.keep = int(cc.audit_max_mb * 2**20), cc.audit_keep
        return self._audit

    @property
    def throttle(self) -> LoginThrottle:
        """One per console (it remembers failures), with the limits of the configuration now in force."""
        cc = self.listener.cfg.console
        self._throttle.max_failures, self._throttle.base_s = cc.max_failed_logins, cc.lockout_seconds
        return self._throttle

    def sign_in_failed(self, request: Request, name: str) -> float:
        """Count a failed sign-in from this address; says in the audit log when it now has to wait."""
        ip = self.ip(request)
        wait = self.throttle.failed(ip)
        self.audit.write(who=name[:64] or "-", role="-", ip=ip, action="login",
                         outcome=f"failed; address waits {wait:.0f} s" if wait else "failed")
        return wait

    @property
    def auth(self) -> Authenticator:  # built per request: the config may have been reloaded
        return Authenticator(self.listener.cfg.console, is_loopback(self.host))

    # ------------------------------------------------------------------ who is asking
    def identify(self, request: Request) -> Identity | None:
        auth = self.auth
        header = request.headers.get("authorization")
        if header:
            ip = self.ip(request)
            wait = self.throttle.wait_s(ip)
            if wait > 0:
                raise Denied(429, f"too many failed sign-ins from {ip}; try again in {wait:.0f} s", wait)
            who = auth.from_header(header, request.method in READ_METHODS)
            scheme = header.partition(" ")[0].lower()
            checked = (scheme == "bearer" and bool(auth.console.token)) or \
                (scheme == "basic" and request.method in READ_METHODS)
            if who is None and checked:  # a credential was checked and was wrong
                self.sign_in_failed(request, "token" if scheme == "bearer" else "basic")
            return who
        user = request.session.get("user")
        if user and request.session.get("exp", 0) > time.time():
            if request.session.get("local"):  # an open-local session is worth nothing once credentials exist
                if auth.open_local:
                    return Identity("local", "admin", "local")
            elif (role := auth.current_role(user)) is not None:
                return Identity(user, role, "session")
        if auth.open_local:
            request.session["user"] = "local"
            request.session["local"] = True
            request.session["exp"] = time.time() + 3600 * self.listener.cfg.console.session_hours
            return Identity("local", "admin", "local")
        return None

    def csrf(self, request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = secrets.token_urlsafe(24)
        return str(token)

    async def require(self, request: Request, role: str = "viewer") -> Identity:
        """The caller, allowed ``role``; state-changing requests must also carry the session's CSRF token."""
        who = self.identify(request)
        if who is None:
            raise Denied(401, "log in first")
        if role == "admin" and not who.admin:
            self.audit.write(who=who.name, role=who.role, ip=self.ip(request), action="denied",
                             target=request.url.path, outcome="forbidden")
            raise Denied(403, "this needs the admin role")
        if request.method not in READ_METHODS and who.via != "bearer":
            form = await request.form()
            given = form.get("csrf") or request.headers.get("x-csrf-token")
            if not csrf_ok(request.session.get("csrf"), str(given) if given else None):
                self.audit.write(who=who.name, role=who.role, ip=self.ip(request), action="csrf-refused",
                                 target=request.url.path, outcome="refused")
                raise Denied(403, "missing or wrong CSRF token; reload the page and try again")
        return who

    @staticmethod
    def ip(request: Request) -> str:
        return request.client.host if request.client else "?"

    def page(self, request: Request, template: str, status: int = 200, **ctx: Any) -> Response:
        who = self.identify(request)
        ctx.update(request=request, who=who, csrf=self.csrf(request), node=self.listener.cfg.node,
                   open_local=self.auth.open_local)
        return self.templates.TemplateResponse(request, template, ctx, status_code=status)


def build_app(console: Console) -> Starlette:
    from node.web import views

    async def denied(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Denied)
        if request.url.path.startswith("/api/") or request.url.path == "/metrics" or \
                request.headers.get("authorization"):
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
            if exc.retry_after_s:
                headers["Retry-After"] = str(int(exc.retry_after_s) + 1)
            return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)
        if exc.status == 401:
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        return console.page(request, "message.html", status=exc.status, title="Not allowed", error_text=exc.message)

    async def not_found(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("not found\n", status_code=404)

    async def metrics(request: Request) -> Response:
        await console.require(request)
        return Response(console.metrics.exposition(), media_type=CONTENT_TYPE)

    routes = views.routes(console) + [
        Route("/metrics", metrics),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    hours = console.listener.cfg.console.session_hours
    return Starlette(routes=routes, exception_handlers={Denied: denied, 404: not_found},
                     middleware=[Middleware(SessionMiddleware, secret_key=console.secret, session_cookie="ainode",
                                            max_age=int(hours * 3600), same_site="strict",
                                            https_only=False)])


class WebServer:
    """uvicorn on a daemon thread; ``start``/``stop`` as the listener's other services."""

    def __init__(self, listener: Listener, host: str, port: int, config_path: str | Path | None = None):
        self.console = Console(listener, host, config_path)
        self.app = build_app(self.console)
        self._config = uvicorn.Config(self.app, host=host, port=port, log_level="warning", access_log=False,
                                      lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(self._config)
        self._thread = threading.Thread(target=self._run, name="ainode-web", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve())
        except BaseException as exc:  # reported by start()
            self._error = exc

    @property
    def port(self) -> int:
        for s in self.server.servers:
            for sock in s.sockets:
                return int(sock.getsockname()[1])
        return int(self._config.port)

    def start(self, timeout: float = 15.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"console did not start on {self._config.host}:{self._config.port}: "
                              f"{self._error or 'address in use?'}")
            time.sleep(0.02)
        self.console.metrics.start()
        log.info("console on http://%s:%d/", self._config.host, self.port)

    def stop(self) -> None:
        self.console.metrics.stop()
        self.server.should_exit = True
        self._thread.join(10)
