"""Run state on disk, beside the job's outputs: what `embedctl status`, a re-run, workers and beat all read.

In `OUT/work/<plan_id>/`: `plan.json` (the plan), `job.json` (how and when it was submitted), `chunks/`
(a chunk is complete when its `.npy` exists), `failures/` (one JSON a failed chunk or build), `report.json`
(written when the version is published). Redis holds none of this: losing it loses no work.
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from pathlib import Path

from pipeline import versions, work
from pipeline.errors import StorageError
from pipeline.fsutil import read_json, write_json
from pipeline.plan import PLAN_FILE, WORK, WorkPlan, load_plan

JOB_FILE = "job.json"
REPORT_FILE = "report.json"
FAILURES = "failures"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_job(plan: WorkPlan, mode: str, broker: str | None = None, keep: int | None = None,
              **extra) -> dict:
    """Record a submission (mode: embedded or celery; broker masked) and clear earlier failures."""
    job = {"job_id": plan.plan_id, "out": str(plan.out), "work_dir": str(plan.work_dir), "mode": mode,
           "broker": broker, "submitted": now(), "host": socket.gethostname(), "pid": os.getpid(),
           "chunks_total": len(plan.corpus.chunks), "rows_total": plan.corpus.rows, "keep": keep, **extra}
    plan.save()
    clear_failures(plan)
    write_json(plan.work_dir / JOB_FILE, job)
    return job


def record_failure(plan: WorkPlan, what: str, message: str) -> None:
    """Note that a chunk or the build failed for good (the follower stops and shows `message`)."""
    write_json(plan.work_dir / FAILURES / f"{what}.json", {"what": what, "error": message, "at": now(),
                                                            "host": socket.gethostname()})


def failures(plan: WorkPlan) -> list[dict]:
    root = plan.work_dir / FAILURES
    return [read_json(p) for p in sorted(root.glob("*.json"))] if root.is_dir() else []


def clear_failures(plan: WorkPlan) -> None:
    root = plan.work_dir / FAILURES
    for p in root.glob("*.json") if root.is_dir() else []:
        p.unlink(missing_ok=True)


def progress(plan: WorkPlan) -> tuple[int, int]:
    """(chunks complete, rows in complete chunks), from the chunk files."""
    done = plan.store.complete()
    return len(done), sum(c.rows for c in plan.corpus.chunks if c.number in done)


def read_job(plan: WorkPlan) -> dict:
    path = plan.work_dir / JOB_FILE
    return read_json(path) if path.exists() else {}


def published_info(plan: WorkPlan) -> dict | None:
    """Info of the current version when it was built from exactly this plan and these index settings."""
    current = versions.current_version(plan.out)
    if current is None:
        return None
    info = read_json(current / versions.INFO)
    return {**info, "version": current.name} if info.get("index_key") == plan.index_key else None


def finish(plan: WorkPlan, info: dict, report: dict, keep: int | None = None) -> dict:
    """Complete the run report of a just-published version, apply retention, and write the report."""
    report = {**report, **work.summarise(plan), "status": "published", "version": info["version"],
              "path": info["path"], "finished": now(), "rows_deleted": _rows_deleted(plan, info["version"])}
    if keep:
        report["versions_removed"] = versions.prune(plan.out, keep)
    remove_stale_work(plan)
    write_json(plan.work_dir / REPORT_FILE, report)
    return report


def remove_stale_work(plan: WorkPlan) -> None:
    """Remove the work folders of other plans once this one is published: their vectors no longer match the
    corpus or settings, and the published plan's own vectors are the embedding cache of the next run."""
    import shutil

    root = plan.work_dir.parent
    for path in root.iterdir() if root.is_dir() else []:
        if path.is_dir() and path.name != plan.plan_id:
            shutil.rmtree(path, ignore_errors=True)


def _rows_deleted(plan: WorkPlan, version: str) -> int:
    """Ids of the version published before `version` that the new one no longer has."""
    import pyarrow.parquet as pq

    older = [p for p in versions.version_dirs(plan.out) if p.name < version]
    if not older:
        return 0
    before = set(pq.read_table(older[-1] / "rows.parquet", columns=["id"]).column("id").to_pylist())
    after = set(pq.read_table(Path(plan.out) / versions.VERSIONS / version / "rows.parquet",
                              columns=["id"]).column("id").to_pylist())
    return len(before - after)


def resolve_work_dir(target: Path) -> Path:
    """The work folder of a job: given itself, or an output folder (its newest job)."""
    target = Path(target)
    if (target / PLAN_FILE).is_file():
        return target
    root = target / WORK
    jobs = sorted((p for p in root.glob("*") if (p / PLAN_FILE).is_file()),
                  key=lambda p: (p / JOB_FILE).stat().st_mtime if (p / JOB_FILE).exists() else 0) \
        if root.is_dir() else []
    if not jobs:
        raise StorageError(f"no job in {str(target)!r}; give an --out folder of `embedctl index` or a job folder")
    return jobs[-1]


def status(target: Path) -> dict:
    """The state of the job in `target` (an output folder or a work folder), read from disk only."""
    work_dir = resolve_work_dir(target)
    plan = load_plan(work_dir)
    job = read_json(work_dir / JOB_FILE) if (work_dir / JOB_FILE).exists() else {}
    chunks_done, rows_done = progress(plan)
    info = published_info(plan)
    failed = failures(plan)
    state = "published" if info else "failed" if failed else "complete" if chunks_done == len(plan.corpus.chunks) \
        else "running"
    result = {"job_id": plan.plan_id, "out": plan.out, "work_dir": str(work_dir), "state": state,
              "mode": job.get("mode"), "submitted": job.get("submitted"), "broker": job.get("broker"),
              "chunks_done": chunks_done, "chunks_total": len(plan.corpus.chunks), "rows_done": rows_done,
              "rows_total": plan.corpus.rows, "version": info["version"] if info else None,
              "errors": [f["error"] for f in failed]}
    if (work_dir / REPORT_FILE).exists():
        result["report"] = read_json(work_dir / REPORT_FILE)
    return result
