"""Who may use the console: local users (argon2id hashes), a bearer token from the environment, roles.

Rules (README "Console"):

* On a loopback address with no credentials configured, whoever can reach the port is the local
  administrator, as with any other local admin tool. Beyond loopback the node refuses to start unless
  ``console.users`` or ``console.token`` is set (``refusal``).
* ``viewer`` reads; ``admin`` also runs actions and edits the configuration.
* Browsers log in and get a signed session cookie; every state-changing request must carry the
  session's CSRF token. API clients and Prometheus send ``Authorization: Bearer <token>`` (no cookie, so
  no CSRF exposure) or HTTP Basic for read-only requests.
* Secrets are compared in constant time (``hmac.compare_digest`` and argon2's own verify).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from node.config import Config, ConsoleConfig

ROLES = ("viewer", "admin")
_HASHER = PasswordHasher()
_DUMMY_HASH = _HASHER.hash("not-a-real-password")  # unknown users cost the same time as known ones


@dataclass(frozen=True)
class Identity:
    name: str
    role: str
    via: str  # session | bearer | basic | local

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refusal(cfg: Config) -> str | None:
    """Why the console must not start with this configuration, or None."""
    if not cfg.node.web_port or is_loopback(cfg.node.web_host) or cfg.console.has_credentials():
        return None
    return (f"node.web_host is {cfg.node.web_host!r}, beyond loopback, but no console credentials are configured: "
            "add console.users (hashes from `ainode console hash-password`) or set AINODE_CONSOLE__TOKEN, "
            "or set node.web_host: 127.0.0.1")


def session_secret(storage_dir: Path) -> str:
    """Kept in the storage folder (mode 0600) so sessions survive a restart."""
    path = Path(storage_dir) / "console.secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(32)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(value)
        tmp.chmod(0o600)
        tmp.replace(path)
        return value


class Authenticator:
    def __init__(self, console: ConsoleConfig, loopback: bool):
        self.console = console
        self.loopback = loopback

    @property
    def open_local(self) -> bool:
        """Loopback without credentials: no login, local administrator."""
        return self.loopback and not self.console.has_credentials()

    def check_password(self, name: str, password: str) -> Identity | None:
        user = next((u for u in self.console.users if hmac.compare_digest(u.name.encode(), name.encode())), None)
        try:
            _HASHER.verify(user.password_hash if user else _DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            return None
        return Identity(user.name, user.role, "session") if user else None

    def current_role(self, name: str) -> str | None:
        """A user's role now (the config may have been reloaded since they logged in)."""
        user = next((u for u in self.console.users if u.name == name), None)
        return user.role if user else None

    def from_header(self, header: str | None, read_only: bool) -> Identity | None:
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and self.console.token:
            if hmac.compare_digest(value.strip().encode(), self.console.token.encode()):
                return Identity("token", self.console.token_role, "bearer")
        elif scheme == "basic" and read_only:
            try:
                name, _, pw = base64.b64decode(value.strip()).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            ident = self.check_password(name, pw)
            return Identity(ident.name, ident.role, "basic") if ident else None
        return None


def csrf_ok(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected).encode(), str(given).encode())


class LoginThrottle:
    """Failed sign-ins per client address: after ``max_failures`` within ``window_s`` the address waits
    ``base_s``, doubling with each further failure (capped), and its attempts are not even checked
    meanwhile, so guessing passwords is slow and cannot keep the argon2 verifier (deliberately costly)
    busy. Per address, not per user name: a stranger cannot lock a radiologist out by failing their name.
    Kept in memory: a restart forgets, which only gives an attacker back a few attempts."""

    CAP_S = 900.0

    def __init__(self, max_failures: int = 5, base_s: float = 30.0, window_s: float = 900.0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_failures, self.base_s, self.window_s, self.clock = max_failures, base_s, window_s, clock
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}
        self._until: dict[str, float] = {}

    def wait_s(self, address: str) -> float:
        """Seconds this address must still wait before a sign-in is checked (0: go ahead)."""
        with self._lock:
            return max(0.0, self._until.get(address, 0.0) - self.clock())

    def failed(self, address: str) -> float:
        """Record a failure; returns the wait it now has (0 while under the limit)."""
        now = self.clock()
        with self._lock:
            recent = [t for t in self._failures.get(address, []) if now - t < self.window_s] + [now]
            self._failures[address] = recent[-4 * self.max_failures:]
            over = len(recent) - self.max_failures
            if over < 0:
                return 0.0
            wait = min(self.CAP_S, self.base_s * 2 ** over)
            self._until[address] = now + wait
            if len(self._until) > 10_000:  # a scan from many addresses must not grow this without end
                for k in [k for k, u in self._until.items() if u < now][:5_000]:
                    self._until.pop(k, None)
                    self._failures.pop(k, None)
            return wait

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)
            self._until.pop(address, None)
