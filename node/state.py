"""The listener's state database: SQLite in WAL mode under ``storage_dir``.

The spool files are the durable truth; this index can be rebuilt from them (``Spool.reconcile``).
That is why commits use ``synchronous=NORMAL``: a killed process loses nothing in WAL mode, and a
power cut can at worst lose index rows that the next start recovers from the spool.
Only the listener process opens this database; workers talk to it through Celery results.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL DEFAULT 'receiving',
    route TEXT,
    first_received REAL, last_received REAL, completed REAL,
    complete_reason TEXT,
    n_instances INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 0,
    critical INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    updated REAL
);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT, sop_class_uid TEXT,
    expected INTEGER,
    n_instances INTEGER NOT NULL DEFAULT 0,
    tags TEXT,
    first_received REAL, last_received REAL
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
    path TEXT NOT NULL, size INTEGER,
    received REAL, calling_ae TEXT, assoc_id TEXT
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS associations (
    assoc_id TEXT PRIMARY KEY,
    calling_ae TEXT, host TEXT,
    started REAL, ended REAL,
    how TEXT  -- released | aborted | lost: only a released association completes a study
);
CREATE TABLE IF NOT EXISTS assoc_studies (
    assoc_id TEXT NOT NULL, study_uid TEXT NOT NULL,
    PRIMARY KEY (assoc_id, study_uid)
);
CREATE INDEX IF NOT EXISTS assoc_studies_study ON assoc_studies(study_uid);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    route TEXT,
    generation INTEGER NOT NULL,
    instances_hash TEXT NOT NULL,
    n_instances INTEGER,
    state TEXT NOT NULL DEFAULT 'pending',
    priority TEXT NOT NULL DEFAULT 'routine',
    queue TEXT,
    celery_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL, queued REAL, started REAL, finished REAL,
    error TEXT, reason TEXT, result_dir TEXT, summary TEXT,
    UNIQUE (study_uid, pipeline, instances_hash)
);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs(study_uid);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL, study_uid TEXT, kind TEXT NOT NULL, message TEXT
);
"""


class State:
    """A thread-safe handle on the state database (one connection, one lock: SQLite serialises anyway)."""

    def __init__(self, storage_dir: str | Path):
        self.path = Path(storage_dir) / "state.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        # a new database returns the pages of purged rows to the file system (node/lifecycle vacuums them)
        self._conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self.ensure_schema(SCHEMA)

    def ensure_schema(self, script: str) -> None:
        """Other modules (delivery, notifications) add their tables through this."""
        with self._lock:
            self._conn.executescript(script)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def one(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._conn.execute(sql, params).fetchone()

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> int:
        with self._lock:
            return self._conn.execute(sql, params).rowcount

    def event(self, kind: str, message: str, study_uid: str | None = None) -> None:
        self.execute("INSERT INTO events(at, study_uid, kind, message) VALUES (?,?,?,?)",
                     (time.time(), study_uid, kind, message))

    # ------------------------------------------------------------------ receive path
    def record_instance(self, *, study_uid: str, series_uid: str, sop_uid: str, path: str, size: int,
                        calling_ae: str, assoc_id: str, modality: str, sop_class_uid: str,
                        expected: int | None, series_tags: dict[str, Any]) -> bool:
        """Index one stored instance; returns False when it was a duplicate SOP Instance UID."""
        now = time.time()
        with self.tx() as c:
            new = c.execute(
                "INSERT OR IGNORE INTO instances(sop_uid, study_uid, series_uid, path, size, received, calling_ae,"
                " assoc_id) VALUES (?,?,?,?,?,?,?,?)",
                (sop_uid, study_uid, series_uid, path, size, now, calling_ae, assoc_id)).rowcount == 1
            c.execute("INSERT OR IGNORE INTO assoc_studies(assoc_id, study_uid) VALUES (?,?)", (assoc_id, study_uid))
            if not new:
                c.execute("UPDATE studies SET last_received=?, updated=? WHERE study_uid=?", (now, now, study_uid))
                return False
            c.execute(
                "INSERT INTO series(series_uid, study_uid, modality, sop_class_uid, expected, n_instances, tags,"
                " first_received, last_received) VALUES (?,?,?,?,?,1,?,?,?)"
                " ON CONFLICT(series_uid) DO UPDATE SET n_instances=n_instances+1,"
                " last_received=excluded.last_received,"
                " expected=COALESCE(excluded.expected, series.expected)",
                (series_uid, study_uid, modality, sop_class_uid, expected, json.dumps(series_tags, default=str),
                 now, now))
            c.execute(
                "INSERT INTO studies(study_uid, state, first_received, last_received, n_instances, updated)"
                " VALUES (?, 'receiving', ?, ?, 1, ?)"
                " ON CONFLICT(study_uid) DO UPDATE SET n_instances=n_instances+1, last_received=excluded.last_received,"
                " updated=excluded.updated,"
                " state=CASE WHEN studies.state IN ('receiving') THEN studies.state ELSE 'receiving' END",
                (study_uid, now, now, now))
            return True

    def association_started(self, assoc_id: str, calling_ae: str, host: str) -> None:
        self.execute("INSERT OR REPLACE INTO associations(assoc_id, calling_ae, host, started) VALUES (?,?,?,?)",
                     (assoc_id, calling_ae, host, time.time()))

    def association_ended(self, assoc_id: str, how: str = "released") -> None:
        self.execute("UPDATE associations SET ended=?, how=? WHERE assoc_id=?", (time.time(), how, assoc_id))

    def close_open_associations(self) -> int:
        """After a crash no association survives. They are marked lost, not released: a study cut off
        mid-transfer keeps waiting for the resend (or its quiet / max-wait timers)."""
        return self.execute("UPDATE associations SET ended=?, how='lost' WHERE ended IS NULL", (time.time(),))

    def study_instances(self, study_uid: str) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM instances WHERE study_uid=? ORDER BY series_uid, path", (study_uid,))

    def study_series(self, study_uid: str) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM series WHERE study_uid=? ORDER BY first_received", (study_uid,))

    def released_by_senders(self, study_uid: str) -> bool:
        """True when no association that sent to the study is open and the last one ended by A-RELEASE."""
        rows = self.query("SELECT a.ended, a.how FROM assoc_studies s JOIN associations a USING(assoc_id)"
                          " WHERE s.study_uid=? ORDER BY a.started DESC", (study_uid,))
        return bool(rows) and all(r["ended"] is not None for r in rows) and rows[0]["how"] == "released"
