"""Who may hold a connection to the listener, and for how long, before and after association.

Why: ``node.max_associations`` protects the node's disk and threads from too many *associations*.
A TCP connection that has not yet sent its A-ASSOCIATE-RQ is no association, and used to count
against that limit from accept onwards: 33 idle sockets from anywhere (or one byte every ten
seconds, "slow loris") locked every modality out. Now:

- a connection counts against ``max_associations`` only once its association is accepted
  (called AE ours, calling AE a configured peer);
- until then it must deliver a complete A-ASSOCIATE-RQ within ``handshake_timeout_s`` of TCP accept,
  however slowly its bytes trickle in (the ARTIM timer of PS3.8 9.1.5, counted from accept);
- at most ``max_pending_per_host`` such connections per source address and ``max_pending`` in all:
  a new connection over either cap closes the *oldest* pre-association connection (of that address,
  or overall). A flood therefore only ever holds the newest sockets, and a modality, which sends its
  A-ASSOCIATE-RQ within milliseconds of connecting, gets through.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class Closable(Protocol):
    address: tuple[str, int]

    def close(self) -> None: ...


@dataclass(frozen=True)
class Limits:
    max_associations: int = 32
    max_pending: int = 256
    max_pending_per_host: int = 16
    handshake_timeout_s: float = 10.0


class Admission:
    """Thread-safe book of pre-association and associated connections."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._lock = threading.Lock()
        self._pending: OrderedDict[Closable, float] = OrderedDict()  # oldest first
        self._accepted: set[Closable] = set()
        self._evicted = 0
        self._last_warning = -1e9

    def arrived(self, conn: Closable) -> float:
        """A TCP connection was accepted; returns its handshake deadline (time.monotonic)."""
        host = conn.address[0]
        victim = None
        with self._lock:
            same_host = [c for c in self._pending if c.address[0] == host]
            if len(same_host) >= self.limits.max_pending_per_host:
                victim = same_host[0]
            elif len(self._pending) >= self.limits.max_pending:
                victim = next(iter(self._pending))
            if victim is not None:
                del self._pending[victim]
                self._evicted += 1
            now = time.monotonic()
            self._pending[conn] = now
        if victim is not None:
            victim.close()
            self._warn(victim, host)
        return now + self.limits.handshake_timeout_s

    def _warn(self, victim: Closable, host: str) -> None:
        now = time.monotonic()
        if now - self._last_warning < 10:
            return
        self._last_warning = now
        which = (f"node.max_pending_per_host ({self.limits.max_pending_per_host}) from {host}"
                 if victim.address[0] == host else f"node.max_pending ({self.limits.max_pending})")
        log.warning("too many connections without an association: closed the oldest, from %s (%s; %d closed so"
                    " far)", victim.address[0], which, self._evicted)

    def admit(self, conn: Closable) -> bool:
        """The association is acceptable: count it against max_associations, or say there is no room."""
        with self._lock:
            if len(self._accepted) >= self.limits.max_associations:
                return False
            self._pending.pop(conn, None)
            self._accepted.add(conn)
            return True

    def gone(self, conn: Closable) -> None:
        with self._lock:
            self._pending.pop(conn, None)
            self._accepted.discard(conn)

    def overdue(self) -> list[Closable]:
        """Pre-association connections past the handshake deadline, each returned once (and no longer
        counted as pending: the caller closes them)."""
        limit = time.monotonic() - self.limits.handshake_timeout_s
        with self._lock:
            late = [c for c, t in self._pending.items() if t < limit]
            for c in late:
                del self._pending[c]
            return late

    def associations(self) -> int:
        with self._lock:
            return len(self._accepted)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def everyone(self) -> list[Closable]:
        with self._lock:
            return [*self._pending, *self._accepted]
