"""Re-running a study's pipelines, and the clear answer when its instances are gone.

The listener owns the state database and the Celery app, so a re-run is done by the listener's
scheduler thread. Other processes (``ainode rerun``, a console) ask through a request file under
``storage_dir/requests/`` and read the answer written next to it; inside the listener,
``rerun_study`` is called directly.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from node.state import State

log = logging.getLogger(__name__)

BUSY = ("receiving", "complete", "queued", "processing")


class StudyPurged(Exception):
    """The study's instances were deleted by the storage lifecycle; nothing can run on them any more."""


class RerunRefused(Exception):
    """The study is unknown or still busy."""


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "an unknown time"


def purged_message(study_uid: str, purged_at: float | None, reason: str | None) -> str:
    why = f" ({reason})" if reason else ""
    return (f"study {study_uid}: instances purged at {_when(purged_at)}{why}; nothing to re-run: ask the sender"
            " to send the study again")


def purge_record(query: Any, study_uid: str) -> dict[str, Any] | None:
    """The summary row of a purged study, if the study has no instances left."""
    try:
        rows = query("SELECT purged, purge_reason, outcome FROM study_summaries WHERE study_uid=?", (study_uid,))
    except Exception:  # an old database without the table
        rows = []
    return dict(rows[0]) if rows else None


def rerun_study(state: State, jobs: Any, study_uid: str, publish: bool = True) -> list[str]:
    """New jobs, with the current instances, for every pipeline the study ran; returns their ids.

    Only the scheduler thread publishes (two publishers could send a job twice): a caller on another
    thread (the console) passes ``publish=False`` and wakes the scheduler instead.

    Raises StudyPurged when its instances are gone, RerunRefused when the study is unknown or busy."""
    study = state.one("SELECT * FROM studies WHERE study_uid=?", (study_uid,))
    n = state.one("SELECT COUNT(*) n FROM instances WHERE study_uid=?", (study_uid,))["n"]
    summary = purge_record(state.query, study_uid)
    if study is None or study["state"] in ("purging", "purged") or n == 0:
        if summary is not None:
            raise StudyPurged(purged_message(study_uid, summary["purged"], summary["purge_reason"]))
        if study is not None and study["state"] == "purged":  # purged by an earlier version (no summary)
            raise StudyPurged(purged_message(study_uid, study["updated"], "no route"))
        if study is not None and study["state"] == "purging":
            raise StudyPurged(purged_message(study_uid, study["updated"], "being purged now"))
        raise RerunRefused(f"study {study_uid} is not known to this node")
    if study["state"] in BUSY:
        raise RerunRefused(f"study {study_uid} is {study['state']}; re-run it once it has finished")
    pipelines = sorted({(j["pipeline"], j["route"]) for j in state.query(
        "SELECT pipeline, route FROM jobs WHERE study_uid=?", (study_uid,))})
    if not pipelines:
        pipelines = [(p, r.name) for r in jobs.routes_for(study_uid) for p in r.pipelines]
    if not pipelines:
        raise RerunRefused(f"study {study_uid}: no route matches it, so there is nothing to run")
    from node.jobs import instances_hash

    instances = state.study_instances(study_uid)
    ihash = instances_hash([r["sop_uid"] for r in instances])
    now = time.time()
    created = []
    with state.tx() as c:
        c.execute("UPDATE studies SET state='complete', generation=generation+1, updated=? WHERE study_uid=?",
                  (now, study_uid))
        gen = c.execute("SELECT generation FROM studies WHERE study_uid=?", (study_uid,)).fetchone()[0]
        for pipeline, route_name in pipelines:
            route = next((r for r in jobs.cfg.routes if r.name == route_name), None)
            job_id = uuid.uuid4().hex
            c.execute("INSERT INTO jobs(job_id, study_uid, pipeline, route, generation, instances_hash, n_instances,"
                      " state, priority, created) VALUES (?,?,?,?,?,?,?,?,?,?)",
                      (job_id, study_uid, pipeline, route_name, gen, f"{ihash}+rerun{gen}", len(instances),
                       "pending", route.priority if route else "routine", now))
            created.append(job_id)
    state.event("rerun", f"re-run requested: {len(created)} job(s)", study_uid)
    log.info("study %s: re-run, %d new job(s)", study_uid, len(created))
    if publish:
        jobs.publish_pending()
    return created


# ------------------------------------------------------------------------- requests from other processes
def request_dir(storage: Path) -> Path:
    return Path(storage) / "requests"


def submit(storage: Path, study_uid: str) -> Path:
    """Drop a re-run request for the listener; returns the path its answer will appear at."""
    d = request_dir(storage)
    d.mkdir(parents=True, exist_ok=True)
    rid = uuid.uuid4().hex
    tmp = d / f".rerun-{rid}.tmp"
    tmp.write_text(json.dumps({"study_uid": study_uid, "at": time.time()}), encoding="utf-8")
    os.replace(tmp, d / f"rerun-{rid}.json")
    return d / f"rerun-{rid}.answer.json"


def answer_requests(storage: Path, state: State, jobs: Any) -> int:
    """(Listener, scheduler thread.) Work off pending requests; each gets an answer file."""
    d = request_dir(storage)
    if not d.is_dir():
        return 0
    n = 0
    for req in sorted(d.glob("rerun-*.json")):
        if req.name.endswith(".answer.json"):
            if time.time() - req.stat().st_mtime > 3600:  # nobody came for it
                req.unlink(missing_ok=True)
            continue
        try:
            study_uid = str(json.loads(req.read_text(encoding="utf-8"))["study_uid"])
            answer: dict[str, Any] = {"ok": True, "jobs": rerun_study(state, jobs, study_uid)}
            answer["message"] = f"study {study_uid}: re-run queued, {len(answer['jobs'])} job(s)"
        except (StudyPurged, RerunRefused) as exc:
            answer = {"ok": False, "purged": isinstance(exc, StudyPurged), "message": str(exc)}
        except Exception as exc:
            log.exception("re-run request %s failed", req.name)
            answer = {"ok": False, "message": f"re-run failed: {exc}"}
        out = req.with_name(req.name.removesuffix(".json") + ".answer.json")
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(answer), encoding="utf-8")
        os.replace(tmp, out)
        req.unlink(missing_ok=True)
        n += 1
    return n
