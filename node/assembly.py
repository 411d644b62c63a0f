"""When is a study complete? The earliest of the rules below, checked by the listener's scheduler.

- ``release``: the route says ``complete_on: release`` and every association that sent to the study
  has ended, the last one by A-RELEASE (not by abort or a crash of the node);
- ``expected``: every series declared an expected count (single-frame CR/DX, ImagesInAcquisition)
  and reached it, and nothing arrived for ``EXPECTED_GRACE_S`` (two-view studies arrive as two series);
- ``quiet``: ``quiet_seconds`` without a new instance;
- ``max_wait``: ``max_wait_seconds`` after the first instance.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

EXPECTED_GRACE_S = 1.0


@dataclass(frozen=True)
class CompletionRule:
    complete_on: str = "release"
    quiet_seconds: float = 5.0
    max_wait_seconds: float = 600.0


def completion_reason(study: sqlite3.Row, series: list[sqlite3.Row], released: bool,
                      rule: CompletionRule, now: float) -> str | None:
    """``released``: every association that sent to the study has ended, the last by A-RELEASE
    (an aborted or crashed association means the sender may resend, so it does not count)."""
    if study["n_instances"] <= 0:
        return None
    since_last = now - float(study["last_received"])
    if rule.complete_on == "release" and released:
        return "associations released"
    if series and all(s["expected"] and s["n_instances"] >= s["expected"] for s in series) \
            and since_last >= EXPECTED_GRACE_S:
        return "expected instance counts reached"
    if since_last >= rule.quiet_seconds:
        return f"quiet for {rule.quiet_seconds:g} s"
    if now - float(study["first_received"]) >= rule.max_wait_seconds:
        return f"max wait {rule.max_wait_seconds:g} s reached"
    return None
