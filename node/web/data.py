"""What the console shows, read from the state database: study search, one study's timeline, the
dashboard's figures. No patient names or IDs: studies are known by UID, accession, modality and dates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.service import Listener

log = logging.getLogger(__name__)

# The few non-identifying study attributes the console lists, read once per study from one of its files.
SCHEMA = """
CREATE TABLE IF NOT EXISTS console_studies (
    study_uid TEXT PRIMARY KEY,
    accession TEXT, modality TEXT, study_date TEXT
);
CREATE INDEX IF NOT EXISTS console_studies_acc ON console_studies(accession);
"""
STATES = ("receiving", "complete", "queued", "processing", "done", "failed", "refused", "no_route", "purged")


def tables(listener: Listener) -> set[str]:
    return {r["name"] for r in listener.state.query("SELECT name FROM sqlite_master WHERE type='table'")}


def index_studies(listener: Listener, limit: int = 500) -> int:
    """Fill ``console_studies`` for studies not seen yet (one header read each)."""
    import pydicom

    st = listener.state
    st.ensure_schema(SCHEMA)
    rows = st.query("SELECT s.study_uid, (SELECT path FROM instances i WHERE i.study_uid=s.study_uid LIMIT 1) path,"
                    " (SELECT GROUP_CONCAT(DISTINCT modality) FROM series r WHERE r.study_uid=s.study_uid) mods"
                    " FROM studies s LEFT JOIN console_studies c USING(study_uid) WHERE c.study_uid IS NULL"
                    " LIMIT ?", (limit,))
    for r in rows:
        acc = date = ""
        if r["path"]:
            try:
                ds = pydicom.dcmread(r["path"], stop_before_pixels=True,
                                     specific_tags=["AccessionNumber", "StudyDate"])
                acc, date = str(ds.get("AccessionNumber", "") or ""), str(ds.get("StudyDate", "") or "")
            except Exception as exc:
                log.debug("console: header of %s not readable: %s", r["study_uid"], exc)
        st.execute("INSERT OR IGNORE INTO console_studies(study_uid, accession, modality, study_date)"
                   " VALUES (?,?,?,?)", (r["study_uid"], acc, r["mods"] or "", date))
    return len(rows)


@dataclass
class StudyQuery:
    q: str = ""          # UID or accession (prefix match)
    state: str = ""
    route: str = ""
    date_from: str = ""  # YYYY-MM-DD, day the first instance arrived
    date_to: str = ""
    limit: int = 100


def _day_start(text: str) -> float | None:
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%d"))
    except ValueError:
        return None


def search_studies(listener: Listener, sq: StudyQuery) -> list[dict[str, Any]]:
    index_studies(listener)
    sql = ("SELECT s.study_uid, s.state, s.route, s.n_instances, s.first_received, s.completed, s.critical,"
           " c.accession, c.modality, c.study_date FROM studies s LEFT JOIN console_studies c USING(study_uid)"
           " WHERE 1=1")
    params: list[Any] = []
    if sq.q.strip():
        sql += " AND (s.study_uid LIKE ? OR c.accession LIKE ?)"
        params += [sq.q.strip() + "%", sq.q.strip() + "%"]
    if sq.state:
        sql += " AND s.state=?"
        params.append(sq.state.lower())
    if sq.route:
        sql += " AND (',' || s.route || ',') LIKE ?"
        params.append(f"%,{sq.route},%")
    if (t := _day_start(sq.date_from)) is not None:
        sql += " AND s.first_received>=?"
        params.append(t)
    if (t := _day_start(sq.date_to)) is not None:
        sql += " AND s.first_received<?"
        params.append(t + 86400)
    sql += " ORDER BY s.first_received DESC LIMIT ?"
    params.append(max(1, min(sq.limit, 1000)))
    return [dict(r) for r in listener.state.query(sql, tuple(params))]


@dataclass
class Step:
    at: float
    what: str
    detail: str = ""
    kind: str = "info"  # info | ok | error
    since_prev: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def timeline(listener: Listener, study_uid: str) -> tuple[dict[str, Any] | None, list[Step], list[dict[str, Any]]]:
    """The study, its steps in time order (with the time since the previous step), and its jobs."""
    st = listener.state
    index_studies(listener)
    s = st.one("SELECT s.*, c.accession, c.modality, c.study_date FROM studies s LEFT JOIN console_studies c"
               " USING(study_uid) WHERE s.study_uid=?", (study_uid,))
    if s is None:
        return None, [], []
    steps: list[Step] = []
    if s["first_received"]:
        steps.append(Step(s["first_received"], "first instance received"))
    if s["last_received"] and s["last_received"] != s["first_received"]:
        steps.append(Step(s["last_received"], "last instance received", f"{s['n_instances']} instance(s) in all"))
    if s["completed"]:
        steps.append(Step(s["completed"], "complete", f"why: {s['complete_reason'] or '?'}; route: "
                          f"{s['route'] or 'none matched'}", "error" if s["state"] == "no_route" else "info"))
    jobs = [dict(j) for j in st.query("SELECT job_id, pipeline, route, state, priority, queue, attempts, created,"
                                      " queued, started, finished, error, reason, generation FROM jobs"
                                      " WHERE study_uid=? ORDER BY created", (study_uid,))]
    for j in jobs:
        name = f"{j['pipeline']} (job {j['job_id'][:8]})"
        if j["queued"]:
            steps.append(Step(j["queued"], f"{name} queued", f"queue {j['queue']}, priority {j['priority']}"))
        if j["started"]:
            steps.append(Step(j["started"], f"{name} started", f"attempt {j['attempts'] or 1}"))
        if j["finished"]:
            bad = j["state"] not in ("done",)
            words = j["error"] or j["reason"] or ""
            steps.append(Step(j["finished"], f"{name} {j['state']}", words, "error" if bad else "ok"))
        elif j["state"] == "cancelled":
            steps.append(Step(j["created"], f"{name} cancelled", j["reason"] or "", "error"))
    if "deliveries" in tables(listener):
        for d in st.query("SELECT destination, job_id, state, COUNT(*) n, MIN(sent) first, MAX(sent) last,"
                          " MAX(committed) committed, MAX(last_attempt) tried, MAX(last_error) err FROM deliveries"
                          " WHERE study_uid=? GROUP BY destination, job_id, state", (study_uid,)):
            if d["last"]:
                steps.append(Step(d["last"], f"{d['n']} result object(s) delivered to {d['destination']}",
                                  f"job {(d['job_id'] or '')[:8]}", "ok"))
            if d["committed"]:
                steps.append(Step(d["committed"], f"storage commitment from {d['destination']}",
                                  f"{d['n']} object(s)", "ok"))
            if d["state"] in ("failed-permanent", "dead-letter", "pending") and d["tried"]:
                steps.append(Step(d["tried"], f"{d['n']} result object(s) to {d['destination']}: {d['state']}",
                                  d["err"] or "", "error"))
    if "notify_deliveries" in tables(listener):
        for n in st.query("SELECT d.channel, d.state, d.sent_at, d.last_attempt, d.last_error, e.finding"
                          " FROM notify_deliveries d JOIN notify_events e USING(event_id) WHERE e.study_uid=?",
                          (study_uid,)):
            at = n["sent_at"] or n["last_attempt"]
            if at:
                steps.append(Step(at, f"notification via {n['channel']}: {n['state']}",
                                  f"finding {n['finding']}" + (f"; {n['last_error']}" if n["last_error"] else ""),
                                  "ok" if n["state"] == "sent" else "error"))
    for e in st.query("SELECT at, kind, message FROM events WHERE study_uid=? AND kind IN"
                      " ('console', 'no_route', 'error')", (study_uid,)):
        steps.append(Step(e["at"], e["kind"], e["message"] or "", "error" if e["kind"] == "error" else "info"))
    steps.sort(key=lambda x: x.at)
    for prev, cur in zip(steps, steps[1:], strict=False):
        cur.since_prev = cur.at - prev.at
    return dict(s), steps, jobs


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))
    return v[k]


def dashboard(listener: Listener, now: float | None = None) -> dict[str, Any]:
    """Figures over the last hour: rates per minute, stage latency percentiles, and current counts."""
    st = listener.state
    now = now or time.time()
    hour = now - 3600
    per_min = [0] * 60
    for r in st.query("SELECT CAST((received-?)/60 AS INT) b, COUNT(*) n FROM instances WHERE received>=?"
                      " GROUP BY b", (hour, hour)):
        if 0 <= r["b"] < 60:
            per_min[r["b"]] = r["n"]
    studies_5min = [0] * 12
    for r in st.query("SELECT CAST((first_received-?)/300 AS INT) b, COUNT(*) n FROM studies WHERE"
                      " first_received>=? GROUP BY b", (hour, hour)):
        if 0 <= r["b"] < 12:
            studies_5min[r["b"]] = r["n"]
    lat: dict[str, list[float]] = {"receive_to_complete": [], "complete_to_result": [], "result_to_delivered": [],
                                   "end_to_end": []}
    for r in st.query("SELECT first_received, completed FROM studies WHERE completed>=?", (hour,)):
        lat["receive_to_complete"].append(r["completed"] - r["first_received"])
    for r in st.query("SELECT j.finished, s.completed FROM jobs j JOIN studies s USING(study_uid)"
                      " WHERE j.finished>=? AND s.completed IS NOT NULL", (hour,)):
        lat["complete_to_result"].append(r["finished"] - r["completed"])
    t = tables(listener)
    deliveries = {"pending": 0, "failed": 0}
    if "deliveries" in t:
        for r in st.query("SELECT d.sent, j.finished, s.first_received FROM deliveries d LEFT JOIN jobs j"
                          " USING(job_id) LEFT JOIN studies s ON s.study_uid=d.study_uid WHERE d.sent>=?", (hour,)):
            if r["finished"]:
                lat["result_to_delivered"].append(r["sent"] - r["finished"])
            if r["first_received"]:
                lat["end_to_end"].append(r["sent"] - r["first_received"])
        for r in st.query("SELECT state, COUNT(*) n FROM deliveries GROUP BY state"):
            if r["state"] == "pending":
                deliveries["pending"] += r["n"]
            elif r["state"] in ("failed-permanent", "dead-letter"):
                deliveries["failed"] += r["n"]
    notifications: dict[str, int] = {}
    if "notify_deliveries" in t:
        for r in st.query("SELECT state, COUNT(*) n FROM notify_deliveries WHERE created>=? GROUP BY state", (hour,)):
            notifications[r["state"]] = r["n"]
    queues: dict[str, int] = {"cpu": 0, "gpu": 0}
    for r in st.query("SELECT COALESCE(queue,'unassigned') q, COUNT(*) n FROM jobs WHERE state IN"
                      " ('pending','queued') GROUP BY q"):
        queues[r["q"]] = r["n"]
    running = st.one("SELECT COUNT(*) n FROM jobs WHERE state='started'")["n"]
    import shutil

    du = shutil.disk_usage(listener.spool.root)
    return {
        "instances_per_min": per_min, "instances_per_s": round(sum(per_min[-5:]) / 300, 2),
        "studies_per_5min": studies_5min, "studies_per_h": sum(studies_5min),
        "latency": {k: {"n": len(v), "p50": percentile(v, 50), "p95": percentile(v, 95)} for k, v in lat.items()},
        "queues": queues, "running": running, "deliveries": deliveries, "notifications": notifications,
        "disk_free_gb": round(du.free / 1e9, 1), "disk_free_pct": round(100 * du.free / du.total, 1),
    }
