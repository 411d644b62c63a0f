"""Pure pieces of the console: secret masking round trip, problem-to-field mapping, loopback rules."""

from __future__ import annotations

from node.config import Config, ConsoleConfig, Problem
from node.web.audit import mask_secrets
from node.web.auth import Authenticator, hash_password, is_loopback, refusal
from node.web.configedit import _unmask, field_errors


def test_masked_secrets_shown_in_a_form_come_back_unchanged() -> None:
    stored = {"openai": {"api_key": "REAL-KEY", "model": "m"}, "bearer_token": "T0K"}
    shown = mask_secrets(stored)
    assert shown == {"openai": {"api_key": "***", "model": "m"}, "bearer_token": "***"}
    edited = {**shown, "openai": {**shown["openai"], "model": "m2"}}
    assert _unmask(edited, stored) == {"openai": {"api_key": "REAL-KEY", "model": "m2"}, "bearer_token": "T0K"}
    assert _unmask({"openai": {"api_key": "NEW"}}, stored)["openai"]["api_key"] == "NEW"


def test_problems_land_on_the_edited_field() -> None:
    probs = [Problem("destinations[1].port", "port 99999 is out of range"), Problem("destinations[1]", "needs url"),
             Problem("routes[0].destinations[0]", "unknown destination 'x'"), Problem("destinations[0].port", "z")]
    by_field, other = field_errors(probs, "destinations", 1)
    assert by_field == {"port": "port 99999 is out of range"}
    assert other == ["needs url", "routes[0].destinations[0]: unknown destination 'x'", "destinations[0].port: z"]


def test_exposure_rules() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    open_cfg = Config.model_validate({"node": {"web_host": "0.0.0.0"}})
    assert "node.web_host" in (refusal(open_cfg) or "")
    assert refusal(Config.model_validate({"node": {"web_host": "0.0.0.0"}, "console": {"token": "t"}})) is None
    assert refusal(Config.model_validate({"node": {"web_host": "0.0.0.0", "web_port": None}})) is None
    users = ConsoleConfig(users=[{"name": "ada", "role": "admin", "password_hash": hash_password("pw")}])
    auth = Authenticator(users, loopback=True)
    assert not auth.open_local, "configured credentials apply on loopback too"
    assert auth.check_password("ada", "pw").role == "admin"
    assert auth.check_password("ada", "nope") is None and auth.check_password("bob", "pw") is None
    assert Authenticator(ConsoleConfig(), loopback=True).open_local
    assert not Authenticator(ConsoleConfig(), loopback=False).open_local


def test_login_throttle_waits_double_and_clear() -> None:
    from node.web.auth import LoginThrottle

    now = [1000.0]
    th = LoginThrottle(max_failures=3, base_s=30, window_s=900, clock=lambda: now[0])
    assert [th.failed("10.0.0.9") for _ in range(2)] == [0.0, 0.0] and th.wait_s("10.0.0.9") == 0
    assert th.failed("10.0.0.9") == 30 and th.wait_s("10.0.0.9") == 30
    assert th.failed("10.0.0.9") == 60 and th.failed("10.0.0.9") == 120  # doubling with each failure
    assert th.wait_s("10.0.0.8") == 0  # per address: another one is not held
    for _ in range(10):
        th.failed("10.0.0.9")
    assert th.wait_s("10.0.0.9") == LoginThrottle.CAP_S
    th.succeeded("10.0.0.9")
    assert th.wait_s("10.0.0.9") == 0 and th.failed("10.0.0.9") == 0
    now[0] += 901  # failures older than the window are forgotten
    assert th.failed("10.0.0.9") == 0 and th.failed("10.0.0.9") == 0 and th.failed("10.0.0.9") == 30


def test_audit_log_is_bounded_by_renaming_never_rewriting(tmp_path) -> None:
    import json

    from node.web.audit import AuditLog

    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=4096, keep=2)
    first = log.write(who="ada", role="admin", ip="10.0.0.1", action="login")
    for i in range(200):  # a flood of failed sign-ins
        log.write(who=f"x{i}", role="-", ip="10.6.6.6", action="login", outcome="failed")
    rotated = log.rotated()
    assert len(rotated) == 2, rotated  # the newest two renamed files stay, older ones go
    assert log.path.stat().st_size <= 4096 + 300 and all(p.stat().st_size > 4096 for p in rotated)
    for p in rotated + [log.path]:  # every file is whole JSON lines
        assert all(json.loads(line)["action"] == "login" for line in p.read_text().splitlines())
    assert first["who"] not in "".join(p.read_text() for p in rotated + [log.path])  # the oldest went
    newest = log.tail(5)
    assert [e["who"] for e in newest] == [f"x{i}" for i in range(199, 194, -1)]
    assert len(log.tail(10_000)) == len(log.path.read_text().splitlines())
