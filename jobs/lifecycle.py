"""The run lifecycle, written once and called by every mode (embedded, Celery, scheduled).

A run of a job on an output folder:
1. `begin`: takes the folder's lock (a file lease when embedded, a Redis lease on Celery), removes build folders
   of dead runs, plans the job (validating corpus, model and options before any work), and either finds the
   published version up to date or records the run (`job.json`, a `running` history event);
2. embeds the missing chunks: `run_chunk` on a worker, `jobs.runner` in-process (both through
   `pipeline.work`, chunk reports stamped with the run id);
3. `publish` (or `run_build` on a worker): builds and swaps in the new version, applies retention, removes the
   work of superseded plans (never that of a live run), and `end`s the run: its report (`report.json`), its
   history event, and the release of the lock. A run that fails ends the same way with status `failed`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from embedctl.jobs import history, interrupts, locks, state
from embedctl.jobs.broker import Settings, lease_seconds
from embedctl.jobs.report import RunReport, read_report, write_report
from embedctl.jobs.spec import JobSpec
from embedctl.pipeline import defaults, versions
from embedctl.pipeline.errors import ConfigError, EmbedctlError, StorageError, WeightsLost
from embedctl.pipeline.plan import WORK, WorkPlan, index_dims, load_plan
from embedctl.pipeline.vectors import DamagedChunks
from embedctl.pipeline.work import ProgressFactory, missing_chunks, no_progress

LOG = logging.getLogger(__name__)


class OutputBusy(EmbedctlError):
    """Another live run holds the output folder."""

    def __init__(self, out: str, holder: dict | None):
        self.holder = holder
        super().__init__(f"{out} is being written by {locks.describe_holder(holder)}; wait for it to finish "
                         f"(`embedctl status {out}`) and run again")


class Superseded(EmbedctlError):
    """The run's lock went to a newer run of the same output folder: this run must not publish."""


def plan_job(spec: JobSpec) -> WorkPlan:
    """Validate the corpus, model and options of `spec` and plan its chunks (reads no weights)."""
    from embedctl.pipeline.corpus import plan_corpus
    from embedctl.pipeline.models import read_profile, resolve_model

    out = Path(spec.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {spec.out} is a file; give a folder (it is created when missing)")
    ref = resolve_model(spec.model)
    profile = read_profile(ref.path)
    if spec.max_length and profile.position_limit and spec.max_length > profile.position_limit:
        raise ConfigError(f"--max-length {spec.max_length} is above the {profile.position_limit} positions of "
                          f"{spec.model}; give at most {profile.position_limit}")
    dims = index_dims(profile.dim, spec.dims, defaults.DEFAULT_DIMS)
    fmt = spec.instruction_format or profile.instruction_format
    corpus = plan_corpus(spec.corpus, spec.text_column, spec.id_column, spec.chunk_rows,
                         id_column_required=spec.id_column_required, validated=_validated_fingerprint(spec))
    return WorkPlan(
        out=str(spec.out), corpus=corpus, model=spec.model, model_path=str(ref.path),
        model_fingerprint=ref.fingerprint, model_type=profile.model_type, pooling=profile.pooling, dim=profile.dim,
        dtype=spec.dtype, device=spec.device, max_length=spec.max_length or profile.max_length,
        batch_tokens=spec.batch_tokens, document_prefix=profile.document_prefix(spec.instruction, fmt),
        query_prefix=profile.query_prefix(spec.query_instruction, fmt), dims=tuple(dims),
        hnsw_m=spec.hnsw_m, ef_construction=spec.ef_construction, ef_search=spec.ef_search,
        index_type=spec.index_type, instruction_format=fmt, segment_rows=spec.segment_rows, compile=spec.compile)


def _validated_fingerprint(spec: JobSpec) -> str | None:
    """Fingerprint of the corpus the current version was built from, when its ids and texts were checked in these
    columns (the plan checks them again otherwise)."""
    from embedctl.pipeline.manifest import read_info

    current = versions.current_version(spec.out)
    if current is None:
        return None
    try:
        corpus = read_info(current).corpus
    except StorageError:
        return None  # a damaged version: check the ids again
    same_columns = corpus.id_column == spec.id_column and corpus.text_column == spec.text_column
    return corpus.fingerprint if same_columns else None


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
        return float(lease_seconds(self.settings))


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
    out = Path(plan.out)
    run_id = new_run_id()
    token = json.dumps(locks.holder_record(run_id, mode, job))
    if mode == "embedded":
        lease: locks.Lease = locks.FileLease(out, token)
    else:
        assert settings is not None, "a Celery run needs the broker settings"
        lease = locks.RedisLease(settings, locks.out_key(out), token)
    if not lease.acquire():
        raise OutputBusy(str(out), lease.holder())
    try:
        _refuse_other_mode(out, mode, lease_seconds(settings))
        for name in versions.remove_dead_builds(out, idle_seconds=lease_seconds(settings)):
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
    dead = Run(record, plan, lease=None)  # only its records are written: its lease is ours now
    report = _report(dead, "failed", error="its follower died; a new run took over its lease and goes on with "
                                           "the job (complete chunks are kept)")
    write_report(plan.work_dir, report)
    history.record(plan.out, report.to_history())


def _live_celery_run(work_dir: Path, idle: float) -> state.RunRecord | None:
    """The Celery run working in `work_dir` when it has not ended and some task of it beat within `idle` s."""
    try:
        plan = load_plan(work_dir)
        record = state.read_run(plan)
    except StorageError:
        return None
    if record is None or record.mode == "embedded":
        return None  # an embedded run holds the folder's file lock while it lives: not ours to judge here
    report = read_report(work_dir)
    if report is not None and report.run_id == record.run_id:
        return None
    return record if time.time() - state.latest_activity(plan) < idle else None


def _refuse_other_mode(out: Path, mode: str, idle: float) -> None:
    """One writer per folder across modes too: an embedded run refuses a folder that a live Celery run works on
    (seen on disk), a Celery run one that an embedded run locks (its file lock)."""
    if mode == "embedded":
        for work_dir in sorted((out / WORK).glob("*")) if (out / WORK).is_dir() else []:
            record = _live_celery_run(work_dir, idle)
            if record is not None:
                raise OutputBusy(str(out), json.loads(record.lease.token))
        return
    probe = locks.FileLease(out, "{}")
    if not probe.acquire(write_holder=False):
        raise OutputBusy(str(out), probe.holder())
    probe.release()


def skipped(spec: JobSpec, mode: str, job: str | None, busy: OutputBusy) -> RunReport:
    """Record a run that found the folder taken (what scheduled and named runs do instead of failing)."""
    report = RunReport(run_id=new_run_id(), status="skipped", mode=mode, out=str(spec.out), started=state.now(),
                       finished=state.now(), job=job, reason=str(busy))
    history.record(spec.out, report.to_history())
    return report


def _report(run: Run, status: str, **values) -> RunReport:
    """The run report of `run` from its chunk reports (those stamped with its run id are its own work)."""
    plan, record = run.plan, run.record
    reports = [plan.store.read_report(k) for k in sorted(plan.store.complete())]
    mine = [r for r in reports if r.get("run_id") == record.run_id]
    skipped_rows = [s for r in reports for s in r.get("skipped", [])]
    embedded = sum(r["embedded"] for r in mine)
    last_write = max((r.get("finished_ts", 0) for r in mine), default=None)
    embed_seconds = round(last_write - record.started_ts, 3) if last_write else None
    return RunReport(
        run_id=record.run_id, status=status, mode=record.mode, out=str(plan.out), started=record.started,
        job=record.job, job_id=plan.plan_id, finished=state.now(), seconds=round(time.time() - record.started_ts, 3),
        model=plan.model, dims=list(plan.dims), index_type=plan.index_type, rows_total=plan.corpus.rows,
        rows_embedded=embedded, rows_reused=sum(r["reused"] for r in mine),
        rows_skipped=len(skipped_rows), skipped=skipped_rows[:1000],
        rows_truncated=sum(r.get("truncated", 0) for r in reports), chunks_total=len(plan.corpus.chunks),
        chunks_embedded=len(mine), chunks_done_before=len(reports) - len(mine),
        tokens=sum(r.get("tokens", 0) for r in mine), embed_seconds=embed_seconds,
        rows_per_second=round(embedded / embed_seconds, 1) if embedded and embed_seconds else None, **values)


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
    report = RunReport(run_id=run.run_id, status="up-to-date", mode=run.record.mode, out=str(run.plan.out),
                       started=run.record.started, job=run.record.job, job_id=run.plan.plan_id, finished=state.now(),
                       seconds=round(time.time() - run.record.started_ts, 3), model=run.plan.model,
                       dims=list(run.plan.dims), index_type=run.plan.index_type, version=version,
                       path=str(Path(run.plan.out) / versions.VERSIONS / version), rows_total=run.plan.corpus.rows,
                       rows_indexed=rows, chunks_total=len(run.plan.corpus.chunks),
                       chunks_done_before=len(run.plan.corpus.chunks),
                       reason=f"{version} already indexes this corpus with these settings")
    return end(run, report)


def fail(run: Run, message: str) -> RunReport:
    """End a run that failed (the published version stays current)."""
    if run.ended:
        return read_report(run.plan.work_dir) or _report(run, "failed", error=message)
    return end(run, _report(run, "failed", error=message))


def discard_chunks(run: Run, chunks: list[int]) -> None:
    """Remove damaged chunks of the run's plan, so that they count as missing and are embedded again."""
    for number in chunks:
        run.plan.store.discard(number)
    LOG.info("run %s: discarded damaged chunks %s", run.run_id, chunks)


def publish(run: Run, progress: ProgressFactory = no_progress, forced: frozenset[str] = frozenset(),
            rebuild: bool = False) -> RunReport:
    """Build the new version in this process (plan, every piece, publish), swap it in, apply retention, and end
    the run. `forced` / `rebuild`: segments to rewrite, or none to keep (a repair)."""
    from embedctl.pipeline.build import build_and_publish

    guard = _guard(run)
    with interrupts.held() as hold:  # from the swap on, Ctrl-C waits until the run is recorded as published

        def before_publish() -> None:
            guard()
            hold.start()

        info, target, build = build_and_publish(run.plan, progress, before_publish=before_publish, forced=forced,
                                                rebuild=rebuild)
        report = _published(run, target.name, info, build)
    return report


def _guard(run: Run) -> Callable[[], None]:
    def still_ours() -> None:
        if not run.renew():
            raise Superseded(f"run {run.run_id} lost {run.plan.out} to a newer run; it does not publish")

    return still_ours


def _published(run: Run, version: str, info, build) -> RunReport:
    """After the swap: the report, retention (versions, then the segments no kept version uses), the work of
    superseded plans, and the end of the run."""
    from embedctl.pipeline.compose import remove_builds, segments_in_use
    from embedctl.pipeline.segments import collect_garbage

    plan = run.plan
    report = _report(run, "published", version=version, path=str(Path(plan.out) / versions.VERSIONS / version),
                     rows_indexed=info.rows, rows_deleted=_rows_deleted(plan, version), segments=len(info.segments),
                     segments_built=len(build.new) if build else 0, rows_rewritten=build.rows_rewritten if build else 0)
    keep = run.record.keep
    if keep:
        report.versions_removed = versions.prune(plan.out, keep)
    remove_stale_work(plan, run.lease_seconds)
    remove_builds(plan)
    used = versions.segments_of_kept_versions(plan.out)
    if used is not None:
        collect_garbage(plan.out, used | segments_in_use(plan.work_dir.parent))
    return end(run, report)


def remove_stale_work(plan: WorkPlan, idle: float) -> list[str]:
    """Remove the work folders of other plans once this one is published: their vectors no longer match the
    corpus or settings (the published plan's own vectors are the embedding cache of the next run). The folder of
    a live Celery run of the other mode is kept (runs of this mode are excluded by the folder's lock)."""
    root = plan.work_dir.parent
    removed = []
    for path in root.iterdir() if root.is_dir() else []:
        if not path.is_dir() or path.name == plan.plan_id:
            continue
        if _live_celery_run(path, idle) is not None:
            LOG.info("kept %s: a live run is writing there", path)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def _rows_deleted(plan: WorkPlan, version: str) -> int:
    """Ids of the version published before `version` that the new one no longer has."""
    import pyarrow.compute as pc

    older = [p for p in versions.version_dirs(plan.out) if p.name < version]
    if not older:
        return 0
    try:
        before = versions.live_ids(older[-1])
    except (OSError, ValueError, StorageError):
        return 0  # the previous version is damaged: nothing to compare with
    after = versions.live_ids(Path(plan.out) / versions.VERSIONS / version)
    if not len(before) or before.type != after.type:
        return len(before)
    kept = pc.sum(pc.is_in(before, value_set=after)).as_py() or 0
    return len(before) - int(kept)


# -- the worker side ----------------------------------------------------------------------------------------------

def _beat(run: Run, what: str) -> Callable[[], bool]:
    def beat() -> bool:
        alive = state.heartbeat(run.plan, what, run.run_id)
        return run.renew() and alive

    return beat


def run_chunk(work_dir: Path, number: int, encoder_for: Callable[[WorkPlan], object],
              cache_for: Callable[[WorkPlan], object], settings: Settings | None) -> dict:
    """Embed chunk `number` of the job in `work_dir` (what the Celery chunk task runs); returns a small summary
    with `build_due` set when it completed the job's last chunk.

    The task beats while it works (heartbeat file, run lease); a chunk that fails for good fails the run.
    """
    from embedctl.pipeline.work import embed_chunk

    try:
        run = Run.load(work_dir, settings)
    except Superseded as exc:
        LOG.info("chunk %d: %s; nothing to do", number, exc)
        return {"chunk": number, "status": "superseded"}
    plan = run.plan
    if plan.store.is_complete(number):
        return {"chunk": number, "skipped_complete": True, "build_due": not missing_chunks(plan)}
    what = state.chunk_name(number)
    beat = _beat(run, what)
    beat()
    try:
        with locks.keep_alive(beat, run.lease_seconds / 3, f"chunk {number} of {plan.plan_id}"):
            summary = embed_chunk(plan, number, lambda: encoder_for(plan), cache=cache_for(plan),
                                  stamp={"run_id": run.run_id})
    except WeightsLost:
        raise  # not a failure of the chunk: the caller retries it on the restarted exporter's weights
    except EmbedctlError as exc:
        message = f"chunk {number}: {exc}"
        state.record_failure(plan, what, message)
        fail(run, message)
        raise
    finally:
        state.end_heartbeat(plan, what)
    return {**summary, "build_due": not missing_chunks(plan)}


def fail_chunk(work_dir: Path, number: int, message: str, settings: Settings | None) -> None:
    """Record that chunk `number` failed for good outside `run_chunk` (a task out of retries): the run fails."""
    try:
        run = Run.load(work_dir, settings)
    except Superseded:
        return
    message = f"chunk {number}: {message}"
    state.record_failure(run.plan, state.chunk_name(number), message)
    fail(run, message)


def _build_lease(run: Run, settings: Settings) -> locks.RedisLease:
    return locks.RedisLease(settings, locks.build_key(run.plan.out, run.plan.plan_id),
                            json.dumps(locks.holder_record(run.run_id, "celery", run.record.job)))


def run_build(work_dir: Path, settings: Settings) -> dict:
    """Plan the build of a complete job (what the Celery build task runs): returns the pieces to queue, one per
    new segment and dim (`{"status": "building", "key": ..., "pieces": [[segment, dim], ...]}`), or publishes at
    once when none is missing. One planner of a job at a time: `{"status": "busy", "retry_in": s}` while another
    holds the job's build lease (a planner whose worker died frees it within `lease_seconds`)."""
    from embedctl.pipeline.build import plan_build

    try:
        run = Run.load(work_dir, settings)
    except Superseded as exc:
        LOG.info("build: %s; nothing to do", exc)
        return {"status": "superseded"}
    plan = run.plan
    if run.ended:
        return {"status": "ended"}
    lease = _build_lease(run, settings)
    if not lease.acquire():
        return {"status": "busy", "retry_in": max(1.0, settings.lease_seconds / 3)}
    beat = _beat(run, "build")
    try:
        beat()
        with locks.keep_alive(lambda: lease.renew() and beat(), run.lease_seconds / 3, f"build of {plan.plan_id}"):
            build = plan_build(plan)
        missing = build.missing()
        if not missing:
            return _publish_task(run, build)
        return {"status": "building", "key": build.key, "pieces": [list(p) for p in missing]}
    except DamagedChunks as damaged:  # embed them again: the last of them queues the build again
        LOG.warning("%s: queueing them again", damaged)
        discard_chunks(run, damaged.chunks)
        return {"status": "re-embedding", "chunks": damaged.chunks}
    except EmbedctlError as exc:
        _fail_build(run, f"build: {exc}")
        raise
    finally:
        state.end_heartbeat(plan, "build")
        lease.release()


def run_piece(work_dir: Path, key: str, segment: str, dim: int, settings: Settings) -> dict:
    """Build one index piece (a segment's index of one dim) of a job (what the Celery segment task runs); returns
    `publish_due` when it was the last piece (counted on disk)."""
    from embedctl.pipeline.build import build_piece
    from embedctl.pipeline.compose import load_build

    try:
        run = Run.load(work_dir, settings)
        build = load_build(run.plan, key)
    except (Superseded, StorageError) as exc:
        LOG.info("segment %s, dim %d: %s; nothing to do", segment, dim, exc)
        return {"status": "superseded"}
    what = f"piece-{segment}-{dim}"
    beat = _beat(run, what)
    beat()
    try:
        with locks.keep_alive(beat, run.lease_seconds / 3, f"{what} of {run.plan.plan_id}"):
            build_piece(run.plan, build, segment, dim)
    except EmbedctlError as exc:
        _fail_build(run, f"segment {segment}, dim {dim}: {exc}")
        raise
    finally:
        state.end_heartbeat(run.plan, what)
    return {"status": "built", "segment": segment, "dim": dim, "publish_due": not build.missing()}


def run_publish(work_dir: Path, key: str, settings: Settings) -> dict:
    """Publish a job whose pieces are all built (what the Celery publish task runs), once."""
    from embedctl.pipeline.compose import load_build

    try:
        run = Run.load(work_dir, settings)
        build = load_build(run.plan, key)
    except (Superseded, StorageError) as exc:
        LOG.info("publish: %s; nothing to do", exc)
        return {"status": "superseded"}
    if run.ended:
        return {"status": "ended"}
    lease = _build_lease(run, settings)
    if not lease.acquire():
        return {"status": "busy", "retry_in": max(1.0, settings.lease_seconds / 3)}
    try:
        return _publish_task(run, build)
    finally:
        lease.release()


def _publish_task(run: Run, build) -> dict:
    """Publish under the job's build lease (held by the caller), finishing a publish whose worker died between the
    swap and the report."""
    from embedctl.pipeline.build import publish as publish_version
    from embedctl.pipeline.manifest import read_info

    plan = run.plan
    beat = _beat(run, "publish")
    try:
        published = state.published_version(plan)
        if published:
            current = versions.current_version(plan.out)
            report = _published(run, published[0], read_info(current), None)
        else:
            beat()
            with locks.keep_alive(beat, run.lease_seconds / 3, f"publish of {plan.plan_id}"):
                info, target = publish_version(plan, build, before_publish=_guard(run))
            report = _published(run, target.name, info, build)
    except Superseded as exc:
        fail(run, str(exc))
        return {"status": "superseded"}
    except EmbedctlError as exc:
        _fail_build(run, f"publish: {exc}")
        raise
    finally:
        state.end_heartbeat(plan, "publish")
    return {"status": "published", "version": report.version, "rows": report.rows_indexed}


def _fail_build(run: Run, message: str) -> None:
    state.record_failure(run.plan, "build", message)
    fail(run, message)
