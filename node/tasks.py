"""Celery side: the app both listener and workers build, and the one task, ``run_pipeline``.

Workers never open the state database. A task gets everything in its arguments (instance paths,
options, where to write), writes the ``PipelineResult`` and the validated result objects under
``storage_dir``, including ``summary.json``, which is what the listener reads: nothing is kept in Celery's
result backend (``task_ignore_result``), so Redis holds only the queue, the leases and nothing per finished job.
The task is idempotent per job: a re-delivered message finds the saved summary and returns it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu import Queue

from node.lease import Lease, LeaseLost, redis_client

if TYPE_CHECKING:
    from pipelines.policy import CriticalPolicy

log = logging.getLogger(__name__)

TASK_NAME = "ainode.run_pipeline"
PRIORITY = {"stat": 0, "routine": 6}  # kombu's Redis transport serves lower numbers first
QUEUES = ("cpu", "gpu")


@dataclass
class JobSpec:
    job_id: str
    study_uid: str
    pipeline: str
    paths: list[str]
    result_dir: str
    outbox_dir: str
    options: dict[str, Any] = field(default_factory=dict)
    language: str = "en"
    encode: bool = True
    sr_class: str = "comprehensive"
    predecessors: list[dict[str, str]] = field(default_factory=list)
    device_uid: str = ""  # the node's Device Observer UID: the same on every report this node writes
    lease_s: float = 0.0  # workers.lease_seconds: the attempt holds a renewed lease in Redis (node.lease); 0 = none
    critical: dict[str, float | None] = field(default_factory=dict)  # the route's critical: keys, as written
    thresholds: dict[str, Any] = field(default_factory=dict)  # the route's thresholds: keys, as written
    #: The effective policy the listener resolved (``CriticalPolicy.to_dict``); None when the listener could
    #: not read the model's manifest: the worker resolves ``critical``/``thresholds`` itself, same rules.
    policy: dict[str, Any] | None = None
    min_free_mb: int = 0  # node.min_free_disk_mb: result objects are not written into the last of the disk


#: how often, and how far apart, a job waits for free space before it fails (30 min in all)
STORAGE_RETRIES, STORAGE_RETRY_S = 30, 60


class StorageLow(Exception):
    """Too little free space to write the result objects now: the job waits and tries again (it is not
    "encoding failed", which would lose the result for good), while the lifecycle frees space."""


def _check_space(spec: JobSpec) -> None:
    where = Path(spec.outbox_dir).parent
    where.mkdir(parents=True, exist_ok=True)
    free_mb = shutil.disk_usage(where).free // 2**20
    if spec.min_free_mb and free_mb < spec.min_free_mb:
        raise StorageLow(f"free space {free_mb} MB on {where} is below node.min_free_disk_mb "
                         f"({spec.min_free_mb} MB): the result objects wait for space")


def make_app(broker_url: str, *, task_time_limit: int = 900, max_retries: int = 3,
             visibility_timeout: int | None = None) -> Celery:
    app = Celery("ainode", broker=broker_url, backend=broker_url)
    vt = visibility_timeout or int(os.environ.get("AINODE_VISIBILITY_TIMEOUT", task_time_limit + 60))
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_track_started=True, task_time_limit=task_time_limit, task_soft_time_limit=max(5, task_time_limit - 15),
        task_ignore_result=True, result_expires=3600, result_extended=False,
        task_default_queue="cpu", task_queues=[Queue(q) for q in QUEUES],
        task_default_priority=PRIORITY["routine"],
        broker_transport_options={"priority_steps": list(range(10)), "sep": ":",
                                  "queue_order_strategy": "priority", "visibility_timeout": vt},
        result_backend_transport_options={"visibility_timeout": vt},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False, worker_redirect_stdouts=False,
        worker_send_task_events=False, task_send_sent_event=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    app.conf.ainode_max_retries = max_retries

    @app.task(name=TASK_NAME, bind=True, max_retries=max_retries)
    def run_pipeline(self: Any, spec: dict[str, Any]) -> dict[str, Any]:
        job = JobSpec(**spec)
        attempt = self.request.retries + 1
        lease = _lease(self.app, job)
        try:
            return execute_job(job, attempt, lease)
        except StorageLow as exc:
            if self.request.retries < STORAGE_RETRIES:
                log.warning("job %s: %s; trying again in %d s (attempt %d)", job.job_id, exc, STORAGE_RETRY_S,
                            attempt)
                if lease is not None:
                    lease.hand_over(STORAGE_RETRY_S)
                raise self.retry(exc=exc, countdown=STORAGE_RETRY_S, max_retries=STORAGE_RETRIES) from exc
            _write_json(Path(job.result_dir) / "failed.json",
                        {"error": f"StorageLow: {exc}", "attempts": attempt, "at": time.time()})
            if lease is not None:
                lease.release()
            raise
        except LeaseLost:
            log.warning("job %s: attempt %d lost its lease to another attempt; it completes nothing", job.job_id,
                        attempt)
            if lease is not None:
                lease.release()
            return {"job_id": job.job_id, "status": "superseded"}
        except Exception as exc:
            log.exception("job %s failed (attempt %d)", job.job_id, attempt)
            if self.request.retries < self.max_retries:
                countdown = min(60, 2 ** self.request.retries)
                if lease is not None:
                    lease.hand_over(countdown)  # the retry takes the job over; the listener must not re-queue it
                raise self.retry(exc=exc, countdown=countdown) from exc
            if lease is None or _holds(lease):
                _write_json(Path(job.result_dir) / "failed.json",
                            {"error": f"{type(exc).__name__}: {exc}", "attempts": attempt, "at": time.time()})
            if lease is not None:
                lease.release()
            raise

    return app


_REDIS: dict[str, Any] = {}


def _lease(app: Celery, job: JobSpec) -> Lease | None:
    if not job.lease_s:
        return None
    url = str(app.conf.broker_url)
    if url not in _REDIS:
        _REDIS[url] = redis_client(url)
    return Lease(_REDIS[url], job.job_id, job.lease_s)


def _holds(lease: Lease) -> bool:
    try:
        lease.check()
        return True
    except LeaseLost:
        return False


def send_job(app: Celery, spec: JobSpec, queue: str, priority: str) -> str:
    res = app.send_task(TASK_NAME, args=[asdict(spec)], task_id=spec.job_id, queue=queue,
                        priority=PRIORITY.get(priority, PRIORITY["routine"]))
    return str(res.id)


# ---------------------------------------------------------------- worker side
_PIPELINES: dict[tuple[str, str], Any] = {}


def get_pipeline(name: str, options: dict[str, Any]) -> Any:
    """Pipelines (and their models) load once per worker process and stay warm."""
    from pipelines.registry import pipeline_class

    key = (name, json.dumps(options, sort_keys=True, default=str))
    if key not in _PIPELINES:
        _PIPELINES[key] = pipeline_class(name)(options)
    return _PIPELINES[key]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str), encoding="utf-8")
    os.replace(tmp, path)


def execute_job(spec: JobSpec, attempt: int = 1, lease: Lease | None = None) -> dict[str, Any]:
    """Run one job once: an flock on the job's directory serialises duplicate deliveries of it on one host
    (the kernel drops the lock when a worker dies, so a killed worker never blocks the re-run), and the
    job's lease (node.lease) does so across hosts and tells the listener this attempt is alive.
    On success the lease is released; on an exception the caller hands it over or releases it."""
    out = Path(spec.result_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if summary_path.exists():  # re-delivered after a crash, or a duplicate: the work is done
            return json.loads(summary_path.read_text(encoding="utf-8"))
        if lease is not None and not lease.acquire(done=summary_path.exists):
            return json.loads(summary_path.read_text(encoding="utf-8"))  # another attempt finished it
        _write_json(out / "started.json", {"at": time.time(), "attempt": attempt, "pid": os.getpid()})
        summary = _execute(spec, out, summary_path, lease)
        if lease is not None:
            lease.release()
        return summary


def _execute(spec: JobSpec, out: Path, summary_path: Path, lease: Lease | None = None) -> dict[str, Any]:
    from pipelines.base import ModelUnavailable, PipelineResult, Refused

    t0 = time.time()
    if spec.encode:
        _check_space(spec)  # before inference: no point computing what cannot be written
    pipeline = get_pipeline(spec.pipeline, spec.options)
    try:
        from node.loader import load_study

        study = load_study(spec.paths, options=spec.options, language=spec.language,
                           pixels=getattr(pipeline, "needs_pixels", True))
        study.policy = _policy(spec, pipeline)
        pipeline.check(study)
        result = pipeline.run(study)
    except Refused as exc:
        result = PipelineResult(spec.pipeline, getattr(pipeline, "version", ""), status="refused", reason=str(exc))
    except ModelUnavailable as exc:
        result = PipelineResult(spec.pipeline, getattr(pipeline, "version", ""), status="model_unavailable",
                                reason=str(exc))
    t_run = time.time()
    result.save(out)
    # tell the listener now: a critical finding is announced before encoding and validation finish
    _write_json(out / "result_ready.json", {"at": t_run, "critical": result.critical, "status": result.status})
    files: list[str] = []
    validation_error = ""
    if lease is not None:
        lease.check()  # a superseded attempt stops before it writes result objects
    if result.status == "ok" and spec.encode:
        files, validation_error = _encode(result, spec)
    summary = {
        "job_id": spec.job_id, "status": result.status if not validation_error else "invalid_output",
        "reason": result.reason or validation_error, "critical": result.critical, "unverified": result.unverified,
        "findings": [{"label": f.label, "present": f.present, "probability": f.probability, "critical": f.critical}
                     for f in result.findings],
        "n_measurements": len(result.measurements), "warnings": result.warnings,
        "outbox_files": files, "started": t0, "finished": time.time(), "run_seconds": round(t_run - t0, 3),
        "worker_pid": os.getpid(),
    }
    if lease is not None:
        lease.check()  # only the attempt holding the lease completes the job
    _write_json(summary_path, summary)
    return summary


def _policy(spec: JobSpec, pipeline: Any) -> CriticalPolicy | None:
    """The job's critical policy: as the listener resolved it, else resolved here from the route's keys.

    Either way it is decided before the pipeline runs; the pipeline flags each finding from it and every
    output reads the flags (nothing re-decides after the run)."""
    from pipelines.policy import CriticalPolicy, resolve

    if spec.policy is not None:
        return CriticalPolicy.from_dict(spec.policy)
    if not spec.critical and not spec.thresholds:
        return None  # the pipeline uses the manifest it loads
    try:
        vocab = pipeline.vocabulary(spec.options)
    except Exception as exc:  # no manifest: the pipeline reports the model unavailable
        log.warning("job %s: route critical policy not applied: %s", spec.job_id, exc)
        return None
    if vocab is None:
        return None
    policy, problems = resolve(vocab, spec.critical, spec.thresholds, strict=False)
    for where, message in problems:
        log.warning("job %s: %s: %s", spec.job_id, where, message)
    return policy


def _encode(result: Any, spec: JobSpec) -> tuple[list[str], str]:
    """Result objects go to the outbox only if every one of them validates."""
    try:
        from node.results import EncodeOptions, SOPRef, ValidatedWriter, ValidationFailed, encode
    except ImportError:  # results writer not installed: keep the PipelineResult only
        log.warning("node.results not available; job %s produced no DICOM objects", spec.job_id)
        return [], ""
    preds = [SOPRef(**p) for p in spec.predecessors]
    opts = EncodeOptions(language=spec.language, sr_class=spec.sr_class, predecessors=preds,
                         device_uid=spec.device_uid or None)
    _check_space(spec)
    try:
        with ValidatedWriter(Path(spec.outbox_dir)) as writer:  # each object validated while the next is made
            encode(result, [Path(p) for p in spec.paths], opts, on_object=writer.add)
            paths = writer.commit()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the writer left nothing behind; try again later
            raise StorageLow(f"disk full while writing the result objects: {exc}") from exc
        log.error("job %s: encoding failed: %s", spec.job_id, traceback.format_exc())
        return [], f"encoding failed: {exc}"
    except ValidationFailed as exc:
        log.error("job %s: result objects failed validation: %s", spec.job_id, exc)
        return [], f"result objects failed validation: {exc}"
    except Exception as exc:
        log.error("job %s: encoding failed: %s", spec.job_id, traceback.format_exc())
        return [], f"encoding failed: {exc}"
    return [str(p) for p in paths], ""
