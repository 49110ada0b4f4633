"""Named and scheduled runs: the beat schedule of a job spec file, and starting a named run.

Every run goes through the run lifecycle (`jobs.lifecycle`): it takes the output folder's lock, and a run that
finds it taken is recorded as `skipped` in the run history (`jobs.history`).
"""

from __future__ import annotations

from pathlib import Path

from embedctl.jobs.broker import RUN_JOB_TASK, Settings
from embedctl.jobs.report import RunReport
from embedctl.jobs.specfile import NamedJob, load_jobs, parse_schedule
from embedctl.pipeline.errors import ConfigError
from embedctl.settings import setting


def jobs_path(explicit: str | None = None) -> Path:
    """The job spec file: --jobs, else EMBEDCTL_JOBS."""
    value = explicit or setting("jobs_path")
    if not value:
        raise ConfigError("no job spec file: set EMBEDCTL_JOBS or pass --jobs jobs.toml")
    return Path(value)


def beat_schedule(jobs: dict[str, NamedJob], queue: str | None = None) -> dict:
    """Celery beat entries, one per job with a schedule: they queue `embedctl.run_job(name)`."""
    entries = {}
    for name, job in jobs.items():
        if job.schedule is None:
            continue
        entries[f"embedctl:{name}"] = {"task": RUN_JOB_TASK, "schedule": parse_schedule(job.schedule),
                                       "args": (name,), "options": {"queue": queue} if queue else {}}
    return entries


def load_named(name: str, path: Path) -> NamedJob:
    jobs = load_jobs(path)
    if name not in jobs:
        raise ConfigError(f"no job {name!r} in {path} (jobs: {', '.join(sorted(jobs)) or 'none'})")
    return jobs[name]


def start_named_run(name: str, settings: Settings, jobs_file: str | None = None) -> dict:
    """What beat's `embedctl.run_job` task does: begin a run of the named job on the workers and return once
    its chunks are queued (the build task ends the run). A small summary for the task result."""
    from embedctl.jobs.distributed import submit_named

    job = load_named(name, jobs_path(jobs_file or settings.jobs_path))
    started = submit_named(job, settings, detach=True)
    report = started if isinstance(started, RunReport) else started.report
    if report is not None:  # skipped, or up to date
        return {"run_id": report.run_id, "job": name, "status": report.status, "reason": report.reason,
                "version": report.version}
    return {"run_id": started.run.run_id, "job": name, "status": "running", "chunks_submitted": len(started.missing)}
