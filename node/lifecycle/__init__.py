"""Storage lifecycle: a node that runs for months with a bounded disk and a bounded state database.

A background thread of the listener (never the C-STORE path) makes one pass every
``node.lifecycle_seconds``:

* outbox files go as soon as every destination confirmed them (``node.outbox_audit_hours`` later, if set);
* studies whose retention ran out after they were finished and delivered are purged (``policy``);
* above ``node.disk_high_water_percent`` the oldest deletable studies go first, retention or not, until
  ``node.disk_low_water_percent``; when nothing may be deleted the node answers 0xA700 until something
  may (``Spool.blocked``), keeping the space above the watermark for the results of the work it holds,
  and the status says what holds the space (``node.min_free_disk_mb`` stays the hard floor);
* purged studies leave one summary row (``purge``); the WAL is checkpointed and free pages returned to
  the file system every ``node.db_maintenance_seconds`` on a connection of its own, which waits for
  nobody (a busy database just means the next round).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from node.config import Config
from node.lifecycle.policy import Assessment, assess
from node.lifecycle.purge import SCHEMA, clean_outbox, disk_usage, purge_study
from node.lifecycle.rerun import RerunRefused, StudyPurged, answer_requests, purged_message, rerun_study
from node.spool import Spool
from node.state import State

__all__ = ["Lifecycle", "RerunRefused", "StudyPurged", "purged_message", "rerun_study", "storage_status"]

log = logging.getLogger(__name__)

STATUS_SCHEMA = """
CREATE TABLE IF NOT EXISTS storage_status (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL, data TEXT);
"""


def storage_status(query: Any) -> dict[str, Any] | None:
    """The last pass's storage report, for ``ainode status`` (which reads the database read-only)."""
    try:
        rows = query("SELECT data FROM storage_status WHERE id=1", ())
    except Exception:
        return None
    return json.loads(rows[0]["data"]) if rows else None


class Lifecycle:
    def __init__(self, cfg: Config, state: State, spool: Spool, storage: Path, scp: Any = None,
                 jobs: Any = None):
        self.cfg = cfg
        self.state = state
        self.spool = spool
        self.storage = Path(storage)
        self.scp = scp
        self.jobs = jobs
        self.status: dict[str, Any] = {"state": "ok", "reason": None}
        self.purged_total = 0
        self.purged_bytes = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_maintenance = 0.0
        self._last_requests = 0.0
        state.ensure_schema(SCHEMA + STATUS_SCHEMA)

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ainode-lifecycle", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(30)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("storage lifecycle pass failed")
            self._wake.wait(self.cfg.node.lifecycle_seconds)
            self._wake.clear()

    def on_tick(self) -> None:
        """(Scheduler thread, every tick.) Answer re-run requests from other processes, twice a second."""
        if self.jobs is None or time.monotonic() - self._last_requests < 0.5:
            return
        self._last_requests = time.monotonic()
        answer_requests(self.storage, self.state, self.jobs)

    # ------------------------------------------------------------------ one pass
    def _purge(self, study_uid: str, expected_state: str, reason: str) -> int:
        keep = self.cfg.node.outbox_audit_hours > 0
        done = purge_study(self.state, self.spool, self.storage, study_uid, expected_state, reason, keep_outbox=keep)
        if done is None:
            return 0
        self.purged_total += 1
        self.purged_bytes += done.bytes
        if self.scp is not None and hasattr(self.scp, "_known_series"):
            with self.scp._lock:  # noqa: SLF001 - a late series of a purged study is a new series again
                self.scp._known_series.difference_update(done.series)  # noqa: SLF001
        announced = getattr(self.jobs, "_announced", None)
        if isinstance(announced, set):  # in-memory per-job sets must not outlive the job's rows
            announced.difference_update(done.jobs)
        return done.bytes or 1

    def disk(self) -> tuple[int, int, float]:
        size, used = disk_usage(self.spool.root)
        return size, used, 100.0 * used / size if size else 0.0

    def run_once(self, now: float | None = None) -> dict[str, Any]:
        t0 = time.monotonic()
        node = self.cfg.node
        now = time.time() if now is None else now
        commit = {d.name for d in self.cfg.destinations if d.storage_commitment and d.kind == "dicom"}
        clean_outbox(self.state, self.storage, commit, node.outbox_audit_hours, now)
        found = assess(self.state.query, self.cfg, now)
        gone: set[str] = set()
        for c in found.expired(now):
            if self._stop.is_set():
                break
            if self._purge(c.study_uid, c.state, f"retention {c.retention_hours:g} h after "
                           f"{'delivery' if c.state == 'done' else c.state}"):
                gone.add(c.study_uid)
        size, used, pct = self.disk()
        pressure = pct >= node.disk_high_water_percent
        if pressure:
            for c in found.by_pressure():
                if pct <= node.disk_low_water_percent or self._stop.is_set():
                    break
                if c.study_uid in gone:
                    continue
                if self._purge(c.study_uid, c.state, f"disk {pct:.0f}% used, above high water "
                               f"{node.disk_high_water_percent:g}%"):
                    gone.add(c.study_uid)
                    size, used, pct = self.disk()
        if time.time() - self._last_maintenance >= node.db_maintenance_seconds:
            self._last_maintenance = time.time()
            self.maintain_db()
        self.status = self._report(found, gone, size, used, pct, pressure, now, time.monotonic() - t0)
        self.state.execute("INSERT INTO storage_status(id, at, data) VALUES (1, ?, ?) ON CONFLICT(id) DO UPDATE"
                           " SET at=excluded.at, data=excluded.data", (now, json.dumps(self.status)))
        return self.status

    def _report(self, found: Assessment, gone: set[str], size: int, used: int, pct: float, pressure: bool,
                now: float, took: float) -> dict[str, Any]:
        node = self.cfg.node
        left = [c for c in found.candidates if c.study_uid not in gone]
        kept = found.kept_summary()
        held = ", ".join(f"{n} {why}" for why, n in sorted(kept.items())) or "none"
        state, reason = ("purging" if pressure else "ok"), None
        blocked = None
        if pct >= node.disk_high_water_percent and not left and kept:
            state = "full"
            reason = blocked = (f"disk {pct:.1f}% used, above high water {node.disk_high_water_percent:g}%, and no"
                                f" study may be deleted (studies held: {held}): C-STORE answers 0xA700 until one"
                                " may be")
        elif pct >= node.disk_high_water_percent and not left:
            state = "above_high_water"  # a warning in status; /healthz stays ok while C-STORE is accepted
            reason = (f"disk {pct:.1f}% used, above high water {node.disk_high_water_percent:g}%, by files that are"
                      " not this node's (it holds no study): C-STORE goes on until node.min_free_disk_mb")
        self.spool.blocked = blocked  # the SCP refuses while set: the space above is kept for held work's results
        refusing = self.spool.low_on_space()
        if refusing and reason is None:
            state = "full"
            reason = (f"free space {(size - used) // 2**20} MB below node.min_free_disk_mb ({node.min_free_disk_mb}"
                      f" MB): C-STORE answers 0xA700; {len(left)} study(ies) deletable, studies held: {held}")
        db = self.storage / "state.db"
        wal = db.with_name("state.db-wal")
        return {
            "at": now, "state": state, "reason": reason, "refusing": refusing,
            "disk_size_bytes": size, "disk_used_bytes": used, "disk_used_percent": round(pct, 2),
            "high_water_percent": node.disk_high_water_percent, "low_water_percent": node.disk_low_water_percent,
            "deletable": len(left), "held": kept,
            "next_expiry": min((c.expires_at for c in left), default=None),
            "purged_total": self.purged_total, "purged_bytes_total": self.purged_bytes,
            "db_bytes": db.stat().st_size if db.exists() else 0, "wal_bytes": wal.stat().st_size if wal.exists() else 0,
            "pass_seconds": round(took, 3),
        }

    # ------------------------------------------------------------------ state database
    def maintain_db(self) -> dict[str, Any]:
        """Old rows that nothing refers to go; then checkpoint and vacuum on a separate, impatient connection."""
        node = self.cfg.node
        now = time.time()
        self.state.execute("DELETE FROM study_summaries WHERE purged < ?", (now - node.summary_retention_days * 86400,))
        self.state.execute("DELETE FROM associations WHERE ended IS NOT NULL AND ended < ? AND assoc_id NOT IN"
                           " (SELECT assoc_id FROM assoc_studies)", (now - 3600,))
        self.state.execute("DELETE FROM events WHERE study_uid IS NULL AND at < ?",
                           (now - node.summary_retention_days * 86400,))
        out: dict[str, Any] = {}
        conn = sqlite3.connect(self.state.path, timeout=0.25, isolation_level=None)
        try:
            out["checkpoint"] = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            out["vacuumed"] = len(conn.execute("PRAGMA incremental_vacuum(2000)").fetchall())
        except sqlite3.OperationalError as exc:  # busy: the C-STORE path has priority, try next round
            out["error"] = str(exc)
            log.debug("database maintenance postponed: %s", exc)
        finally:
            conn.close()
        return out
