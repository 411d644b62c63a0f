"""The console's pages: dashboard, studies, one study's timeline, audit log, login, and the JSON API."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from node.web import charts, data
from node.web.auth import csrf_ok
from node.web.health import health

if TYPE_CHECKING:
    from node.web.server import Console


def routes(c: Console) -> list[Route]:
    from node.web import actions, configedit

    async def healthz(request: Request) -> Response:
        ok, checks = await run_in_threadpool(health, c.listener)
        return JSONResponse(checks, status_code=200 if ok else 503)

    async def api_status(request: Request) -> Response:
        await c.require(request)
        from node.status import status_data

        body = await run_in_threadpool(status_data, c.listener.cfg)
        return Response(json.dumps(body, default=str), media_type="application/json")

    async def api_dashboard(request: Request) -> Response:
        await c.require(request)
        return JSONResponse(await run_in_threadpool(data.dashboard, c.listener))

    async def login_form(request: Request) -> Response:
        return c.page(request, "login.html", next=request.query_params.get("next", "/"), error="")

    async def login(request: Request) -> Response:
        form = await request.form()
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        nxt = str(form.get("next") or "/")
        nxt = nxt if nxt.startswith("/") and not nxt.startswith("//") else "/"
        if not csrf_ok(request.session.get("csrf"), str(form.get("csrf") or "")):
            return c.page(request, "login.html", status=403, next=nxt, error="The form expired; try again.")
        wait = c.throttle.wait_s(c.ip(request))
        if wait > 0:  # not even checked: guessing stays slow, and argon2 is not kept busy
            c.audit.write(who=name[:64] or "-", role="-", ip=c.ip(request), action="login", outcome="throttled")
            page = c.page(request, "login.html", status=429, next=nxt,
                          error=f"Too many failed sign-ins from this address; try again in {wait:.0f} s.")
            page.headers["Retry-After"] = str(int(wait) + 1)
            return page
        who = await run_in_threadpool(c.auth.check_password, name, password)
        if who is None:
            wait = c.sign_in_failed(request, name)
            error = "Wrong name or password." + (f" This address must wait {wait:.0f} s before trying again."
                                                 if wait else "")
            return c.page(request, "login.html", status=401, next=nxt, error=error)
        c.throttle.succeeded(c.ip(request))
        c.audit.write(who=name[:64], role=who.role, ip=c.ip(request), action="login", outcome="ok")
        request.session.clear()
        request.session.update(user=who.name, exp=time.time() + 3600 * c.listener.cfg.console.session_hours)
        c.csrf(request)
        return RedirectResponse(nxt, status_code=303)

    async def logout(request: Request) -> Response:
        who = await c.require(request)
        c.audit.write(who=who.name, role=who.role, ip=c.ip(request), action="logout")
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    async def dashboard(request: Request) -> Response:
        await c.require(request)
        d = await run_in_threadpool(data.dashboard, c.listener)
        recent = await run_in_threadpool(data.search_studies, c.listener, data.StudyQuery(limit=15))
        worst = max([v["p95"] or 0 for v in d["latency"].values()] or [0])
        return c.page(request, "dashboard.html", d=d, recent=recent, worst=worst, charts=charts)

    async def studies(request: Request) -> Response:
        await c.require(request)
        p = request.query_params
        sq = data.StudyQuery(q=p.get("q", ""), state=p.get("state", ""), route=p.get("route", ""),
                             date_from=p.get("from", ""), date_to=p.get("to", ""))
        rows = await run_in_threadpool(data.search_studies, c.listener, sq)
        return c.page(request, "studies.html", rows=rows, sq=sq, states=data.STATES,
                      route_names=[r.name for r in c.listener.cfg.routes])

    async def study(request: Request) -> Response:
        await c.require(request)
        uid = request.path_params["uid"]
        s, steps, jobs = await run_in_threadpool(data.timeline, c.listener, uid)
        if s is None:
            return c.page(request, "message.html", status=404, title="No such study",
                          error_text="No study with this UID is known here.")
        done_jobs = [j for j in jobs if j["state"] == "done"]
        return c.page(request, "study.html", s=s, steps=steps, jobs=jobs, done_jobs=done_jobs,
                      destinations=[d.name for d in c.listener.cfg.destinations], quote=quote,
                      message=request.query_params.get("msg", ""))

    async def audit(request: Request) -> Response:
        await c.require(request)
        return c.page(request, "audit.html", entries=c.audit.tail(300), dumps=lambda v: json.dumps(v, default=str))

    return [
        Route("/healthz", healthz),
        Route("/api/status", api_status),
        Route("/api/dashboard", api_dashboard),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", dashboard),
        Route("/studies", studies),
        Route("/studies/{uid}", study),
        Route("/audit", audit),
        *actions.routes(c),
        *configedit.routes(c),
    ]

