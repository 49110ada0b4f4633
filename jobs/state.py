"""Run state on disk, beside the job's outputs: what `embedctl status`, a re-run, workers and beat all read.

In `OUT/work/<job id>/` (the job id is the plan id):
- `plan.json`: the plan (`pipeline.plan`);
- `job.json`: the run that owns the job now (`RunRecord`: run id, mode, lease, retention);
- `chunks/`: the chunk store (a chunk is complete when its `.npy` exists);
- `running/<chunk-N|build>.json`: heartbeats of the tasks working on it, touched every few seconds: a stale one
  means its worker died (the follower re-queues that work);
- `failures/`: one JSON per chunk or build that failed for good;
- `report.json`: the run report of the last run that ended (`jobs.report`).
Redis holds none of this: losing it loses no work.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from embedctl.jobs.locks import LeaseRef
from embedctl.jobs.report import read_report
from embedctl.pipeline import versions
from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.fsutil import json_writer
from embedctl.pipeline.manifest import damaged_files, read_info
from embedctl.pipeline.plan import CHUNKS, PLAN_FILE, WORK, WorkPlan, load_plan
from embedctl.pipeline.storage import Storage, child, is_uri, join, location, storage_of

LOG = logging.getLogger(__name__)

JOB_FILE = "job.json"
FAILURES = "failures"
REQUESTS = "requests"
RUNNING = "running"
RECORD = ".json"
"""The suffix of a failure record (`failures/<what>.json`) and of a heartbeat (`running/<what>.json`)."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class RunRecord:
    """The run that owns a job's work folder now (job.json)."""

    run_id: str
    mode: str  # embedded | celery
    started: str
    started_ts: float
    lease: LeaseRef
    job: str | None = None
    keep: int | None = None
    broker: str | None = None  # masked
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    def to_dict(self) -> dict:
        return {**asdict(self), "lease": self.lease.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        names = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in names}
        values["lease"] = LeaseRef.from_dict(values["lease"])
        return cls(**values)


def write_run(plan: WorkPlan, record: RunRecord) -> None:
    """Record the run that owns the job (and the plan it runs); clear the failures of earlier runs."""
    plan.save()
    clear_failures(plan)
    plan.storage.write(plan.work.child(JOB_FILE), json_writer({
        **record.to_dict(), "job_id": plan.plan_id, "out": str(plan.out), "chunks_total": len(plan.corpus.chunks),
        "rows_total": plan.corpus.rows}))


def read_run(plan: WorkPlan) -> RunRecord | None:
    key = plan.work.child(JOB_FILE)
    try:
        return RunRecord.from_dict(json.loads(plan.storage.read_bytes(key)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise StorageError(f"cannot read {plan.storage.describe(key)} ({exc}); run the job again to record it "
                           "anew") from None


# -- failures ---------------------------------------------------------------------------------------------------

def record_failure(plan: WorkPlan, what: str, message: str) -> None:
    """Note that a chunk or the build failed for good (the follower stops and shows `message`)."""
    plan.storage.write(_record_key(plan, FAILURES, what), json_writer({"what": what, "error": message, "at": now(),
                                                                       "host": socket.gethostname()}))


def _record_key(plan: WorkPlan, folder: str, what: str) -> str:
    return join(plan.work.child(folder), what + RECORD)


def _records(plan: WorkPlan, folder: str) -> list[str]:
    """Keys of the records in `folder` of the work folder, by name."""
    return [e.key for e in plan.storage.list(plan.work.child(folder)) if not e.folder and e.name.endswith(RECORD)]


def failures(plan: WorkPlan) -> list[dict]:
    found = []
    for key in _records(plan, FAILURES):
        try:
            found.append(json.loads(plan.storage.read_bytes(key)))
        except (OSError, ValueError):
            continue  # being written
    return found


def record_requests(plan: WorkPlan, run_id: str, what: str, counts: dict[str, int]) -> None:
    """Keep what a step of run `run_id` asked of an object store (requests by kind, bytes moved), so that the run's
    report can add up a run spread over hosts. Nothing for a local folder (no requests)."""
    if any(counts.values()):
        name = f"{run_id}-{what}-{socket.gethostname()}-{os.getpid()}"
        plan.storage.write(_record_key(plan, REQUESTS, name), json_writer(counts))


def run_requests(plan: WorkPlan, run_id: str) -> dict[str, int]:
    """The requests the steps of run `run_id` recorded, added up."""
    total: dict[str, int] = {}
    for key in _records(plan, REQUESTS):
        if key.rsplit("/", 1)[-1].startswith(run_id + "-"):
            try:
                for kind, n in json.loads(plan.storage.read_bytes(key)).items():
                    total[kind] = total.get(kind, 0) + int(n)
            except (OSError, ValueError, AttributeError):
                continue
    return total


def clear_failures(plan: WorkPlan) -> None:
    for key in _records(plan, FAILURES):
        plan.storage.delete(key)


# -- heartbeats -------------------------------------------------------------------------------------------------

def heartbeat(plan: WorkPlan, what: str, run_id: str | None = None) -> bool:
    """Write or refresh the heartbeat of a task working on `what` (`vectors.chunk_name`, build); False if the work
    folder is gone (the job was superseded)."""
    storage, key = plan.storage, _record_key(plan, RUNNING, what)
    if not storage.is_folder(plan.work.key):
        return False
    try:
        if storage.exists(key):
            storage.touch(key)
        else:
            storage.write(key, json_writer({"what": what, "run_id": run_id, "host": socket.gethostname(),
                                            "pid": os.getpid(), "started": now()}))
    except FileNotFoundError:
        return False
    return True


def heartbeat_age(plan: WorkPlan, what: str) -> float | None:
    """Seconds since the last heartbeat of `what`, None when no task has worked on it (or it ended)."""
    try:
        st = plan.storage.stat(_record_key(plan, RUNNING, what))
    except OSError:
        return None
    return None if st is None else max(0.0, time.time() - st.mtime)


def end_heartbeat(plan: WorkPlan, what: str) -> None:
    plan.storage.delete(_record_key(plan, RUNNING, what))


def latest_activity(plan: WorkPlan) -> float:
    """Unix time of the newest sign of work on the job: a chunk written or a heartbeat."""
    storage, times = plan.storage, [0.0]
    for folder in (plan.work.child(CHUNKS), plan.work.child(RUNNING)):
        try:
            times.extend(st.mtime for e in storage.list(folder) if (st := storage.stat(e.key)) is not None)
        except OSError:
            continue
    return max(times)


# -- reading the state ------------------------------------------------------------------------------------------

def progress(plan: WorkPlan) -> tuple[int, int]:
    """(chunks complete, rows in complete chunks), from the chunk files."""
    done = plan.store.complete()
    return len(done), sum(c.rows for c in plan.corpus.chunks if c.number in done)


def published_version(plan: WorkPlan, contents: bool = False) -> tuple[str, int] | None:
    """(version name, rows) of the current version when it was built from exactly this plan and these index
    settings (the job is up to date), else None (a version whose info.json is damaged is not up to date: the next
    run builds a new one). `contents`: check the files' checksums too (what a run's up-to-date check does; it may
    read files and record verdicts), else only that they exist with their sizes (what readers such as `status`
    ask: they read no file whole and write nothing)."""
    current = versions.current_version(plan.out)
    if current is None:
        return None
    try:
        info = read_info(current)
    except StorageError as exc:
        LOG.warning("%s", exc)
        return None
    if info.index_key != plan.index_key:
        return None
    damaged = damaged_files(current, info, contents)
    if damaged:
        LOG.warning("%s is damaged (%s): building a new version", damaged[0][1], damaged[0][2])
        return None
    return current.name, info.rows


def resolve_work_dir(target: Path | str) -> Path | str:
    """The work folder of a job: given itself, or an output folder (its newest job); a path or a URI."""
    target = location(target)
    storage = storage_of(target)
    if _is_file(storage, PLAN_FILE):
        return target
    jobs = sorted((e.key for e in storage.list(WORK) if _is_file(storage, join(e.key, PLAN_FILE))),
                  key=lambda key: st.mtime if (st := storage.stat(join(key, JOB_FILE))) is not None else 0)
    if not jobs:
        if not is_uri(target) and target.exists() and not target.is_dir():
            raise StorageError(f"{str(target)!r} is a file; give an --out folder of `embedctl index` or a job folder")
        raise StorageError(f"no job in {str(target)!r}; give an --out folder of `embedctl index` or a job folder")
    return child(target, jobs[-1])


def _is_file(storage: Storage, key: str) -> bool:
    return storage.exists(key) and not storage.is_folder(key)


def status(target: Path) -> dict:
    """The state of the job in `target` (an output folder or a work folder), read from disk only."""
    work_dir = resolve_work_dir(target)
    plan = load_plan(work_dir)
    run = read_run(plan)
    chunks_done, rows_done = progress(plan)
    published = published_version(plan)  # sizes only: status reads, never writes
    failed = failures(plan)
    report = read_report(work_dir)
    ended = report if report is not None and run is not None and report.run_id == run.run_id else None
    errors = [f["error"] for f in failed]
    if ended is not None and ended.status == "failed" and ended.error not in errors:
        errors.append(ended.error)
    state = "published" if published else "failed" if errors else \
        "complete" if chunks_done == len(plan.corpus.chunks) else "running"
    result = {"job_id": plan.plan_id, "out": plan.out, "work_dir": str(work_dir), "state": state,
              "run_id": run.run_id if run else None, "job": run.job if run else None,
              "mode": run.mode if run else None, "submitted": run.started if run else None,
              "broker": run.broker if run else None,
              "chunks_done": chunks_done, "chunks_total": len(plan.corpus.chunks), "rows_done": rows_done,
              "rows_total": plan.corpus.rows, "version": published[0] if published else None,
              "errors": errors}
    if report is not None:
        result["report"] = report.to_dict()
    return result
