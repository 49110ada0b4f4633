"""Named and scheduled runs: a lock per job, run history on disk, the beat schedule.

A run of a named job (by Celery beat, `embedctl jobs run`, or the `embedctl.run_job` task) first takes the job's
lock (a Redis key with a time-out when a broker is used, else an flock on the output folder); a run that finds
it taken is recorded as skipped. The run history is `OUT/runs.jsonl`, one JSON line per event, folded by run id.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from jobs import state
from jobs.specfile import NamedJob, load_jobs, parse_schedule
from pipeline.errors import ConfigError, EmbedctlError

LOG = logging.getLogger(__name__)

RUNS_FILE = "runs.jsonl"
LOCK_FILE = ".job.lock"


def jobs_path(explicit: str | None = None) -> Path:
    """The job spec file: --jobs, else EMBEDCTL_JOBS."""
    value = explicit or os.environ.get("EMBEDCTL_JOBS")
    if not value:
        raise ConfigError("no job spec file: set EMBEDCTL_JOBS or pass --jobs jobs.toml")
    return Path(value)


def beat_schedule(jobs: dict[str, NamedJob], queue: str | None = None) -> dict:
    """Celery beat entries, one per job with a schedule: they queue `embedctl.run_job(name)`."""
    entries = {}
    for name, job in jobs.items():
        if job.schedule is None:
            continue
        entries[f"embedctl:{name}"] = {"task": "embedctl.run_job", "schedule": parse_schedule(job.schedule),
                                       "args": (name,), "options": {"queue": queue} if queue else {}}
    return entries


def record(out: str | Path, event: dict) -> None:
    """Append one run event to OUT/runs.jsonl (an append of one line is atomic for these sizes)."""
    path = Path(out) / RUNS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({**event, "at": state.now()}, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def history(out: str | Path, limit: int | None = None) -> list[dict]:
    """Runs of the job in `out`, newest first, each the fold of its events."""
    path = Path(out) / RUNS_FILE
    runs: dict[str, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        runs.setdefault(event["run_id"], {}).update(event)
    ordered = list(runs.values())[::-1]  # runs in the order they started (first event), newest first
    return ordered[:limit] if limit else ordered


def _run_fields(report: dict, started: float) -> dict:
    return {"rows_embedded": report.get("rows_embedded", 0), "rows_reused": report.get("rows_reused", 0),
            "rows_deleted": report.get("rows_deleted", 0), "rows_indexed": report.get("rows_indexed"),
            "version": report.get("version"), "seconds": round(time.time() - started, 3)}


# -- locks -----------------------------------------------------------------------------------------------------

def _redis_key(name: str) -> str:
    return f"embedctl:lock:job:{name}"


def redis_acquire(settings, name: str, run_id: str) -> bool:
    import redis

    client = redis.Redis.from_url(settings.broker_url)
    return bool(client.set(_redis_key(name), run_id, nx=True, ex=settings.visibility_timeout))


def redis_release(settings, name: str, run_id: str) -> None:
    import redis

    client = redis.Redis.from_url(settings.broker_url)
    # delete only our own lock (a later run may hold it after a time-out)
    client.eval("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0",
                1, _redis_key(name), run_id)


@contextmanager
def file_lock(out: str | Path):
    """flock on OUT/.job.lock; yields False (without waiting) when another process holds it."""
    path = Path(out) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- runs ------------------------------------------------------------------------------------------------------

def run_embedded_job(job: NamedJob, progress=None) -> dict:
    """Run a named job in this process, under the output folder's lock; returns its run record."""
    from jobs.runner import run_embedded
    from pipeline.work import no_progress

    run_id, started = uuid.uuid4().hex[:12], time.time()
    base = {"run_id": run_id, "job": job.name, "mode": "embedded", "started": state.now()}
    with file_lock(job.spec.out) as acquired:
        if not acquired:
            event = {**base, "status": "skipped", "reason": "a run of this job is in progress"}
            record(job.spec.out, event)
            return event
        record(job.spec.out, {**base, "status": "running"})
        try:
            report = run_embedded(job.spec, progress=progress or no_progress)
        except EmbedctlError as exc:
            record(job.spec.out, {**base, "status": "failed", "error": str(exc)})
            raise
        event = {**base, "status": report["status"], **_run_fields(report, started)}
        record(job.spec.out, event)
        return event


def run_celery_job(job: NamedJob, settings) -> dict:
    """Start a named job on the Celery workers under the job's Redis lock (what beat and `jobs run` do).

    The chunks are queued and this returns; the build task finishes the run record and releases the lock.
    """
    from jobs.distributed import submit

    run_id = uuid.uuid4().hex[:12]
    base = {"run_id": run_id, "job": job.name, "mode": "celery", "started": state.now(), "started_ts": time.time()}
    if not redis_acquire(settings, job.name, run_id):
        event = {**base, "status": "skipped", "reason": "a run of this job is in progress"}
        record(job.spec.out, event)
        return event
    record(job.spec.out, {**base, "status": "running"})
    try:
        submitted = submit(job.spec, settings, job_name=job.name, run_id=run_id, started_ts=base["started_ts"])
    except BaseException as exc:
        record(job.spec.out, {**base, "status": "failed", "error": str(exc)})
        redis_release(settings, job.name, run_id)
        raise
    if submitted.up_to_date:
        event = {**base, "status": "up-to-date", "rows_embedded": 0, "rows_reused": 0, "rows_deleted": 0,
                 "rows_indexed": submitted.up_to_date["rows"], "version": submitted.up_to_date["version"],
                 "seconds": round(time.time() - base["started_ts"], 3)}
        record(job.spec.out, event)
        redis_release(settings, job.name, run_id)
        return event
    return {**base, "status": "running", "job_id": submitted.plan.plan_id,
            "chunks_submitted": submitted.chunks_submitted}


def finish_scheduled_run(plan, job: dict, report: dict) -> None:
    """Called by the build task of a named run: record the published run and release the job's lock."""
    reports = [plan.store.read_report(c.number) for c in plan.corpus.chunks]
    event = {"run_id": job["run_id"], "job": job["job_name"], "mode": "celery", "status": "published",
             "rows_embedded": sum(r["embedded"] for r in reports), "rows_reused": sum(r["reused"] for r in reports),
             "rows_deleted": report.get("rows_deleted", 0), "rows_indexed": report.get("rows_indexed"),
             "version": report.get("version"),
             "seconds": round(time.time() - job.get("started_ts", time.time()), 3)}
    record(plan.out, event)
    from tasks.app import app

    redis_release(app.conf.embedctl_settings, job["job_name"], job["run_id"])


def fail_scheduled_run(plan, job: dict, message: str) -> None:
    """Called when a chunk or the build of a named run fails for good."""
    record(plan.out, {"run_id": job["run_id"], "job": job["job_name"], "status": "failed", "error": message})
    from tasks.app import app

    redis_release(app.conf.embedctl_settings, job["job_name"], job["run_id"])


def load_named(name: str, path: Path) -> NamedJob:
    jobs = load_jobs(path)
    if name not in jobs:
        raise ConfigError(f"no job {name!r} in {path} (jobs: {', '.join(sorted(jobs)) or 'none'})")
    return jobs[name]

