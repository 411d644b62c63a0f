"""Operator actions: re-run a study, re-send a result to a destination, retry what a destination
dead-lettered, cancel a queued job.

Each one is confirmed (a first POST shows what will happen and mints an action id; the second carries
it), audited, and idempotent twice over: a repeated action id returns the recorded outcome without
acting again, and each action is a no-op when its effect is already there (a re-run while jobs are
active, a re-send of rows already pending, a cancel of a job no longer queued).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from node.jobs import ACTIVE

if TYPE_CHECKING:
    from node.service import Listener
    from node.web.server import Console

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS console_actions (
    action_id TEXT PRIMARY KEY,
    at REAL NOT NULL, who TEXT, kind TEXT NOT NULL, target TEXT, result TEXT
);
"""


class ActionError(Exception):
    """The action cannot be done; the message says why, in words for IT staff."""


class Operations:
    def __init__(self, listener: Listener):
        self.listener = listener
        listener.state.ensure_schema(SCHEMA)

    def _delivery(self) -> Any:
        if self.listener.delivery is None:
            raise ActionError("no destinations are configured, so nothing is delivered")
        return self.listener.delivery

    def rerun(self, study_uid: str, who: str) -> str:
        """The same re-run as ``ainode rerun`` (node.lifecycle.rerun): a purged study is answered with when
        its instances went, a busy one with "nothing done"."""
        from node.lifecycle.rerun import RerunRefused, StudyPurged, rerun_study

        st = self.listener.state
        active = st.one(f"SELECT COUNT(*) n FROM jobs WHERE study_uid=? AND state IN ({','.join('?' * len(ACTIVE))})",
                        (study_uid, *ACTIVE))["n"]
        if active:
            return f"nothing done: {active} job(s) of this study are still queued or running"
        try:
            created = rerun_study(st, self.listener.jobs, study_uid, publish=False)
        except StudyPurged as exc:
            raise ActionError(str(exc)) from None
        except RerunRefused as exc:
            raise ActionError(str(exc)) from None
        st.event("console", f"re-run of {len(created)} pipeline job(s) asked by {who}", study_uid)
        # the scheduler thread is the one that publishes: ask it to do its periodic pass at its next tick
        self.listener._last_housekeeping = 0.0
        self.listener._wake.set()
        return f"{len(created)} job(s) queued again"

    def resend(self, job_id: str, destination: str, who: str) -> str:
        st = self.listener.state
        delivery = self._delivery()
        if destination not in delivery.destinations:
            raise ActionError(f"destination {destination!r} is not configured")
        job = st.one("SELECT study_uid, summary, state FROM jobs WHERE job_id=?", (job_id,))
        if job is None or job["state"] != "done":
            raise ActionError("only a finished job's results can be re-sent")
        files = json.loads(job["summary"] or "{}").get("outbox_files") or []
        if not files:
            raise ActionError("this job produced no result objects to send")
        if not any(Path(f).is_file() for f in files):  # the storage lifecycle deleted them once delivered
            raise ActionError("the result files were deleted once every destination had confirmed them; keep them"
                              " longer with node.outbox_audit_hours, or re-run the study to make new ones")
        n_new = delivery.enqueue(job["study_uid"], job_id, files, [destination], "stat")
        n_again = st.execute("UPDATE deliveries SET state='pending', attempts=0, next_attempt=?, last_error=NULL"
                             " WHERE job_id=? AND destination=? AND state<>'pending'",
                             (time.time(), job_id, destination))
        delivery.wake()
        st.event("console", f"re-send of job {job_id[:8]} to {destination} asked by {who}", job["study_uid"])
        if not n_new and not n_again:
            return f"nothing done: the result objects are already waiting to go to {destination}"
        return f"{n_new + n_again} result object(s) will be sent to {destination}"

    def retry_dead(self, destination: str, who: str) -> str:
        n = self._delivery().retry_failed(destination=destination)
        self.listener.state.event("console", f"retry of {n} failed deliveries to {destination} asked by {who}")
        return f"{n} failed or dead-lettered object(s) queued again for {destination}" if n else \
            f"nothing done: no failed or dead-lettered deliveries for {destination}"

    def cancel(self, job_id: str, who: str) -> str:
        st = self.listener.state
        job = st.one("SELECT study_uid, state, celery_id FROM jobs WHERE job_id=?", (job_id,))
        if job is None:
            raise ActionError("no such job")
        n = st.execute("UPDATE jobs SET state='cancelled', finished=?, reason=? WHERE job_id=? AND"
                       " state IN ('pending','queued')", (time.time(), f"cancelled by {who}", job_id))
        if not n:
            return f"nothing done: the job is {job['state']}, only a pending or queued job can be cancelled"
        if job["celery_id"]:
            try:  # a worker that has not taken it yet drops it; one that has is told its result is unwanted
                self.listener.app.control.revoke(job["celery_id"])
            except Exception as exc:
                log.warning("cancel job %s: revoke not sent (%s); its result will be ignored", job_id, exc)
        self.listener.jobs._refresh_study(job["study_uid"])
        gen_states = {r["state"] for r in st.query(
            "SELECT j.state FROM jobs j JOIN studies s USING(study_uid) WHERE j.study_uid=? AND"
            " j.generation=s.generation", (job["study_uid"],))}
        if gen_states == {"cancelled"}:
            st.execute("UPDATE studies SET state='cancelled' WHERE study_uid=?", (job["study_uid"],))
        st.event("console", f"job {job_id[:8]} cancelled by {who}", job["study_uid"])
        return "job cancelled"


KINDS = {
    "rerun": ("Re-run every pipeline of study {study_uid}", ("study_uid",)),
    "resend": ("Send the result objects of job {job_id} to {destination} again", ("study_uid", "job_id",
                                                                                    "destination")),
    "retry-dead": ("Retry every failed or dead-lettered delivery to {destination}", ("destination",)),
    "cancel": ("Cancel queued job {job_id}", ("study_uid", "job_id")),
}


def routes(c: Console) -> list[Route]:
    ops = Operations(c.listener)

    def run(kind: str, f: dict[str, str], who: str) -> str:
        if kind == "rerun":
            return ops.rerun(f["study_uid"], who)
        if kind == "resend":
            return ops.resend(f["job_id"], f["destination"], who)
        if kind == "retry-dead":
            return ops.retry_dead(f["destination"], who)
        return ops.cancel(f["job_id"], who)

    async def action(request: Request) -> Response:
        who = await c.require(request, "admin")
        kind = request.path_params["kind"]
        if kind not in KINDS:
            return c.page(request, "message.html", status=404, title="Unknown action", error_text=kind)
        form = await request.form()
        text, keys = KINDS[kind]
        fields = {k: str(form.get(k, "")) for k in keys}
        back = f"/studies/{quote(fields['study_uid'])}" if fields.get("study_uid") else "/config"
        if form.get("confirmed") != "yes":
            return c.page(request, "confirm.html", kind=kind, fields=fields, back=back,
                          description=text.format(**fields), action_id=secrets.token_hex(12))
        action_id = str(form.get("action_id", ""))[:64] or secrets.token_hex(12)
        prior = c.listener.state.one("SELECT result FROM console_actions WHERE action_id=?", (action_id,))
        if prior is not None:
            result, outcome = f"already done: {prior['result']}", "repeat"
        else:
            try:
                result, outcome = await run_in_threadpool(run, kind, fields, who.name), "ok"
            except ActionError as exc:
                result, outcome = str(exc), "refused"
            c.listener.state.execute("INSERT OR IGNORE INTO console_actions(action_id, at, who, kind, target, result)"
                                     " VALUES (?,?,?,?,?,?)", (action_id, time.time(), who.name, kind,
                                                               json.dumps(fields), result))
        c.audit.write(who=who.name, role=who.role, ip=c.ip(request), action=kind, target=json.dumps(fields),
                      outcome=outcome, detail=result)
        sep = "&" if "?" in back else "?"
        return RedirectResponse(f"{back}{sep}msg={quote(result)}", status_code=303)

    return [Route("/actions/{kind}", action, methods=["POST"])]
