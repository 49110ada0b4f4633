"""A run's report, counted: from the chunk reports of its plan (those stamped with its run id are its own work),
the version it published or found, and the version before it.

`jobs.report` holds the report's type and file; this module fills it in for each way a run ends (published,
up to date, failed, skipped), the same whichever mode ran it.
"""

from __future__ import annotations

import time

from embedctl.jobs import state
from embedctl.jobs.report import RunReport
from embedctl.pipeline import versions
from embedctl.pipeline.compose import BuildPlan
from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.manifest import VersionInfo
from embedctl.pipeline.plan import WorkPlan
from embedctl.pipeline.storage import Folder, child, join, storage_of


def run_report(plan: WorkPlan, record: state.RunRecord, status: str, **values) -> RunReport:
    """The report of the run `record` of `plan`, ending with `status`; `values`: fields set besides the counts."""
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


def published_report(plan: WorkPlan, record: state.RunRecord, version: str, info: VersionInfo,
                     build: BuildPlan | None) -> RunReport:
    """The report of a run that published `version` (`info`: its manifest; `build`: the build plan it published,
    None when the run finishes a publish that a dead worker swapped in)."""
    return run_report(plan, record, "published", version=version, path=str(child(plan.out, versions.VERSIONS, version)),
                      rows_indexed=info.rows, rows_deleted=rows_deleted(plan, version), segments=len(info.segments),
                      segments_built=len(build.new) if build else 0,
                      rows_rewritten=build.rows_rewritten if build else 0)


def up_to_date_report(plan: WorkPlan, record: state.RunRecord, version: str, rows: int) -> RunReport:
    """The report of a run whose published version already matches its plan: nothing embedded, nothing built."""
    return RunReport(run_id=record.run_id, status="up-to-date", mode=record.mode, out=str(plan.out),
                     started=record.started, job=record.job, job_id=plan.plan_id, finished=state.now(),
                     seconds=round(time.time() - record.started_ts, 3), model=plan.model, dims=list(plan.dims),
                     index_type=plan.index_type, version=version,
                     path=str(child(plan.out, versions.VERSIONS, version)), rows_total=plan.corpus.rows,
                     rows_indexed=rows, chunks_total=len(plan.corpus.chunks),
                     chunks_done_before=len(plan.corpus.chunks),
                     reason=f"{version} already indexes this corpus with these settings")


def skipped_report(run_id: str, out: str, mode: str, job: str | None, reason: str) -> RunReport:
    """The report of a run that found its output folder taken (what scheduled and named runs record)."""
    return RunReport(run_id=run_id, status="skipped", mode=mode, out=str(out), started=state.now(),
                     finished=state.now(), job=job, reason=reason)


def rows_deleted(plan: WorkPlan, version: str) -> int:
    """Ids of the version published before `version` that the new one no longer has."""
    import pyarrow.compute as pc

    older = [p for p in versions.version_dirs(plan.out) if p.name < version]
    if not older:
        return 0
    try:
        before = versions.live_ids(older[-1])
    except (OSError, ValueError, StorageError):
        return 0  # the previous version is damaged: nothing to compare with
    after = versions.live_ids(Folder(storage_of(plan.out), join(versions.VERSIONS, version)))  # a path or on S3
    if not len(before) or before.type != after.type:
        return len(before)
    kept = pc.sum(pc.is_in(before, value_set=after)).as_py() or 0
    return len(before) - int(kept)
