"""Thin tasks: each takes paths and numbers, calls one step of a run (`embedctl.jobs.steps`) and returns a small
dict; vectors go to storage, never through Redis.

The build is queued by the task that completes the last chunk (counted on disk), not by a Celery chord: a chord
fails when a header task's child is killed (WorkerLostError is stored even when the task is requeued,
celery/celery#5106), while the chunk files survive requeues, duplicates and a Redis restart.
"""

from __future__ import annotations

import logging

from embedctl.jobs import steps
from embedctl.jobs.broker import BUILD_TASK, EMBED_TASK, PUBLISH_TASK, RUN_JOB_TASK, SEGMENT_TASK
from embedctl.pipeline.errors import WeightsLost
from embedctl.pipeline.storage import location
from embedctl.tasks.app import app, settings
from embedctl.tasks.worker import forget_lost_models, worker_cache, worker_encoder

LOG = logging.getLogger(__name__)


@app.task(bind=True, name=EMBED_TASK, max_retries=5)
def embed_chunk(self, work_dir: str, number: int, fresh: bool = False) -> dict:
    """Embed chunk `number` of the job in `work_dir` (skipped when complete); the last one queues the build.
    When the device weights' exporter exits mid-chunk, nothing is written and the chunk is queued again. `fresh`:
    a chunk discarded as damaged, embedded with an embedding cache read anew (never one that trusted a file
    before the damage was found)."""
    try:
        result = steps.run_chunk(location(work_dir), number, worker_encoder,
                                 lambda plan: worker_cache(plan, fresh=fresh), settings())
    except WeightsLost as exc:
        forget_lost_models()
        if self.request.retries >= self.max_retries:
            LOG.error("chunk %d: %s; out of retries (%d): the run fails", number, exc, self.max_retries)
            steps.fail_chunk(location(work_dir), number, f"{exc} ({self.max_retries} retries)", settings())
            raise
        LOG.error("chunk %d: %s (re-queued)", number, exc)
        raise self.retry(countdown=2 ** self.request.retries) from None
    if result.get("build_due"):
        build_index.apply_async((work_dir,))
    return result


@app.task(bind=True, name=BUILD_TASK, max_retries=None)
def build_index(self, work_dir: str) -> dict:
    """Plan the build of a complete job and queue its pieces (one task per new segment and dim, on any host);
    retried while another planner of the job holds its lease."""
    result = steps.run_build(location(work_dir), settings())
    if result["status"] == "busy":
        raise self.retry(countdown=result["retry_in"])
    for number in result.get("chunks", []):  # damaged chunks, discarded: embedded again
        embed_chunk.apply_async((work_dir, number), {"fresh": True})
    for segment, dim in result.get("pieces", []):
        build_segment.apply_async((work_dir, result["key"], segment, dim))
    return {k: v for k, v in result.items() if k != "pieces"} | {"pieces": len(result.get("pieces", []))}


@app.task(bind=True, name=SEGMENT_TASK)
def build_segment(self, work_dir: str, key: str, segment: str, dim: int) -> dict:
    """Build one segment's index of one dim; the last piece of the job (counted on disk) queues the publish."""
    result = steps.run_piece(location(work_dir), key, segment, dim, settings())
    if result.get("publish_due"):
        publish.apply_async((work_dir, key))
    return result


@app.task(bind=True, name=PUBLISH_TASK, max_retries=None)
def publish(self, work_dir: str, key: str) -> dict:
    """Publish a job whose pieces are built; retried while another publish of it holds the job's lease."""
    result = steps.run_publish(location(work_dir), key, settings())
    if result["status"] == "busy":
        raise self.retry(countdown=result["retry_in"])
    return result


@app.task(bind=True, name=RUN_JOB_TASK)
def run_job(self, name: str, jobs_file: str | None = None) -> dict:
    """Start a run of the named job of the spec file (EMBEDCTL_JOBS): what beat queues."""
    from embedctl.jobs.schedule import start_named_run

    return start_named_run(name, settings(), jobs_file)
