"""Side door for IT staff and monitoring: ``/`` status page, ``/api/status``, ``/healthz``, ``/metrics``.

Read-only, standard library only, so it keeps working when everything else is in trouble.
Patient names and IDs are never shown: studies are listed by UID and accession number only.
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.service import Listener

log = logging.getLogger(__name__)


def health(listener: Listener) -> tuple[bool, dict[str, Any]]:
    checks: dict[str, Any] = {}
    try:
        listener.state.one("SELECT 1")
        checks["state_db"] = "ok"
    except Exception as exc:
        checks["state_db"] = f"error: {exc}"
    try:
        listener.app.connection_for_write().ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"error: {exc}"
    free_mb = shutil.disk_usage(listener.spool.root).free // (1024 * 1024)
    checks["disk_free_mb"] = free_mb
    checks["disk"] = "ok" if free_mb >= listener.cfg.node.min_free_disk_mb else "low"
    checks["listener"] = "ok" if listener.scp.server is not None else "stopped"
    lifecycle = getattr(listener, "lifecycle", None)
    if lifecycle is not None:  # node/lifecycle: "full" says why nothing can be deleted
        st = lifecycle.status
        checks["storage"] = "ok" if st.get("state") != "full" else f"full: {st.get('reason')}"
        checks["storage_detail"] = {k: st.get(k) for k in ("state", "disk_used_percent", "high_water_percent",
                                                           "low_water_percent", "deletable", "held", "purged_total")}
    ok = all(v == "ok" for k, v in checks.items() if k not in ("disk_free_mb", "storage_detail"))
    return ok, checks


def _label(value: object) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics(listener: Listener) -> str:
    st = listener.state
    lines = ["# HELP ainode_studies Studies by state.", "# TYPE ainode_studies gauge"]
    for r in st.query("SELECT state, COUNT(*) n FROM studies GROUP BY state"):
        lines.append(f'ainode_studies{{state="{r["state"]}"}} {r["n"]}')
    lines += ["# HELP ainode_jobs Jobs by pipeline and state.", "# TYPE ainode_jobs gauge"]
    for r in st.query("SELECT pipeline, state, COUNT(*) n FROM jobs GROUP BY pipeline, state"):
        lines.append(f'ainode_jobs{{pipeline="{r["pipeline"]}",state="{r["state"]}"}} {r["n"]}')
    n = st.one("SELECT COUNT(*) n, COALESCE(SUM(size),0) b FROM instances")
    lines += ["# HELP ainode_instances_stored Instances in the spool.", "# TYPE ainode_instances_stored gauge",
              f"ainode_instances_stored {n['n']}", "# TYPE ainode_spool_bytes gauge", f"ainode_spool_bytes {n['b']}"]
    tables = {r["name"] for r in st.query("SELECT name FROM sqlite_master WHERE type='table'")}
    if "deliveries" in tables:
        lines += ["# HELP ainode_deliveries Result deliveries by destination and state.",
                  "# TYPE ainode_deliveries gauge"]
        for r in st.query("SELECT destination, state, COUNT(*) n FROM deliveries GROUP BY destination, state"):
            lines.append(f'ainode_deliveries{{destination="{r["destination"]}",state="{r["state"]}"}} {r["n"]}')
    if "notify_deliveries" in tables:
        lines += ["# HELP ainode_notifications Critical-finding notifications by channel and state.",
                  "# TYPE ainode_notifications gauge"]
        for r in st.query("SELECT channel, state, COUNT(*) n FROM notify_deliveries GROUP BY channel, state"):
            lines.append(f'ainode_notifications{{channel="{r["channel"]}",state="{r["state"]}"}} {r["n"]}')
    lines += ["# HELP ainode_critical_findings Findings flagged critical by finished jobs, by pipeline and finding.",
              "# TYPE ainode_critical_findings gauge"]
    for r in st.query("SELECT j.pipeline, json_extract(f.value, '$.label') AS finding, COUNT(*) n FROM jobs j,"
                      " json_each(j.summary, '$.findings') f WHERE j.summary IS NOT NULL"
                      " AND json_extract(f.value, '$.critical') AND json_extract(f.value, '$.present')"
                      " GROUP BY j.pipeline, finding"):
        lines.append(f'ainode_critical_findings{{pipeline="{_label(r["pipeline"])}",finding="{_label(r["finding"])}"}}'
                     f' {r["n"]}')
    lines += ["# TYPE ainode_disk_free_bytes gauge",
              f"ainode_disk_free_bytes {shutil.disk_usage(listener.spool.root).free}"]
    return "\n".join(lines) + "\n"


def _page(data: dict[str, Any]) -> str:
    rows = []
    for s in data["studies"]:
        jobs = ", ".join(f"{j['pipeline']}: {j['state']}" for j in s["jobs"])
        state = ("CRITICAL " if s["critical"] else "") + (s["state"] or "")
        err = "<br>".join(html.escape(str(e)) for e in s["errors"])
        rows.append(f"<tr class='{'crit' if s['critical'] else ''}'><td>{html.escape(s['study_uid'])}</td>"
                    f"<td>{html.escape(state)}</td><td>{s['instances']}</td><td>{html.escape(s['route'] or '-')}</td>"
                    f"<td>{html.escape(jobs)}</td><td>{_t(s['first_received'])}</td><td>{_t(s['completed'])}</td>"
                    f"<td>{_t(s['finished'])}</td><td>{html.escape(json.dumps(s.get('delivery') or {}))}</td>"
                    f"<td>{err}</td></tr>")
    node = data.get("node", {})
    return ("<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='10'>"
            "<title>ainode status</title><style>body{font-family:sans-serif}td,th{padding:2px 8px;"
            "border-bottom:1px solid #ddd;font-size:13px}.crit{background:#fdd}</style></head><body>"
            f"<h1>ainode {html.escape(str(node.get('ae_title', '')))}</h1>"
            "<table><tr><th>Study UID</th><th>State</th><th>Images</th><th>Route</th><th>Jobs</th>"
            "<th>Received</th><th>Complete</th><th>Finished</th><th>Delivery</th><th>Errors</th></tr>"
            + "".join(rows) + "</table></body></html>")


def _t(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


class WebServer:
    def __init__(self, listener: Listener, host: str, port: int):
        self.listener = listener
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("web: " + fmt, *args)

            def _send(self, code: int, body: str, ctype: str) -> None:
                data = body.encode("utf-8")
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                from node.cli import status_data

                path = self.path.split("?")[0]
                try:
                    if path == "/healthz":
                        ok, checks = health(outer.listener)
                        self._send(200 if ok else 503, json.dumps(checks), "application/json")
                    elif path == "/metrics":
                        self._send(200, metrics(outer.listener), "text/plain; version=0.0.4")
                    elif path == "/api/status":
                        self._send(200, json.dumps(status_data(outer.listener.cfg), default=str), "application/json")
                    elif path == "/":
                        self._send(200, _page(status_data(outer.listener.cfg)), "text/html; charset=utf-8")
                    else:
                        self._send(404, "not found\n", "text/plain")
                except Exception as exc:
                    log.exception("web request %s failed", path)
                    self._send(500, f"error: {exc}\n", "text/plain")

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ainode-web", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("status page on http://%s:%d/", *self.httpd.server_address[:2])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
