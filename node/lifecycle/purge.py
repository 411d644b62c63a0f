"""Deleting a study's instances and folding its rows into one summary row.

Order matters, because C-STOREs keep arriving while we purge and nothing acknowledged may be lost:

1. the study is marked ``purging`` (only if it is still in the state we judged it by); a crash from here
   on resumes the purge at the next pass;
2. exactly the files indexed at that moment are unlinked, then the folders that are empty (``rmdir``
   never removes a file that a late instance put there meanwhile);
3. one transaction writes the summary and deletes the rows — unless a late instance arrived: then its
   study row, series and jobs stay (the study is receiving again) and only the purged instances go.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.spool import Spool, valid_uid
from node.state import State

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS study_summaries (
    study_uid TEXT PRIMARY KEY,
    route TEXT, outcome TEXT, critical INTEGER NOT NULL DEFAULT 0,
    n_instances INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0,
    first_received REAL, last_received REAL, completed REAL, finished REAL, delivered REAL,
    purged REAL NOT NULL, purge_reason TEXT,
    jobs TEXT, deliveries TEXT
);
CREATE INDEX IF NOT EXISTS study_summaries_purged ON study_summaries(purged);
CREATE TABLE IF NOT EXISTS outbox_audit (
    job_id TEXT PRIMARY KEY, study_uid TEXT, confirmed REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Purged:
    study_uid: str
    instances: int
    bytes: int
    compacted: bool  # False when a late instance arrived meanwhile: the study row lives on
    series: tuple[str, ...] = ()
    jobs: tuple[str, ...] = ()


def _job_summaries(state: State, study_uid: str) -> list[dict[str, Any]]:
    out = []
    for j in state.query("SELECT job_id, pipeline, route, state, generation, created, finished, reason, error,"
                         " summary FROM jobs WHERE study_uid=? ORDER BY created", (study_uid,)):
        summary = json.loads(j["summary"] or "{}")
        out.append({"job_id": j["job_id"], "pipeline": j["pipeline"], "route": j["route"], "state": j["state"],
                    "generation": j["generation"], "created": j["created"], "finished": j["finished"],
                    "reason": j["reason"], "error": j["error"], "critical": bool(summary.get("critical")),
                    "results": len(summary.get("outbox_files") or [])})
    return out


def _delivery_summaries(state: State, study_uid: str) -> dict[str, Any]:
    if not state.one("SELECT 1 FROM sqlite_master WHERE type='table' AND name='deliveries'"):
        return {}
    out: dict[str, Any] = {}
    for r in state.query("SELECT destination, state, COUNT(*) n, MAX(sent) last_sent, MAX(committed) committed"
                         " FROM deliveries WHERE study_uid=? GROUP BY destination, state", (study_uid,)):
        d = out.setdefault(r["destination"], {"states": {}, "last_sent": None, "committed": None})
        d["states"][r["state"]] = r["n"]
        d["last_sent"] = max(d["last_sent"] or 0, r["last_sent"] or 0) or None
        d["committed"] = max(d["committed"] or 0, r["committed"] or 0) or None
    return out


def _remove_tree(path: Path, parent: Path) -> None:
    if path.is_dir() and path.resolve().parent == parent.resolve():
        shutil.rmtree(path, ignore_errors=True)


def _forget_dirs(spool: Spool, study_uid: str) -> None:
    """The spool caches folders it has made; a purged folder must be made again for a late instance."""
    with spool._dirs_lock:  # noqa: SLF001 - the spool's own cache of made folders
        spool._known_dirs = {d for d in spool._known_dirs if d.parent.name != study_uid}  # noqa: SLF001


def purge_study(state: State, spool: Spool, storage: Path, study_uid: str, expected_state: str,
                reason: str, *, keep_outbox: bool = False) -> Purged | None:
    """Delete the instances of a finished study and compact its rows; None when it changed meanwhile."""
    if not valid_uid(study_uid):
        return None
    now = time.time()
    with state.tx() as c:
        n = c.execute("UPDATE studies SET state='purging', updated=? WHERE study_uid=? AND state IN (?, 'purging')",
                      (now, study_uid, expected_state)).rowcount
        if not n:
            return None
        files = c.execute("SELECT sop_uid, series_uid, path, size FROM instances WHERE study_uid=?",
                          (study_uid,)).fetchall()
        study = c.execute("SELECT * FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
    jobs = _job_summaries(state, study_uid)
    deliveries = _delivery_summaries(state, study_uid)
    # 2. files: exactly those indexed, then folders that are empty now
    _forget_dirs(spool, study_uid)
    freed = 0
    for f in files:
        p = Path(f["path"])
        try:
            if p.resolve().is_relative_to(spool.root.resolve()):
                p.unlink()
                freed += f["size"] or 0
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("purge %s: cannot delete %s: %s", study_uid, p.name, exc)
    study_dir = spool.root / study_uid
    for series_uid in {f["series_uid"] for f in files}:
        if valid_uid(series_uid):
            try:
                (study_dir / series_uid).rmdir()
            except OSError:
                pass  # a late instance is in it, or it is gone already
    try:
        study_dir.rmdir()
    except OSError:
        pass
    for j in jobs:
        _remove_tree(storage / "results" / j["job_id"], storage / "results")
        if not keep_outbox:
            _remove_tree(storage / "outbox" / j["job_id"], storage / "outbox")
    # 3. rows
    sops = [f["sop_uid"] for f in files]
    with state.tx() as c:
        for i in range(0, len(sops), 500):
            chunk = sops[i:i + 500]
            c.execute(f"DELETE FROM instances WHERE sop_uid IN ({','.join('?' * len(chunk))})", chunk)
        still = c.execute("SELECT state FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        compacted = still is not None and still["state"] == "purging"
        delivered = max((d["committed"] or d["last_sent"] or 0 for d in deliveries.values()), default=0) or None
        c.execute(
            "INSERT INTO study_summaries(study_uid, route, outcome, critical, n_instances, bytes, first_received,"
            " last_received, completed, finished, delivered, purged, purge_reason, jobs, deliveries)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(study_uid) DO UPDATE SET"
            " route=excluded.route, outcome=excluded.outcome, critical=MAX(critical, excluded.critical),"
            " n_instances=n_instances+excluded.n_instances, bytes=bytes+excluded.bytes,"
            " last_received=excluded.last_received, completed=excluded.completed, finished=excluded.finished,"
            " delivered=excluded.delivered, purged=excluded.purged, purge_reason=excluded.purge_reason,"
            " jobs=excluded.jobs, deliveries=excluded.deliveries",
            (study_uid, study["route"], _outcome(study["complete_reason"], jobs, study["state"]),
             study["critical"], len(files), freed, study["first_received"], study["last_received"],
             study["completed"], max((j["finished"] or 0 for j in jobs), default=0) or None, delivered,
             time.time(), reason, json.dumps(jobs), json.dumps(deliveries)))
        if compacted:
            c.execute("DELETE FROM series WHERE study_uid=?", (study_uid,))
            c.execute("DELETE FROM assoc_studies WHERE study_uid=?", (study_uid,))
            c.execute("DELETE FROM events WHERE study_uid=?", (study_uid,))
            if deliveries:
                c.execute("DELETE FROM deliveries WHERE study_uid=?", (study_uid,))
            c.execute("DELETE FROM jobs WHERE study_uid=?", (study_uid,))
            c.execute("DELETE FROM studies WHERE study_uid=?", (study_uid,))
        else:
            c.execute("UPDATE studies SET n_instances=MAX(0, n_instances-?) WHERE study_uid=?", (len(files), study_uid))
        if keep_outbox:
            for j in jobs:
                if (storage / "outbox" / j["job_id"]).is_dir():
                    c.execute("INSERT OR IGNORE INTO outbox_audit(job_id, study_uid, confirmed) VALUES (?,?,?)",
                              (j["job_id"], study_uid, delivered or now))
    log.info("study %s purged (%s): %d instance(s), %.1f MB%s", study_uid, reason, len(files), freed / 1e6,
             "" if compacted else "; a late instance arrived, the study is receiving again")
    return Purged(study_uid, len(files), freed, compacted, tuple({f["series_uid"] for f in files}),
                  tuple(j["job_id"] for j in jobs) if compacted else ())


def _outcome(_reason: str | None, jobs: list[dict[str, Any]], state: str) -> str:
    states = {j["state"] for j in jobs}
    if not jobs:
        return "no_route"
    if "failed" in states:
        return "failed"
    if states <= {"refused", "model_unavailable"}:
        return "refused"
    return "done" if state == "purging" else state


def clean_outbox(state: State, storage: Path, commit_dests: set[str], audit_hours: float,
                 now: float | None = None) -> list[str]:
    """Delete ``outbox/<job_id>/`` as soon as every destination confirmed every object of the job (stored, and
    committed where commitment is on), or ``audit_hours`` after that. Before the files go, the SR references a
    superseding report will need are kept in the job's summary."""
    cutoff = (time.time() if now is None else now) - audit_hours * 3600.0
    removed: list[str] = []
    outbox = storage / "outbox"
    if state.one("SELECT 1 FROM sqlite_master WHERE type='table' AND name='deliveries'"):
        marks = ",".join("?" * len(commit_dests)) or "''"
        rows = state.query(
            "SELECT job_id, MAX(COALESCE(committed, sent)) t FROM deliveries WHERE job_id IS NOT NULL GROUP BY job_id"
            " HAVING SUM(CASE WHEN state='committed' OR (state='sent' AND destination NOT IN"
            f" ({marks})) THEN 0 ELSE 1 END)=0 AND MAX(COALESCE(committed, sent)) <= ?",
            (*commit_dests, cutoff))
        for r in rows:
            d = outbox / r["job_id"]
            if not d.is_dir():
                continue
            job = state.one("SELECT summary FROM jobs WHERE job_id=?", (r["job_id"],))
            if job is not None and job["summary"]:
                summary = json.loads(job["summary"])
                if "sr_refs" not in summary:
                    from node.jobs import sr_references

                    summary["sr_refs"] = sr_references(summary.get("outbox_files") or [])
                    state.execute("UPDATE jobs SET summary=? WHERE job_id=?", (json.dumps(summary), r["job_id"]))
            _remove_tree(d, outbox)
            removed.append(r["job_id"])
    for r in state.query("SELECT job_id FROM outbox_audit WHERE confirmed <= ?", (cutoff,)):
        _remove_tree(outbox / r["job_id"], outbox)
        state.execute("DELETE FROM outbox_audit WHERE job_id=?", (r["job_id"],))
        removed.append(r["job_id"])
    if removed:
        log.info("outbox: removed the files of %d delivered job(s)", len(removed))
    return removed


def disk_usage(path: Path) -> tuple[int, int]:
    """(size, used) of the file system holding ``path``, as ``df`` counts them (reserved blocks excluded)."""
    st = os.statvfs(path)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    avail = st.f_bavail * st.f_frsize
    return used + avail, used
