"""Thin tasks: embed one chunk, build and publish the indexes. They take paths and chunk numbers, call
`pipeline` functions and return small dicts; vectors go to storage, never through Redis.

The build is triggered by the task that completes the last chunk (counted on disk), not by a Celery chord:
a chord fails when a header task's child is killed (WorkerLostError is stored even when the task is
requeued, celery/celery#5106), while the chunk files survive requeues, duplicates and a Redis restart.
"""

from __future__ import annotations

import logging
from pathlib import Path

from jobs import state
from pipeline import work
from pipeline.errors import EmbedctlError
from pipeline.plan import load_plan
from tasks.app import app
from tasks.worker import worker_cache, worker_encoder

LOG = logging.getLogger(__name__)


@app.task(bind=True, name="embedctl.embed_chunk")
def embed_chunk(self, work_dir: str, number: int) -> dict:
    """Embed chunk `number` of the job in `work_dir` (skipped when complete); the last one queues the build."""
    plan = load_plan(Path(work_dir))
    try:
        summary = work.embed_chunk(plan, number, lambda: worker_encoder(plan), cache=worker_cache(plan))
    except EmbedctlError as exc:
        state.record_failure(plan, f"chunk-{number:06d}", f"chunk {number}: {exc}")
        _on_failed(plan, f"chunk {number}: {exc}")
        raise
    if not work.missing_chunks(plan):
        build_index.apply_async((work_dir,))
    return summary


@app.task(bind=True, name="embedctl.build_index")
def build_index(self, work_dir: str) -> dict:
    """Build and publish the indexes of a complete job (idempotent; one build a job at a time)."""
    plan = load_plan(Path(work_dir))
    if state.published_info(plan):
        return {"status": "up-to-date"}
    settings = app.conf.embedctl_settings
    import redis

    client = redis.Redis.from_url(settings.broker_url)
    lock = client.lock(f"embedctl:build:{plan.plan_id}", timeout=settings.visibility_timeout, blocking=False)
    if not lock.acquire():
        return {"status": "skipped", "reason": "another build of this job is running"}
    try:
        if state.published_info(plan):
            return {"status": "up-to-date"}
        try:
            info = work.build_and_publish(plan)
        except EmbedctlError as exc:
            state.record_failure(plan, "build", f"build: {exc}")
            _on_failed(plan, f"build: {exc}")
            raise
        job = state.read_job(plan)
        report = state.finish(plan, info, {"job_id": plan.plan_id, "out": plan.out, "mode": "celery"},
                              keep=job.get("keep"))
        on_published(plan, job, report)
        return {"status": "published", "version": report["version"], "rows": report["rows_indexed"]}
    finally:
        try:
            lock.release()
        except Exception:  # noqa: BLE001 - the lock expires by itself
            LOG.debug("build lock of %s already gone", plan.plan_id)


@app.task(bind=True, name="embedctl.run_job")
def run_job(self, name: str, jobs_file: str | None = None) -> dict:
    """Run the named job of the spec file (EMBEDCTL_JOBS): what beat queues. Skipped while a run is in progress."""
    from jobs.schedule import jobs_path, load_named, run_celery_job

    settings = app.conf.embedctl_settings
    job = load_named(name, jobs_path(jobs_file or settings.jobs_path))
    event = run_celery_job(job, settings)
    return {k: event.get(k) for k in ("run_id", "job", "status", "reason", "version")}


def on_published(plan, job: dict, report: dict) -> None:
    """Scheduled runs: record the published run and release the job's lock; plain jobs need nothing."""
    if job.get("job_name"):
        from jobs.schedule import finish_scheduled_run

        finish_scheduled_run(plan, job, report)


def _on_failed(plan, message: str) -> None:
    job = state.read_job(plan)
    if job.get("job_name"):
        from jobs.schedule import fail_scheduled_run

        fail_scheduled_run(plan, job, message)
