"""The worker side of a run: the steps a Celery task runs (embed a chunk, plan the build, build a piece,
publish), each joined to the run that owns the work folder through one context manager, `step`.

`step` does what every step needs around its work, once:
- joins the run (`lifecycle.Run.load`); a run that is gone, or whose build plan is gone, answers `superseded`
  and the step does nothing;
- answers at once when there is nothing to do (`done`: a chunk already complete, a run already ended), or when
  another process holds the job's build lease (`exclusive`: `busy`, retried by the task);
- beats while the work runs (a heartbeat file, the run's lease, the build lease) and ends the heartbeat after;
- a run superseded mid-step (it lost its lease before the swap) ends as failed and the step answers
  `superseded`; a step that fails for good (an EmbedctlError) records the failure and fails the run, then
  raises. WeightsLost is not a failure: the task retries the chunk on the restarted exporter's weights.

The state machine runs without Celery: tests call these functions with a work folder and a lease.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from embedctl.jobs import locks, state
from embedctl.jobs.lifecycle import Run, Superseded, discard_chunks, fail
from embedctl.jobs.publishing import publish_build
from embedctl.jobs.report import RunReport
from embedctl.pipeline import s3
from embedctl.pipeline.compose import BuildPlan, load_build
from embedctl.pipeline.errors import EmbedctlError, StorageError, WeightsLost
from embedctl.pipeline.plan import WorkPlan
from embedctl.pipeline.vectors import DamagedChunks, chunk_name
from embedctl.pipeline.work import embed_chunk, missing_chunks

if TYPE_CHECKING:
    from embedctl.jobs.broker import Settings

LOG = logging.getLogger(__name__)


@dataclass
class Step:
    """A step joined to its run: `answer` is set when the step must not work (or was superseded mid-way): the
    task returns it."""

    run: Run | None
    build: BuildPlan | None = None
    answer: dict | None = None
    extra: dict = field(default_factory=dict)  # fields every answer carries (the chunk number)

    def answers(self, status: str, **values) -> dict:
        self.answer = {**self.extra, "status": status, **values}
        return self.answer


@contextmanager
def step(work_dir: Path, settings: Settings | None, what: str, label: str, *, key: str | None = None,
         done: Callable[[Run], dict | None] | None = None, exclusive: bool = False, failure: str | None = None,
         extra: dict | None = None) -> Iterator[Step]:
    """Join the run that owns `work_dir` and keep it informed while the block works (see the module docstring).

    `what`: the heartbeat's name (chunk-000003, build, piece-..., publish); `label`: how logs and failures name
    the step; `key`: the build plan to load; `done`: an answer to give without working, or None; `exclusive`: hold
    the job's build lease (one planner or publisher of a job at a time); `failure`: the name the failure is
    recorded under (default `what`); `extra`: fields of every answer. The block returns `step.answer` when set.
    """
    try:
        run = Run.load(work_dir, settings)
        build = load_build(run.plan, key) if key else None
    except (Superseded, StorageError) as exc:
        LOG.info("%s: %s; nothing to do", label, exc)
        s = Step(None, extra=extra or {})
        s.answers("superseded")
        yield s
        return
    s = Step(run, build, extra=extra or {})
    s.answer = done(run) if done else None
    lease = _build_lease(run, settings) if exclusive and s.answer is None else None
    if lease is not None and not lease.acquire():
        s.answers("busy", retry_in=max(1.0, settings.lease_seconds / 3))
        lease = None
    if s.answer is not None:
        yield s
        return
    with working(s, what, label, failure, lease):
        yield s


@contextmanager
def working(s: Step, what: str, label: str, failure: str | None = None,
            lease: locks.Lease | None = None) -> Iterator[Step]:
    """The heartbeat and failure handling of a joined step (`step`); `lease` (released at the end) is renewed
    with the run's."""
    run = s.run
    beat = _beat(run, what)
    renew = (lambda: lease.renew() and beat()) if lease is not None else beat
    before = s3.requests()
    try:
        beat()
        with locks.keep_alive(renew, run.lease_seconds / 3, f"{label} of {run.plan.plan_id}"):
            yield s
    except WeightsLost:
        raise  # not a failure of the step: the task retries it
    except Superseded as exc:
        fail(run, str(exc))
        s.answers("superseded")
    except EmbedctlError as exc:
        message = f"{label}: {exc}"
        state.record_failure(run.plan, failure or what, message)
        fail(run, message)
        raise
    finally:
        state.end_heartbeat(run.plan, what)
        with contextlib.suppress(EmbedctlError):
            state.record_requests(run.plan, run.run_id, what, s3.requests_since(before))
        if lease is not None:
            lease.release()


def _beat(run: Run, what: str) -> Callable[[], bool]:
    def beat() -> bool:
        alive = state.heartbeat(run.plan, what, run.run_id)
        return run.renew() and alive

    return beat


def _build_lease(run: Run, settings: Settings) -> locks.RedisLease:
    return locks.RedisLease(settings, locks.build_key(run.plan.out, run.plan.plan_id),
                            json.dumps(locks.holder_record(run.run_id, "celery", run.record.job)))


def _ended(run: Run) -> dict | None:
    return {"status": "ended"} if run.ended else None


def run_chunk(work_dir: Path, number: int, encoder_for: Callable[[WorkPlan], object],
              cache_for: Callable[[WorkPlan], object], settings: Settings | None) -> dict:
    """Embed chunk `number` of the job in `work_dir` (what the Celery chunk task runs); returns a small summary
    with `build_due` set when it completed the job's last chunk. A chunk that fails for good fails the run."""
    def complete(run: Run) -> dict | None:
        if run.plan.store.is_complete(number):
            return {"chunk": number, "skipped_complete": True, "build_due": not missing_chunks(run.plan)}
        return None

    with step(work_dir, settings, chunk_name(number), f"chunk {number}", done=complete,
              extra={"chunk": number}) as s:
        if s.answer:
            return s.answer
        plan = s.run.plan
        summary = embed_chunk(plan, number, lambda: encoder_for(plan), cache=cache_for(plan),
                              stamp={"run_id": s.run.run_id})
    if s.answer:  # superseded on the way (the run was recorded failed)
        return s.answer
    return {**summary, "build_due": not missing_chunks(plan)}


def fail_chunk(work_dir: Path, number: int, message: str, settings: Settings | None) -> None:
    """Record that chunk `number` failed for good outside `run_chunk` (a task out of retries): the run fails."""
    try:
        run = Run.load(work_dir, settings)
    except Superseded:
        return
    message = f"chunk {number}: {message}"
    state.record_failure(run.plan, chunk_name(number), message)
    fail(run, message)


def run_build(work_dir: Path, settings: Settings) -> dict:
    """Plan the build of a complete job (what the Celery build task runs): returns the pieces to queue, one per
    new segment and dim (`{"status": "building", "key": ..., "pieces": [[segment, dim], ...]}`), or publishes at
    once when none is missing. One planner of a job at a time: `{"status": "busy", "retry_in": s}` while another
    holds the job's build lease (a planner whose worker died frees it within `lease_seconds`)."""
    from embedctl.pipeline.build import plan_build

    with step(work_dir, settings, "build", "build", done=_ended, exclusive=True) as s:
        if s.answer:
            return s.answer
        try:
            build = plan_build(s.run.plan)
            if build.missing():
                return {"status": "building", "key": build.key, "pieces": [list(p) for p in build.missing()]}
            return _publish(s, build)
        except DamagedChunks as damaged:  # embed them again: the last of them queues the build again
            LOG.warning("%s: queueing them again", damaged)
            discard_chunks(s.run, damaged.chunks)
            return {"status": "re-embedding", "chunks": damaged.chunks}
    return s.answer


def run_piece(work_dir: Path, key: str, segment: str, dim: int, settings: Settings) -> dict:
    """Build one index piece (a segment's index of one dim) of a job (what the Celery segment task runs); returns
    `publish_due` when it was the last piece (counted on disk)."""
    from embedctl.pipeline.build import build_piece

    with step(work_dir, settings, f"piece-{segment}-{dim}", f"segment {segment}, dim {dim}", key=key,
              failure="build") as s:
        if s.answer:
            return s.answer
        build_piece(s.run.plan, s.build, segment, dim)
    if s.answer:  # superseded on the way (the run was recorded failed)
        return s.answer
    return {"status": "built", "segment": segment, "dim": dim, "publish_due": not s.build.missing()}


def run_publish(work_dir: Path, key: str, settings: Settings) -> dict:
    """Publish a job whose pieces are all built (what the Celery publish task runs), once."""
    with step(work_dir, settings, "publish", "publish", key=key, done=_ended, exclusive=True, failure="build") as s:
        if s.answer:
            return s.answer
        return _published(publish_build(s.run, s.build))
    return s.answer  # superseded before the swap


def _publish(s: Step, build: BuildPlan) -> dict:
    """Publish from the build step, under the job's build lease that it holds (a step of its own within it)."""
    with working(s, "publish", "publish", failure="build"):
        return _published(publish_build(s.run, build))
    return s.answer  # superseded before the swap


def _published(report: RunReport) -> dict:
    return {"status": "published", "version": report.version, "rows": report.rows_indexed}
