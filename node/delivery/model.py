"""Delivery rows and their states, outcomes, backoff: what every sender and the service share."""


from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from pydicom.uid import UID

from node.config import DestinationConfig

PENDING = "pending"
SENT = "sent"  # stored at the destination; for storage-commitment destinations: awaiting commitment
COMMITTED = "committed"
FAILED = "failed-permanent"
DEAD = "dead-letter"
STATES = (PENDING, SENT, COMMITTED, FAILED, DEAD)

PRIORITY = {"stat": 0, "routine": 1}
STORAGE_COMMITMENT_PUSH = UID("1.2.840.10008.1.20.1")
STORAGE_COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")
MAX_CONTEXTS = 128  # DICOM PS3.8: presentation context ids are odd numbers 1..255

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    job_id TEXT,
    path TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error TEXT,
    created REAL NOT NULL,
    first_attempt REAL, last_attempt REAL, sent REAL, committed REAL,
    commit_txn TEXT, commit_requested REAL,
    UNIQUE (destination, sop_uid)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, destination, next_attempt);
CREATE INDEX IF NOT EXISTS deliveries_study ON deliveries(study_uid);
CREATE INDEX IF NOT EXISTS deliveries_txn ON deliveries(commit_txn);
"""

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C): warnings still mean "stored".
WARNINGS = {0xB000: "coercion of data elements", 0xB006: "elements discarded",
             0xB007: "data set does not match SOP class"}
FAILURES = {0x0110: "processing failure", 0x0117: "invalid SOP instance", 0x0122: "SOP class not supported",
             0x0124: "not authorised", 0x0210: "duplicate invocation", 0x0211: "unrecognised operation",
             0x0212: "mistyped argument", 0x0213: "resource limitation"}


def status_text(status: int) -> str:
    if status in FAILURES:
        return FAILURES[status]
    if 0xA700 <= status <= 0xA7FF:
        return "out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return "data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return "cannot understand"
    return "unknown status"


def is_transient_status(status: int) -> bool:
    """Only "out of resources" says the same request may succeed later; every other failure is the peer's answer."""
    return 0xA700 <= status <= 0xA7FF or status == 0x0213


# --------------------------------------------------------------------------------------------- data model
@dataclass(frozen=True)
class Item:
    """One (destination, SOP instance) delivery as read from the database."""

    id: int
    destination: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_uid: str
    path: Path
    priority: int
    attempts: int
    created: float


@dataclass(frozen=True)
class Outcome:
    kind: Literal["sent", "transient", "permanent"]
    error: str | None = None


@dataclass(frozen=True)
class BackoffPolicy:
    """Exponential backoff with jitter; jitter keeps many nodes from reconnecting to a recovered PACS in lockstep."""

    base_s: float = 30.0
    max_s: float = 3600.0
    jitter: float = 0.3

    def delay(self, attempts: int) -> float:
        raw = min(self.max_s, self.base_s * (2 ** max(0, attempts - 1)))
        return raw * (1.0 - self.jitter * random.random())


Record = Callable[[dict[int, Outcome]], None]


class Sender(Protocol):
    def send(self, dest: DestinationConfig, items: Sequence[Item], record: Record | None = None) -> dict[int, Outcome]:
        """Attempt ``items`` on one connection, calling ``record`` as outcomes become known (so progress survives
        a crash mid-batch); returns all outcomes.  An item missing from the result was not attempted."""
        ...


@dataclass
class Batch:
    """What one association (or STOW request series) to one destination has done so far."""

    dest: DestinationConfig
    items: dict[int, Item]
    recorded: set[int] = field(default_factory=set)
    sent: int = 0
    delays: dict[int, float] = field(default_factory=dict)  # one jitter per batch: it retries as one association
    per_study: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    errors: dict[str, str] = field(default_factory=dict)


def wants_commitment(dest: DestinationConfig) -> bool:
    """Storage commitment is a DIMSE service; for STOW-RS the HTTP response is the commitment we get."""
    return dest.storage_commitment and dest.kind == "dicom"


def all_outcomes(items: Iterable[Item], outcome: Outcome) -> dict[int, Outcome]:
    return {it.id: outcome for it in items}
