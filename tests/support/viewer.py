"""OHIF 3 (the ``@ohif/app`` npm package's built ``dist/``) in headless Debian Chromium, for viewer tests.

``./scripts/test`` unpacks the pinned package outside git (``OHIF_DIST`` below). ``ViewerServer`` serves
that ``dist/`` with an ``app-config.js`` whose DICOMweb data source is ``/dicom-web`` on the same origin,
and forwards ``/dicom-web`` to a test Orthanc (no CORS). ``Browser`` drives Chromium over the DevTools
protocol with ``websocket-client`` (Playwright's own browser downloads do not work here): navigate,
evaluate JavaScript, take screenshots, and collect console errors and uncaught exceptions.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
import websocket

from .orthanc import free_port

OHIF_VERSION = "3.13.2"
OHIF_DIST = Path(os.environ.get("AINODE_OHIF_DIST") or Path(os.environ.get("AINODE_CACHE") or
                 Path.home() / ".cache" / "ainode") / f"ohif-{OHIF_VERSION}" / "package" / "dist")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

APP_CONFIG = """window.config = {
  routerBasename: null, extensions: [], modes: [], customizationService: {}, showStudyList: true,
  maxNumberOfWebWorkers: 2, showWarningMessageForCrossOrigin: false, showCPUFallbackMessage: false,
  showLoadingIndicator: true, strictZSpacingForVolumeViewport: true, showErrorDetails: 'always',
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb', sourceName: 'orthanc',
    configuration: {
      friendlyName: 'test Orthanc', name: 'orthanc',
      wadoUriRoot: '%(root)s', qidoRoot: '%(root)s', wadoRoot: '%(root)s',
      qidoSupportsIncludeField: false, supportsReject: false, imageRendering: 'wadors',
      thumbnailRendering: 'wadors', enableStudyLazyLoad: true, supportsFuzzyMatching: false,
      supportsWildcard: true, dicomUploadEnabled: false, omitQuotationForMultipartRequest: true,
      bulkDataURI: { enabled: true, relativeResolution: 'studies' },
    },
  }],
};
"""

TYPES = {".js": "application/javascript", ".css": "text/css", ".html": "text/html", ".wasm": "application/wasm",
         ".json": "application/json", ".svg": "image/svg+xml", ".png": "image/png", ".woff2": "font/woff2",
         ".ico": "image/x-icon"}


class ViewerServer:
    """OHIF's static files plus a same-origin reverse proxy of ``/dicom-web`` to Orthanc."""

    def __init__(self, orthanc_http: str, dist: Path = OHIF_DIST):
        if not (dist / "index.html").exists():
            raise FileNotFoundError(f"OHIF dist not found at {dist}; ./scripts/test installs @ohif/app "
                                    f"{OHIF_VERSION} there (or set AINODE_OHIF_DIST)")
        self.dist, self.orthanc = dist, orthanc_http.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = (APP_CONFIG % {"root": f"{self.url}/dicom-web"}).encode()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path.startswith("/dicom-web"):
                    headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "host")}
                    try:
                        r = requests.get(server.orthanc + self.path, headers=headers, timeout=60)
                    except requests.RequestException as exc:
                        self._send(502, str(exc).encode(), "text/plain")
                        return
                    try:
                        self._send(r.status_code, r.content, r.headers.get("Content-Type", "application/octet-stream"))
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the page navigated away; the browser dropped the request
                    return
                if path == "/app-config.js":
                    self._send(200, config, TYPES[".js"])
                    return
                f = (server.dist / path.lstrip("/")).resolve()
                if not f.is_file() or server.dist.resolve() not in f.parents:
                    f = server.dist / "index.html"  # the single-page app's own routes (/viewer?...)
                self._send(200, f.read_bytes(), TYPES.get(f.suffix, "application/octet-stream"))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ViewerServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, width: int = 1920, height: int = 1080):  # the smallest common reading-room screen
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="ainode-chromium-")
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-dev-shm-usage",
                f"--user-data-dir={self.profile}", f"--remote-debugging-port={self.port}",
                f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.errors: list[str] = []
        self._id = 0
        self._lock = threading.Lock()
        ws_url = self._page_ws()
        self.ws = websocket.create_connection(ws_url, timeout=120, suppress_origin=True)
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(method)

    def _page_ws(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            try:
                pages = [t for t in requests.get(f"http://127.0.0.1:{self.port}/json/list", timeout=1).json()
                         if t.get("type") == "page"]
                if pages:
                    return str(pages[0]["webSocketDebuggerUrl"])
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError("chromium's DevTools endpoint did not come up")

    def _event(self, msg: dict[str, Any]) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            self.errors.append(f"console.error: {text}")
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.errors.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            self.errors.append(f"log: {e.get('text')} {e.get('url', '')}")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        with self._lock:
            self._id += 1
            my = self._id
            self.ws.send(json.dumps({"id": my, "method": method, "params": params}))
            while True:
                msg = json.loads(self.ws.recv())
                if msg.get("id") == my:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return dict(msg.get("result", {}))
                self._event(msg)

    def pump(self, seconds: float) -> None:
        """Read events (console errors) for a while without sending anything."""
        end = time.monotonic() + seconds
        self.ws.settimeout(0.2)
        try:
            while time.monotonic() < end:
                try:
                    self._event(json.loads(self.ws.recv()))
                except websocket.WebSocketTimeoutException:
                    pass
        finally:
            self.ws.settimeout(120)

    def goto(self, url: str) -> None:
        self.errors.clear()
        self.call("Page.navigate", url=url)

    def js(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS failed: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def wait_js(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
        while time.monotonic() < deadline:
            v = self.js(guarded)
            if v:
                return v
            self.pump(0.5)
        raise TimeoutError(f"{what}: not true after {timeout} s ({expression})")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - best effort on teardown
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
