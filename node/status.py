"""What the node holds and where each study stands, read-only from the state database.

One reader for ``ainode status`` and the console (``node.web.views``), so the two cannot disagree and the
console does not import the command line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from node.config import Config


def status_data(cfg: Config, limit: int = 200) -> dict[str, Any]:
    import sqlite3

    db = Path(cfg.node.storage_dir) / "state.db"
    if not db.exists():
        return {"studies": [], "note": f"no state database at {db}"}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    studies = []
    for s in conn.execute("SELECT * FROM studies ORDER BY first_received DESC LIMIT ?", (limit,)):
        jobs = [dict(j) for j in conn.execute(
            "SELECT job_id, pipeline, route, state, priority, queue, attempts, created, queued, started, finished,"
            " error, reason, generation FROM jobs WHERE study_uid=? ORDER BY created", (s["study_uid"],))]
        entry = {
            "study_uid": s["study_uid"], "state": s["state"].upper() if s["state"] else None,
            "critical": bool(s["critical"]), "instances": s["n_instances"], "route": s["route"],
            "pipelines": sorted({j["pipeline"] for j in jobs}),
            "first_received": s["first_received"], "last_received": s["last_received"],
            "completed": s["completed"], "complete_reason": s["complete_reason"],
            "queued": max((j["queued"] or 0 for j in jobs), default=None) or None,
            "started": max((j["started"] or 0 for j in jobs), default=None) or None,
            "finished": max((j["finished"] or 0 for j in jobs), default=None) or None,
            "errors": [j["error"] for j in jobs if j["error"]] + ([s["error"]] if s["error"] else []),
            "jobs": jobs,
            "critical_findings": _critical_findings(conn, s["study_uid"]),
        }
        if "deliveries" in tables:
            entry["delivery"] = _delivery_summary(conn, s["study_uid"])
            dl = entry["delivery"].values()
            entry["delivered"] = max((d["last_sent"] or 0 for d in dl), default=None) or None \
                if dl and all(d["delivered"] for d in dl) else None
        if "instance_conflicts" in tables:
            from node.duplicates import conflicts

            entry["conflicts"] = conflicts(conn, s["study_uid"])
        if "notify_deliveries" in tables:
            from node.notify import notification_log

            entry["notifications"] = notification_log(conn, s["study_uid"])
        studies.append(entry)
    storage = _lifecycle_status(cfg, conn, tables, studies, limit)
    conn.close()
    return {"node": {"ae_title": cfg.node.ae_title, "port": cfg.node.port,
                     "storage_dir": str(cfg.node.storage_dir)}, "studies": studies, "storage": storage}


def _lifecycle_status(cfg: Config, conn: Any, tables: set[str], studies: list[dict[str, Any]],
                      limit: int) -> dict[str, Any] | None:
    """Storage lifecycle (node/lifecycle): when each study's instances go or why they stay, the purged
    studies' summaries as PURGED entries, and the disk report of the listener's last pass."""
    from node.lifecycle import storage_status
    from node.lifecycle.policy import assess

    def query(sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return conn.execute(sql, params).fetchall()

    found = assess(query, cfg, time.time())
    expiry = {c.study_uid: c for c in found.candidates}
    for entry in studies:
        c = expiry.get(entry["study_uid"])
        entry["retention"] = ({"purge_after": c.expires_at, "retention_hours": c.retention_hours} if c else
                              {"kept": found.kept.get(entry["study_uid"], entry["state"] or "")})
    if "study_summaries" in tables:
        for r in conn.execute("SELECT * FROM study_summaries ORDER BY purged DESC LIMIT ?", (limit,)):
            if any(s["study_uid"] == r["study_uid"] for s in studies):
                continue
            jobs = json.loads(r["jobs"] or "[]")
            delivery = json.loads(r["deliveries"] or "{}")
            for d in delivery.values():
                d["delivered"] = set(d["states"]) <= {"sent", "committed"}
            studies.append({
                "study_uid": r["study_uid"], "state": "PURGED", "outcome": r["outcome"],
                "critical": bool(r["critical"]), "instances": r["n_instances"], "route": r["route"],
                "pipelines": sorted({j["pipeline"] for j in jobs}), "first_received": r["first_received"],
                "last_received": r["last_received"], "completed": r["completed"], "complete_reason": None,
                "queued": None, "started": None, "finished": r["finished"],
                "errors": [j["error"] for j in jobs if j.get("error")], "jobs": jobs, "delivery": delivery,
                "delivered": r["delivered"], "purged": r["purged"], "purge_reason": r["purge_reason"],
            })
    return storage_status(query)


def _critical_findings(conn: Any, study_uid: str) -> list[str]:
    """Names of the findings the latest finished job of each pipeline flagged critical (its summary's flags)."""
    latest: dict[str, Any] = {}
    for j in conn.execute("SELECT pipeline, summary FROM jobs WHERE study_uid=? AND summary IS NOT NULL"
                          " ORDER BY finished", (study_uid,)):
        latest[j["pipeline"]] = j["summary"]
    names: list[str] = []
    for summary in latest.values():
        for f in json.loads(summary).get("findings", []):
            if f.get("critical") and f.get("present") and f["label"] not in names:
                names.append(f["label"])
    return names


def _delivery_summary(conn: Any, study_uid: str) -> dict[str, Any]:
    """Per destination: rows per state, when the last one went out, and the last error."""
    out: dict[str, Any] = {}
    for r in conn.execute("SELECT destination, state, COUNT(*) n, MAX(sent) last_sent, MAX(committed) committed"
                          " FROM deliveries WHERE study_uid=? GROUP BY destination, state", (study_uid,)):
        d = out.setdefault(r["destination"], {"states": {}, "last_sent": None, "last_error": None})
        d["states"][r["state"]] = r["n"]
        if r["last_sent"]:
            d["last_sent"] = max(d["last_sent"] or 0, r["last_sent"])
    for r in conn.execute("SELECT destination, last_error FROM deliveries WHERE study_uid=? AND last_error IS NOT"
                          " NULL ORDER BY last_attempt", (study_uid,)):
        out[r["destination"]]["last_error"] = r["last_error"]
    for d in out.values():
        d["delivered"] = set(d["states"]) <= {"sent", "committed"}
    return out
