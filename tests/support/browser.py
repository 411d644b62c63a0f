"""Headless Debian ``chromium`` driven over the DevTools protocol with ``websocket-client``: just enough
to log in, fill forms, click, read the page and take screenshots, as an IT person would."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket

from support.node import free_port, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class Browser:
    def __init__(self, workdir: Path, width: int = 1280, height: int = 900):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = open(self.workdir / "chromium.log", "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
             f"--remote-debugging-port={self.port}", f"--user-data-dir={self.workdir / 'profile'}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        page = wait_for(self._page_target, 60, 0.2, "chromium DevTools endpoint")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], suppress_origin=True, timeout=60)
        self._id = 0
        self.send("Page.enable")
        self.send("Runtime.enable")

    def _page_target(self) -> dict[str, Any] | None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {self.proc.returncode}; see {self.workdir / 'chromium.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
                targets = json.loads(r.read())
        except OSError:
            return None
        return next((t for t in targets if t.get("type") == "page"), None)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))

    def js(self, expression: str) -> Any:
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"javascript failed: {r['exceptionDetails'].get('text')} in {expression[:200]}")
        return r.get("result", {}).get("value")

    # ------------------------------------------------------------------ what a person does
    def _loaded_after(self, action: Any) -> None:
        """Run ``action`` and wait until a new document has finished loading."""
        self.js("window.__old = true")
        action()
        wait_for(lambda: self._ready_new(), 60, 0.1, "page load")

    def _ready_new(self) -> bool:
        try:
            return bool(self.js("window.__old === undefined && document.readyState === 'complete'"))
        except (RuntimeError, websocket.WebSocketException):
            return False

    def goto(self, url: str) -> None:
        self._loaded_after(lambda: self.send("Page.navigate", url=url))

    def fill(self, selector: str, value: str) -> None:
        ok = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return false;"
                     f" e.value = {json.dumps(value)}; e.dispatchEvent(new Event('input', {{bubbles: true}}));"
                     " return true; })()")
        assert ok, f"no element {selector} on {self.url}"

    def click(self, selector: str, navigates: bool = True) -> None:
        script = (f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return false;"
                  " setTimeout(() => e.click(), 0); return true; })()")
        if navigates:
            found: list[bool] = []
            self._loaded_after(lambda: found.append(bool(self.js(script))))
            assert found[0], f"no element {selector}"
        else:
            assert self.js(script), f"no element {selector} on {self.url}"

    def text(self, selector: str = "body") -> str:
        return str(self.js(f"(document.querySelector({json.dumps(selector)}) || {{innerText: ''}}).innerText"))

    def exists(self, selector: str) -> bool:
        return bool(self.js(f"document.querySelector({json.dumps(selector)}) !== null"))

    @property
    def url(self) -> str:
        return str(self.js("location.href"))

    def post(self, path: str, fields: dict[str, str]) -> int:
        """A POST from the page's own origin and cookies (what a forged form or script would send)."""
        body = json.dumps(fields)
        return int(self.js(f"fetch({json.dumps(path)}, {{method: 'POST', redirect: 'manual', body: new "
                           f"URLSearchParams({body})}}).then(r => r.status)"))

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()
        time.sleep(0)
