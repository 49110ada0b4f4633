"""The Celery submitter: begin the run, queue only the missing chunks (by task name), follow it to the publish.

The follower reads the run state from disk (chunk files, heartbeats, failures, the run report), so it shows the
same truth as `embedctl status` and survives a Redis restart; Ctrl-C leaves the job running on the workers.
While it follows, it keeps the run's lease alive and watches for stalls: chunks (or the build) whose worker died
are re-queued after `stall_seconds` instead of the visibility time-out.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

from embedctl.jobs import lifecycle, locks, state
from embedctl.jobs.broker import (
    BUILD_TASK,
    EMBED_TASK,
    PUBLISH_TASK,
    SEGMENT_TASK,
    BrokerUnavailable,
    Settings,
    check_broker,
    clean,
    describe_workers,
    live_queues,
    queued_args,
    redis_client,
    require_consumers,
    reset_connections,
    sender,
)
from embedctl.jobs.report import RunReport, read_report
from embedctl.jobs.spec import JobSpec
from embedctl.pipeline.errors import BrokerError, EmbedctlError, StorageError
from embedctl.pipeline.progress import ProgressFactory, no_progress, stage
from embedctl.pipeline.vectors import chunk_name
from embedctl.pipeline.work import missing_chunks

LOG = logging.getLogger(__name__)

WORKER_WAIT_SECONDS = 5.0
"""How long a submitter waits for a worker that is starting to answer before it says that none consumes a queue."""


BROKER_PATIENCE = 5
"""A follower whose broker does not answer for this many times EMBEDCTL_STALL_SECONDS gives up in one line."""


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
        pending = _pending(run.plan, settings, missing)
        try:
            with app.producer_or_acquire() as producer:
                for number in missing:
                    if number not in pending:
                        app.send_task(EMBED_TASK, (work_dir, number), producer=producer)
                if not missing:
                    app.send_task(BUILD_TASK, (work_dir,), producer=producer)
        except Exception as exc:  # noqa: BLE001 - kombu/redis errors become one line
            raise BrokerError(f"cannot queue the job on {settings.masked_broker}: "
                              f"{clean(str(exc), settings.url)}") from None
    except BaseException as exc:
        lifecycle.fail(run, str(exc) or type(exc).__name__)
        raise
    LOG.info("run %s: queued %d chunks of job %s on %s (%d more were queued or running already)", run.run_id,
             len(missing) - len(pending), run.plan.plan_id, settings.masked_broker, len(pending))
    return Submitted(run, settings, missing)


def _pending(plan, settings: Settings, missing: list[int]) -> set[int]:
    """The missing chunks of `plan` that are queued already or that a worker embeds now (a fresh heartbeat): left
    by an earlier run of the job whose follower died or stopped following. Queueing them again would have two
    workers embed each of them at once; the watchdog re-queues any of them that then stalls."""
    work_dir = str(plan.work_dir)
    try:
        queued = {args[1] for args in queued_args(settings, settings.embed_queue, EMBED_TASK)
                  if len(args) == 2 and args[0] == work_dir}
    except Exception as exc:  # noqa: BLE001 - reading the queue is an optimisation: queue them all
        LOG.debug("cannot read the queue %s (%s)", settings.embed_queue, clean(str(exc), settings.url))
        queued = set()
    running = {k for k in missing
               if (age := state.heartbeat_age(plan, chunk_name(k))) is not None and age < settings.stall_seconds}
    return (queued | running) & set(missing)


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
    watchdog = Watchdog(run, settings)
    _chunks, rows = state.progress(plan)
    followed = getattr(run.lease, "mark_followed", None)  # a Redis lease: its follower keeps it

    def renew() -> bool:
        ours = run.renew()
        if ours and followed is not None and not run.ended:
            followed()  # if this process dies, the next run on this host takes the lease over at once
        return ours

    try:
        renew()
    except Exception as exc:  # noqa: BLE001 - a broker hiccup: keep_alive tries again
        LOG.debug("run %s: cannot renew yet (%s)", run.run_id, exc)
    try:
        report = _follow_until_reported(run, progress, poll, timeout, watchdog, renew, rows)
    except BaseException:
        unmark = getattr(run.lease, "unmark_followed", None)
        if unmark is not None and not run.ended:  # the run lives on in its workers: never take its lease over
            try:
                unmark()
            except Exception as exc:  # noqa: BLE001 - Redis gone: the mark lapses with the lease
                LOG.debug("run %s: cannot clear the follower mark (%s)", run.run_id, exc)
        raise
    if report.status == "failed":
        raise JobFailed(f"job {plan.plan_id} failed: {report.error}; fix the cause and run the same command again "
                        "(complete chunks are kept)")
    return report


def _follow_until_reported(run: lifecycle.Run, progress: ProgressFactory, poll: float, timeout: float | None,
                           watchdog: Watchdog, renew, rows: int) -> RunReport:
    """Show the progress of `run` and keep its lease until its report is written; returns the report."""
    plan = run.plan
    total_chunks = len(plan.corpus.chunks)
    t0 = time.monotonic()
    with locks.keep_alive(renew, run.lease_seconds / 3, f"run {run.run_id}"), \
            stage(progress, "embed", plan.corpus.rows, "rows", rows) as update:
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
            update.note(
                "building indexes" if chunks == total_chunks else f"chunks {chunks}/{total_chunks}")
            watchdog.check()
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise JobFailed(f"job {plan.plan_id} did not finish within {timeout:.0f} s; it keeps running on the "
                                f"workers: follow it with `embedctl status {plan.out}`")
            time.sleep(poll)
    return report


class Watchdog:
    """Re-queues the work of a run that stalled: a chunk whose heartbeat went stale (its worker died), or, when
    nothing of the job moved for `stall_seconds`, every missing chunk (or the build) that is neither queued nor
    being worked on. Chunks are idempotent: a duplicate that runs later finds its chunk complete.

    It also watches the broker. While Redis does not answer, the job is followed from disk (one warning when it goes,
    one when it is back). A Redis that came back as a new server (its run id changed: restarted, or failed over)
    may have lost the queued messages: the work that is missing and that no worker is running is re-queued at once,
    on new connections (kombu's pooled ones died with the old server)."""

    def __init__(self, run: lifecycle.Run, settings: Settings, every: float | None = None):
        self.run = run
        self.settings = settings
        self.stall = float(settings.stall_seconds)
        self.every = every if every is not None else max(1.0, min(10.0, self.stall / 4))
        self.started = time.time()
        self.requeued: dict[str, float] = {}
        self._next = time.monotonic() + self.every
        self._app = None
        self._client = None
        self._server: str | None = None  # the Redis server's run id, when last seen
        self._lost_since: float | None = None  # since when the broker does not answer
        self._no_workers_since: float | None = None
        self._restarted = False  # a new Redis: re-queue what it lost without waiting for a stall
        with contextlib.suppress(BrokerUnavailable):
            self._watch_broker()  # the server we start with, to notice when another one replaces it

    def check(self) -> list[str]:
        """Look once (at most every `every` seconds); returns what was re-queued."""
        if time.monotonic() < self._next:
            return []
        self._next = time.monotonic() + self.every
        try:
            self._watch_broker()
            return self._requeue()
        except BrokerUnavailable as exc:
            self._lost(str(exc))
            return []

    def _watch_broker(self) -> None:
        """Note a broker that went away, came back, or came back as a new server; raises BrokerUnavailable."""
        import redis

        try:
            self._client = self._client or redis_client(self.settings)
            try:
                server = self._client.info("server").get("run_id")
            except redis.ResponseError:  # INFO refused (some managed Redis): a restart goes unnoticed, a stall not
                self._client.ping()
                server = None
        except (redis.RedisError, OSError) as exc:
            raise BrokerUnavailable(clean(str(exc), self.settings.url) or type(exc).__name__) from None
        plan_id = self.run.plan.plan_id
        if self._lost_since is not None:
            LOG.warning("job %s: the broker at %s answers again (after %.0f s)", plan_id, self.settings.masked_broker,
                        time.monotonic() - self._lost_since)
            self._lost_since = None
        if self._server is not None and server is not None and server != self._server:
            LOG.warning("job %s: the broker at %s restarted (a new Redis server): the messages queued before may be "
                        "lost; re-queueing the missing work that no worker is running", plan_id,
                        self.settings.masked_broker)
            self._restarted = True
            self.requeued.clear()  # what was re-queued before went with the old server
            self._reconnect()
        self._server = server

    def _lost(self, reason: str) -> None:
        if self._lost_since is None:
            self._lost_since = time.monotonic()
            LOG.warning("job %s: lost the broker at %s (%s): following the job from disk, trying again every %.0f s",
                        self.run.plan.plan_id, self.settings.masked_broker, reason, self.every)
        patience = BROKER_PATIENCE * self.stall
        if time.monotonic() - self._lost_since > patience:  # a cron or CI run must end, and say why
            raise JobFailed(f"the broker at {self.settings.masked_broker} has not answered for {patience:.0f} s "
                            f"({reason}); job {self.run.plan.plan_id} is kept on disk: once Redis is back, run the "
                            "same command again (complete chunks are kept)")
        self._reconnect()

    def _reconnect(self) -> None:
        """Forget every connection: the next look opens new ones."""
        reset_connections()
        self._app = None
        self._client = None

    def _requeue(self) -> list[str]:
        plan = self.run.plan
        now = time.time()
        idle = self._restarted or now - max(self.started, state.latest_activity(plan)) > self.stall
        due, queue = self._due()
        stale = []
        for what, task, args in due:
            age = state.heartbeat_age(plan, what)
            dead = (age is not None and age > self.stall) or (age is None and idle)
            if dead and now - self.requeued.get(what, 0) > self.stall:
                stale.append((what, task, args))
        if not stale:
            self._restarted = False
            return []
        try:
            queued = {(task, tuple(args)) for task in {t for _, t, _ in stale}
                      for args in queued_args(self.settings, queue, task)}
        except Exception as exc:  # noqa: BLE001 - redis errors: the broker went away again
            raise BrokerUnavailable(clean(str(exc), self.settings.url)) from None
        stale = [(w, t, a) for w, t, a in stale if (t, tuple(a)) not in queued]
        if not stale:
            self._restarted = False
            return []
        if not self._workers_for(queue):
            return []
        app = self._app = self._app or sender(self.settings)
        try:
            with app.producer_or_acquire() as producer:
                for what, task, args in stale:
                    app.send_task(task, args, producer=producer)
                    self.requeued[what] = now
        except Exception as exc:  # noqa: BLE001 - kombu/redis errors: try again at the next look
            self._reconnect()
            raise BrokerUnavailable(f"cannot queue on it: {clean(str(exc), self.settings.url)}") from None
        names = [w for w, _, _ in stale]
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        if self._restarted:
            LOG.warning("job %s: re-queued %s (queued on the broker before it restarted, or never started)",
                        plan.plan_id, listed)
        else:
            LOG.warning("job %s: %s made no progress for %.0f s (a worker died?): re-queued", plan.plan_id, listed,
                        self.stall)
        self._restarted = False
        return names

    def _workers_for(self, queue: str) -> bool:
        """Whether a live worker consumes `queue`. None answering is tolerated for `stall_seconds` (workers
        reconnect after a Redis restart, with pauses of their own), then it fails the follower in one line."""
        for attempt in (1, 2):  # a pooled connection may be dead: once more on new ones
            self._app = self._app or sender(self.settings)
            try:
                live = live_queues(self._app)
                break
            except BrokerUnavailable:
                self._reconnect()
                if attempt == 2:
                    raise
        plan = self.run.plan
        if any(queue in queues for queues in live.values()):
            if self._no_workers_since is not None:
                LOG.warning("job %s: a worker consumes %s again", plan.plan_id, queue)
                self._no_workers_since = None
            return True
        lacking = f"no live worker consumes the queue {queue} (workers: {describe_workers(live)})"
        if self._no_workers_since is None:
            self._no_workers_since = time.monotonic()
            LOG.warning("job %s: its work is due again, but %s; waiting up to %.0f s for one", plan.plan_id, lacking,
                        self.stall)
        waited = time.monotonic() - self._no_workers_since
        if waited > self.stall:
            raise JobFailed(f"job {plan.plan_id} stalled: {lacking} for {waited:.0f} s. The job stays on disk: start "
                            "a worker (`embedctl worker --model MODEL`) and run the same command again")
        return False

    def _due(self) -> tuple[list[tuple[str, str, tuple]], str]:
        """The work the job waits for now, as (heartbeat name, task, args), and the queue it goes to."""
        from embedctl.pipeline.compose import latest_build

        plan = self.run.plan
        work_dir = str(plan.work_dir)
        missing = missing_chunks(plan)
        if missing:
            return [(chunk_name(k), EMBED_TASK, (work_dir, k)) for k in missing], self.settings.embed_queue
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
