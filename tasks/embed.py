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
from tasks.worker import worker_encoder

LOG = logging.getLogger(__name__)


@app.task(bind=True, name="embedctl.embed_chunk")
def embed_chunk(self, work_dir: str, number: int) -> dict:
    """Embed chunk `number` of the job in `work_dir` (skipped when complete); the last one queues the build."""
    plan = load_plan(Path(work_dir))
    try:
        summary = work.embed_chunk(plan, number, worker_encoder(plan))
    except EmbedctlError as exc:
        state.record_failure(plan, f"chunk-{number:06d}", f"chunk {number}: {exc}")
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
            raise
        report = state.finish(plan, info, {"job_id": plan.plan_id, "out": plan.out, "mode": "celery"})
        return {"status": "published", "version": report["version"], "rows": report["rows_indexed"]}
    finally:
        try:
            lock.release()
        except Exception:  # noqa: BLE001 - the lock expires by itself
            LOG.debug("build lock of %s already gone", plan.plan_id)
