"""The run lifecycle, written once and called by every mode (embedded, Celery, scheduled): a run's hold on its
output folder, from `begin` to `end`.

A run of a job on an output folder:
1. `begin`: plans the job (`pipeline.plan.plan_job`: corpus, model and options are validated before any work),
   takes the folder's lock (a file lease when embedded, a Redis lease on Celery), removes build folders of dead
   runs, and either finds the published version up to date or records the run (`job.json`, a `running` history
   event);
2. embeds the missing chunks: `jobs.runner` in-process, or `jobs.steps.run_chunk` on a worker (both through
   `pipeline.work`, chunk reports stamped with the run id);
3. publishes (`jobs.publishing`; on workers through the steps of `jobs.steps`), and `end`s: the run's report
   (`jobs.tally`, written to `report.json`), its history event, and the release of the lock. A run that fails
   ends the same way with status `failed`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from embedctl.jobs import history, locks, state, tally
from embedctl.jobs.report import RunReport, read_report, write_report
from embedctl.jobs.spec import JobSpec
from embedctl.pipeline import versions
from embedctl.pipeline.errors import EmbedctlError, StorageError
from embedctl.pipeline.plan import WORK, WorkPlan, load_plan, plan_job
from embedctl.pipeline.storage import child, location, storage_of

if TYPE_CHECKING:
    from embedctl.jobs.broker import Settings

LOG = logging.getLogger(__name__)


class OutputBusy(EmbedctlError):
    """Another live run holds the output folder."""

    def __init__(self, out: str, holder: dict | None):
        self.holder = holder
        super().__init__(f"{out} is being written by {locks.describe_holder(holder)}; wait for it to finish "
                         f"(`embedctl status {out}`) and run again")


class Superseded(EmbedctlError):
    """The run's lock went to a newer run of the same output folder: this run must not publish."""


@dataclass
class Run:
    """A run in progress: its record (job.json), its plan, and its lease on the output folder."""

    record: state.RunRecord
    plan: WorkPlan
    lease: locks.Lease
    settings: Settings | None = None
    up_to_date: tuple[str, int] | None = None  # (version, rows) when the published version matches the plan
    _ended: bool = field(default=False, repr=False)

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @classmethod
    def load(cls, work_dir: Path, settings: Settings | None) -> Run:
        """The run that owns a work folder (what a worker task joins); raises Superseded when it is gone."""
        try:
            plan = load_plan(work_dir)
            record = state.read_run(plan)
        except StorageError as exc:
            raise Superseded(f"the job in {work_dir} is gone ({exc})") from None
        if record is None:
            raise Superseded(f"no run owns {work_dir}")
        return cls(record, plan, locks.from_ref(record.lease, settings), settings)

    @property
    def ended(self) -> bool:
        """True once the run wrote its final report (a task of it may still be running somewhere)."""
        report = read_report(self.plan.work_dir)
        return self._ended or (report is not None and report.run_id == self.run_id)

    def renew(self) -> bool:
        """Keep the run's lease (taking it again if it lapsed while nobody held it); False: a newer run has it."""
        if self.ended:
            return True
        ours = self.lease.renew()
        if ours and self.ended:  # it ended between the two checks: give back what we just took
            self.lease.release()
        return ours

    @property
    def lease_seconds(self) -> float:
        return float(locks.lease_seconds(self.settings))


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def begin(spec: JobSpec, mode: str, settings: Settings | None = None, job: str | None = None) -> Run:
    """Plan a new run of `spec` and take its output folder; raises OutputBusy when a live run holds it.

    Planning comes first: bad input is refused before the folder is touched. The caller ends the run
    (`publish`, `fail`, `finish_up_to_date`); until then it holds the lease.
    """
    return begin_plan(plan_job(spec), mode, settings, job=job, keep=spec.keep)


def begin_plan(plan: WorkPlan, mode: str, settings: Settings | None = None, job: str | None = None,
               keep: int | None = None, force: bool = False) -> Run:
    """Take the output folder of `plan` for a new run (see `begin`); `force`: publish a new version even when
    the current one was built from this plan (what a repair does)."""
    out = location(plan.out)
    run_id = new_run_id()
    tally.started(run_id)  # what this process asks of an object store from now on counts in the run's report
    token = json.dumps(locks.holder_record(run_id, mode, job))
    if mode == "embedded":
        lease: locks.Lease = locks.FileLease(out, token)
    else:
        assert settings is not None, "a Celery run needs the broker settings"
        lease = locks.RedisLease(settings, locks.out_key(out), token)
    if not lease.acquire():
        raise OutputBusy(str(out), lease.holder())
    try:
        _refuse_other_mode(out, mode, locks.lease_seconds(settings))
        for name in versions.remove_dead_builds(out, idle_seconds=locks.lease_seconds(settings)):
            LOG.info("removed %s, the build folder of a run that died", name)
        record = state.RunRecord(run_id=run_id, mode=mode, started=state.now(), started_ts=time.time(),
                                 lease=lease.ref, job=job, keep=keep,
                                 broker=settings.masked_broker if settings and mode != "embedded" else None)
        taken_over = getattr(lease, "taken_over", None)
        if taken_over:
            _close_taken_over(plan, taken_over.get("run_id"))
        run = Run(record, plan, lease, settings, up_to_date=None if force else state.published_version(plan, contents=True))
        if run.up_to_date is None:
            state.write_run(plan, record)
            history.record(out, {"run_id": run_id, "job": job, "job_id": plan.plan_id, "mode": mode,
                                 "status": "running", "started": record.started, "out": str(out)})
        return run
    except BaseException:
        lease.release()
        raise


def _close_taken_over(plan: WorkPlan, run_id: str | None) -> None:
    """Record the run whose lease a new run took over (its follower died) as failed, so that the history does not
    keep it `running` for ever. Only when it is the last run of this job and it wrote no report."""
    try:
        record = state.read_run(plan)
    except StorageError:
        return
    if record is None or record.run_id != run_id:
        return
    report = read_report(plan.work_dir)
    if report is not None and report.run_id == run_id:
        return
    # only the dead run's records are written: its lease is ours now
    report = tally.run_report(plan, record, "failed", error="its follower died; a new run took over its lease and "
                                                            "goes on with the job (complete chunks are kept)")
    write_report(plan.work_dir, report)
    history.record(plan.out, report.to_history())


def _live_celery_run(work_dir: Path | str, idle: float, embedded: bool = False) -> state.RunRecord | None:
    """The Celery run (or with `embedded`, any run) working in `work_dir` when it has not ended and some task of it
    beat within `idle` s."""
    try:
        plan = load_plan(work_dir)
        record = state.read_run(plan)
    except StorageError:
        return None
    if record is None or (record.mode == "embedded" and not embedded):
        return None  # an embedded run holds the folder's file lock while it lives: not ours to judge here
    report = read_report(work_dir)
    if report is not None and report.run_id == record.run_id:
        return None
    return record if time.time() - state.latest_activity(plan) < idle else None


def _refuse_other_mode(out: Path, mode: str, idle: float) -> None:
    """One writer per folder across modes too: an embedded run refuses a folder that a live Celery run works on
    (seen on disk), a Celery run one that an embedded run locks (its file lock)."""
    if mode == "embedded":
        live = list(live_celery_runs(out, idle).values())
        if live:
            raise OutputBusy(str(out), json.loads(live[0].lease.token))
        return
    probe = locks.FileLease(out, "{}")
    if not probe.acquire(write_holder=False):
        raise OutputBusy(str(out), probe.holder())
    probe.release()


def skipped(spec: JobSpec, mode: str, job: str | None, busy: OutputBusy) -> RunReport:
    """Record a run that found the folder taken (what scheduled and named runs do instead of failing)."""
    report = tally.skipped_report(new_run_id(), str(spec.out), mode, job, str(busy))
    history.record(spec.out, report.to_history())
    return report


def end(run: Run, report: RunReport) -> RunReport:
    """Write the run's report and history event, then give up its lease (in that order: a process renewing the
    lease meanwhile sees the run ended and lets go). The lease is given up even when the records cannot be
    written (a full disk): then the error says whether the version was published."""
    try:
        if run.up_to_date is None:
            write_report(run.plan.work_dir, report)
        history.record(run.plan.out, report.to_history())
    except StorageError as exc:
        if report.status == "published":
            raise StorageError(f"published {report.version} in {run.plan.out}, but the run could not be recorded: "
                               f"{exc}") from None
        raise
    finally:
        run._ended = True
        run.lease.release()
    return report


def finish_up_to_date(run: Run) -> RunReport:
    """End a run whose published version already matches its plan: nothing embedded, nothing built."""
    version, rows = run.up_to_date
    report = tally.up_to_date_report(run.plan, run.record, version, rows)
    return end(run, report)


def fail(run: Run, message: str) -> RunReport:
    """End a run that failed (the published version stays current)."""
    if run.ended:
        return read_report(run.plan.work_dir) or tally.run_report(run.plan, run.record, "failed", error=message)
    return end(run, tally.run_report(run.plan, run.record, "failed", error=message))


def discard_chunks(run: Run, chunks: list[int]) -> None:
    """Remove damaged chunks of the run's plan, so that they count as missing and are embedded again."""
    for number in chunks:
        run.plan.store.discard(number)
    LOG.info("run %s: discarded damaged chunks %s", run.run_id, chunks)


def still_ours(run: Run) -> None:
    """Raise Superseded unless the run still holds its output folder (checked just before a swap)."""
    if not run.renew():
        raise Superseded(f"run {run.run_id} lost {run.plan.out} to a newer run; it does not publish")


def live_celery_runs(out: str | Path, idle: float, embedded: bool = False) -> dict[str, state.RunRecord]:
    """Work folder name -> the live Celery run working there (see `_live_celery_run`), over the folders of `out`.
    `embedded`: embedded runs too (on an object store, those of other hosts: their file locks are not shared, their
    heartbeats are)."""
    out = location(out)
    storage = storage_of(out)
    found = {}
    for entry in storage.list(WORK):
        if not entry.folder:
            continue  # not a work folder
        record = _live_celery_run(child(out, WORK, entry.name), idle, embedded)  # on S3 a URI, not its cache folder
        if record is not None:
            found[entry.name] = record
    return found
