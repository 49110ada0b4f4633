"""The Celery submitter: begin the run, queue only the missing chunks (by task name), follow it to the publish.

The follower reads the run state from disk (chunk files, heartbeats, failures, the run report), so it shows the
same truth as `embedctl status` and survives a Redis restart; Ctrl-C leaves the job running on the workers.
While it follows, it keeps the run's lease alive and watches for stalls: chunks (or the build) whose worker died
are re-queued after `stall_seconds` instead of the visibility time-out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from embedctl.jobs import lifecycle, locks, state
from embedctl.jobs.broker import (
    BUILD_TASK,
    EMBED_TASK,
    PUBLISH_TASK,
    SEGMENT_TASK,
    Settings,
    check_broker,
    clean,
    queued_args,
    require_consumers,
    sender,
)
from embedctl.jobs.report import RunReport, read_report
from embedctl.jobs.spec import JobSpec
from embedctl.pipeline.errors import BrokerError, EmbedctlError, StorageError
from embedctl.pipeline.work import ProgressFactory, missing_chunks, no_progress

LOG = logging.getLogger(__name__)

WORKER_WAIT_SECONDS = 5.0
"""How long a submitter waits for a worker that is starting to answer before it says that none consumes a queue."""


class JobFailed(EmbedctlError):
    """A chunk or the build of a distributed job failed for good, or no worker is left to run it."""


@dataclass
class Submitted:
    """A run queued on the workers (or found up to date: `report` set)."""

    run: lifecycle.Run
    settings: Settings
    missing: list[int]
    report: RunReport | None = None

    @property
    def plan(self):
        return self.run.plan

    def to_dict(self) -> dict:
        plan = self.plan
        return {"run_id": self.run.run_id, "job_id": plan.plan_id, "out": plan.out, "work_dir": str(plan.work_dir),
                "chunks_total": len(plan.corpus.chunks), "chunks_submitted": len(self.missing),
                "chunks_done_before": len(plan.corpus.chunks) - len(self.missing),
                "status": self.report.status if self.report else "submitted"}


def submit(spec: JobSpec, settings: Settings, job: str | None = None, detach: bool = False) -> Submitted:
    """Begin a Celery run of `spec` and queue its missing chunks (or its build when all are done).

    Unless `detach`, a queue that no live worker consumes is refused in one line before anything is queued.
    Raises OutputBusy when a live run holds the output folder.
    """
    check_broker(settings)
    app = sender(settings)
    run = lifecycle.begin(spec, "celery", settings, job=job)
    if run.up_to_date:
        return Submitted(run, settings, [], report=lifecycle.finish_up_to_date(run))
    try:
        missing = missing_chunks(run.plan)
        needed = ([settings.embed_queue] if missing else []) + [settings.build_queue]
        if detach:
            try:
                require_consumers(app, needed)
            except BrokerError as exc:
                LOG.warning("%s", exc)
        else:
            require_consumers(app, needed, wait=WORKER_WAIT_SECONDS)
        work_dir = str(run.plan.work_dir)
        try:
            with app.producer_or_acquire() as producer:
                for number in missing:
                    app.send_task(EMBED_TASK, (work_dir, number), producer=producer)
                if not missing:
                    app.send_task(BUILD_TASK, (work_dir,), producer=producer)
        except Exception as exc:  # noqa: BLE001 - kombu/redis errors become one line
            raise BrokerError(f"cannot queue the job on {settings.masked_broker}: "
                              f"{clean(str(exc), settings.url)}") from None
    except BaseException as exc:
        lifecycle.fail(run, str(exc) or type(exc).__name__)
        raise
    LOG.info("run %s: queued %d chunks of job %s on %s", run.run_id, len(missing), run.plan.plan_id,
             settings.masked_broker)
    return Submitted(run, settings, missing)


def submit_named(named, settings: Settings, detach: bool = False) -> Submitted | RunReport:
    """Begin a run of a named job on the workers; a busy output folder is recorded as a skipped run."""
    try:
        return submit(named.spec, settings, job=named.name, detach=detach)
    except lifecycle.OutputBusy as busy:
        return lifecycle.skipped(named.spec, "celery", named.name, busy)


def follow(submitted: Submitted, progress: ProgressFactory = no_progress, poll: float = 0.5,
           timeout: float | None = None) -> RunReport:
    """Show progress until the run's report is written; raise JobFailed when it fails or no worker is left."""
    if submitted.report is not None:
        return submitted.report
    run, settings = submitted.run, submitted.settings
    plan = run.plan
    total_chunks = len(plan.corpus.chunks)
    watchdog = Watchdog(run, settings)
    t0 = time.monotonic()
    _chunks, rows = state.progress(plan)
    with locks.keep_alive(run.renew, run.lease_seconds / 3, f"run {run.run_id}"), \
            progress("embed", plan.corpus.rows, "rows", rows) as update:
        while True:
            report = read_report(plan.work_dir)
            if report is not None and report.run_id == run.run_id:
                break
            failed = state.failures(plan)
            if failed:
                raise JobFailed(f"job {plan.plan_id} failed: {failed[0]['error']}; fix the cause and run the same "
                                "command again (complete chunks are kept)")
            chunks, now_rows = state.progress(plan)
            if now_rows != rows:
                update(now_rows - rows)
                rows = now_rows
            getattr(update, "note", lambda _s: None)(
                "building indexes" if chunks == total_chunks else f"chunks {chunks}/{total_chunks}")
            watchdog.check()
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise JobFailed(f"job {plan.plan_id} did not finish within {timeout:.0f} s; it keeps running on the "
                                f"workers: follow it with `embedctl status {plan.out}`")
            time.sleep(poll)
    if report.status == "failed":
        raise JobFailed(f"job {plan.plan_id} failed: {report.error}; fix the cause and run the same command again "
                        "(complete chunks are kept)")
    return report


class Watchdog:
    """Re-queues the work of a run that stalled: a chunk whose heartbeat went stale (its worker died), or, when
    nothing of the job moved for `stall_seconds`, every missing chunk (or the build) that is neither queued nor
    being worked on. Chunks are idempotent: a duplicate that runs later finds its chunk complete."""

    def __init__(self, run: lifecycle.Run, settings: Settings, every: float | None = None):
        self.run = run
        self.settings = settings
        self.stall = float(settings.stall_seconds)
        self.every = every if every is not None else max(1.0, min(10.0, self.stall / 4))
        self.started = time.time()
        self.requeued: dict[str, float] = {}
        self._next = time.monotonic() + self.every
        self._app = None

    def check(self) -> list[str]:
        """Look once (at most every `every` seconds); returns what was re-queued."""
        if time.monotonic() < self._next:
            return []
        self._next = time.monotonic() + self.every
        plan = self.run.plan
        now = time.time()
        idle = now - max(self.started, state.latest_activity(plan)) > self.stall
        due, queue = self._due()
        stale = []
        for what, task, args in due:
            age = state.heartbeat_age(plan, what)
            dead = (age is not None and age > self.stall) or (age is None and idle)
            if dead and now - self.requeued.get(what, 0) > self.stall:
                stale.append((what, task, args))
        if not stale:
            return []
        queued = {(task, tuple(args)) for task in {t for _, t, _ in stale}
                  for args in queued_args(self.settings, queue, task)}
        stale = [(w, t, a) for w, t, a in stale if (t, tuple(a)) not in queued]
        if not stale:
            return []
        app = self._app = self._app or sender(self.settings)
        try:
            require_consumers(app, [queue])
        except BrokerError as exc:
            raise JobFailed(f"job {plan.plan_id} stalled: {exc}. The job stays on disk: start a worker and run "
                            "the same command again") from None
        with app.producer_or_acquire() as producer:
            for what, task, args in stale:
                app.send_task(task, args, producer=producer)
                self.requeued[what] = now
        names = [w for w, _, _ in stale]
        LOG.warning("job %s: %s made no progress for %.0f s (a worker died?): re-queued", plan.plan_id,
                    ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else ""), self.stall)
        return names

    def _due(self) -> tuple[list[tuple[str, str, tuple]], str]:
        """The work the job waits for now, as (heartbeat name, task, args), and the queue it goes to."""
        from embedctl.pipeline.compose import latest_build

        plan = self.run.plan
        work_dir = str(plan.work_dir)
        missing = missing_chunks(plan)
        if missing:
            return [(state.chunk_name(k), EMBED_TASK, (work_dir, k)) for k in missing], self.settings.embed_queue
        if state.published_version(plan) is not None:
            return [], self.settings.build_queue
        try:
            build = latest_build(plan)
        except StorageError:
            build = None  # a plan cut short: planning again makes it anew
        if build is None:
            due = [("build", BUILD_TASK, (work_dir,))]
        elif build.missing():
            due = [(f"piece-{s}-{d}", SEGMENT_TASK, (work_dir, build.key, s, d)) for s, d in build.missing()]
        else:
            due = [("publish", PUBLISH_TASK, (work_dir, build.key))]
        return due, self.settings.build_queue
