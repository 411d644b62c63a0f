"""A webhook receiver written from the README works: its verification code, run as printed, accepts what the
node really sends (over HTTP, from the Notifier) and rejects a changed body or the wrong secret."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
from test_notify import STUDY_TAGS, _Hook, _result

from node.notify import Notifier, NotifyConfig, events_from_result
from node.state import State

README = Path(__file__).resolve().parent.parent / "README.md"
SECRET = "receiver-secret-ü"  # non-ASCII on purpose: the README says the key is the secret's UTF-8 bytes


def readme_verify():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    (code,) = [b for b in blocks if "def verify(" in b]
    assert len(code.strip().splitlines()) <= 12, "the README promises a short example"
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # exactly the text a receiver would copy
    return namespace["verify"]


@pytest.mark.parametrize("via_env", [False, True])
def test_readme_example_verifies_a_received_webhook(tmp_path: Path, monkeypatch, via_env: bool) -> None:
    verify = readme_verify()
    hook = _Hook()
    threading.Thread(target=hook.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    state = State(tmp_path)
    channel = {"kind": "webhook", "name": "pager", "url": f"http://127.0.0.1:{hook.server_address[1]}/hook"}
    if via_env:
        monkeypatch.setenv("HOOK_SECRET", SECRET)
        channel["secret_env"] = "HOOK_SECRET"
    else:
        channel["secret"] = SECRET
    notifier = Notifier(state, NotifyConfig.model_validate({"channels": [channel]}))
    try:
        now = time.time()
        events = events_from_result(_result(), STUDY_TAGS, {"completed": now - 5, "detected": now})
        notifier.notify(events[0])
        hook.wait_for(1, timeout=30)
    finally:
        notifier.stop()
        hook.shutdown()
        hook.server_close()
        state.close()
    headers, body = hook.requests[0]
    signature = headers["X-AINode-Signature"]
    assert re.fullmatch(r"sha256=[0-9a-f]{64}", signature)
    assert verify(body, signature, SECRET)
    payload = json.loads(body)
    assert payload["finding"] == "Intracranial haemorrhage" and payload["event_id"] == headers["X-AINode-Event-Id"]
    assert not verify(body, signature, "another secret")
    assert not verify(body.replace(b"Intracranial", b"Extracranial"), signature, SECRET)
    reserialised = json.dumps(payload).encode()  # why the README says: the raw bytes, before parsing
    assert reserialised != body and not verify(reserialised, signature, SECRET)
    assert not verify(body, signature.replace("sha256=", "sha1="), SECRET)
