"""Which studies may lose their instances, from when, and why the others may not.

The rule is about the study's life, not its age: instances are only needed until every job for the study
has finished and every result is at its destinations (committed there, where storage commitment is on).
After that they are kept ``retention_hours`` longer (per route) so that an operator's re-run or a late
series still finds them. Whatever is still receiving, queued, running, or has results that did not
arrive (pending, refused by the peer, dead-lettered, awaiting commitment) is never deletable: those are
exactly the studies an operator still has to act on.

Works on any ``query(sql, params) -> rows`` so that the listener (``State.query``) and the read-only
``ainode status`` connection share one reading.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from node.config import Config

Query = Callable[[str, tuple[Any, ...]], Sequence[Any]]

FINISHED = ("done", "refused", "failed", "no_route", "purging")
ACTIVE_JOBS = ("pending", "queued", "started")
# under disk pressure, what goes first: work that was never ours, then finished work, failed work last
PRESSURE_RANK = {"purging": 0, "no_route": 1, "refused": 2, "done": 3, "failed": 4}


@dataclass(frozen=True)
class Candidate:
    study_uid: str
    state: str
    finished_at: float  # the moment the study's last job finished or its last result was confirmed
    expires_at: float  # finished_at + the retention that applies
    retention_hours: float

    @property
    def rank(self) -> tuple[int, float]:
        return PRESSURE_RANK.get(self.state, 9), self.finished_at


@dataclass
class Assessment:
    candidates: list[Candidate] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # study_uid -> why it may not be deleted at all

    def expired(self, now: float) -> list[Candidate]:
        return sorted((c for c in self.candidates if c.expires_at <= now), key=lambda c: c.finished_at)

    def by_pressure(self) -> list[Candidate]:
        return sorted(self.candidates, key=lambda c: c.rank)

    def kept_summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for why in self.kept.values():
            out[why] = out.get(why, 0) + 1
        return out


def retention_for(cfg: Config, state: str, routes: str | None) -> float:
    """Hours to keep the instances of a finished study: the route's (the longest when several matched)."""
    node = cfg.node
    if state == "no_route":
        return node.no_route_retention_hours
    if state in ("refused", "failed"):
        return node.failed_retention_hours
    if state == "purging":
        return 0.0
    by_name = {r.name: r for r in cfg.routes}
    hours = [by_name[n].retention_hours for n in (routes or "").split(",") if n in by_name]
    given = [h for h in hours if h is not None]
    return max(given) if given else node.retention_hours


def _commitment_destinations(cfg: Config) -> set[str]:
    return {d.name for d in cfg.destinations if d.storage_commitment and d.kind == "dicom"}


def _delivery_wanted(cfg: Config, route_name: str | None) -> bool:
    route = next((r for r in cfg.routes if r.name == route_name), None)
    return bool(route and route.destinations and cfg.destinations)


def assess(query: Query, cfg: Config, now: float, study_uid: str | None = None) -> Assessment:
    """Every study that is not receiving, sorted into deletable candidates and kept-with-a-reason."""
    out = Assessment()
    where, params = ("", ()) if study_uid is None else (" AND study_uid=?", (study_uid,))
    studies = query("SELECT study_uid, state, route, completed, last_received, updated FROM studies"
                    " WHERE state<>'purged'" + where, params)
    tables = {r[0] for r in query("SELECT name FROM sqlite_master WHERE type='table'", ())}
    has_deliveries = "deliveries" in tables
    commit_dests = _commitment_destinations(cfg)
    for s in studies:
        uid, state = s["study_uid"], s["state"]
        if state not in FINISHED:
            out.kept[uid] = {"receiving": "receiving", "complete": "queued", "queued": "queued",
                             "processing": "processing"}.get(state, state)
            continue
        jobs = query("SELECT job_id, state, finished, route, summary FROM jobs WHERE study_uid=?", (uid,))
        if any(j["state"] in ACTIVE_JOBS for j in jobs):
            out.kept[uid] = "processing"
            continue
        finished = max([s["completed"] or 0, s["last_received"] or 0]
                       + [j["finished"] or 0 for j in jobs])
        if has_deliveries and state != "purging":
            rows = query("SELECT job_id, destination, state, MAX(COALESCE(committed, sent, 0)) t, COUNT(*) n"
                         " FROM deliveries WHERE study_uid=? GROUP BY job_id, destination, state", (uid,))
            why = None
            for r in rows:
                if r["state"] == "pending":
                    why = "results not yet delivered"
                elif r["state"] in ("failed-permanent", "dead-letter"):
                    why = "results refused or dead-lettered"
                elif r["state"] == "sent" and r["destination"] in commit_dests:
                    why = why or "awaiting storage commitment"
                finished = max(finished, r["t"] or 0)
            if why is None:
                # a job's results are enqueued just after the job is marked done: until then they are not
                # "delivered", they are not yet known to delivery at all
                enqueued = {r["job_id"] for r in rows}
                for j in jobs:
                    if j["state"] == "done" and j["job_id"] not in enqueued and _delivery_wanted(cfg, j["route"]):
                        files = json.loads(j["summary"] or "{}").get("outbox_files") or []
                        if files:
                            why = "results not yet delivered"
                            break
            if why is not None:
                out.kept[uid] = why
                continue
        hours = retention_for(cfg, state, s["route"])
        out.candidates.append(Candidate(uid, state, finished, finished + hours * 3600.0, hours))
    return out
