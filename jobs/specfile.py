"""Job specs in TOML (`EMBEDCTL_JOBS`, e.g. jobs.toml): named jobs whose keys mirror the CLI options.

    root = "indexes"                      # optional: output root, relative to this file (default: its folder),
                                          # or a bucket prefix: "s3://bucket/indexes"
    [jobs.wordnet]
    corpus = "data/wordnet/*.parquet"     # file, directory or glob; relative to this file; or s3://bucket/prefix/
    model = "qwen3-4b"
    dims = [1024, 512, 256, 128]
    out = "indexes/wordnet"               # default: <root>/<name>; must stay inside the root (a URI: under a URI root)
    schedule = "0 3 * * *"                # crontab (5 fields), or an interval of 1s or more: "30s", "15m", "2h"
    keep = 3
    hnsw = { m = 32, ef_construction = 200 }

Every error is reported, one line each, before anything runs.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path

from embedctl.jobs.spec import JobSpec
from embedctl.pipeline.corpus import discover_files
from embedctl.pipeline.errors import ConfigError, CorpusError, StorageError
from embedctl.pipeline.storage import is_uri

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_INTERVAL = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_MIN_INTERVAL_S = 1  # shorter: beat floods the broker with runs that find the last one running (each recorded)
_HNSW_KEYS = {"m": "hnsw_m", "ef_construction": "ef_construction", "ef_search": "ef_search"}
_SPEC_KEYS = {f.name for f in fields(JobSpec)} - {"extra"}
_JOB_KEYS = (_SPEC_KEYS | {"schedule", "hnsw"}) - {"threads"}


class SpecFileError(ConfigError):
    """A job spec file with errors: `errors` holds one line per error."""

    def __init__(self, path: Path, errors: list[str]):
        self.errors = [f"{path}: {e}" for e in errors]
        super().__init__("; ".join(self.errors))


@dataclass(frozen=True)
class NamedJob:
    """A job of a spec file: its name, the JobSpec it runs, and its schedule."""

    name: str
    spec: JobSpec
    schedule: str | None

    def to_dict(self) -> dict:
        return {"name": self.name, "schedule": self.schedule, **self.spec.to_dict()}


def parse_schedule(text: str):
    """A Celery schedule from a crontab line ("0 3 * * *") or an interval ("15m"); raises ConfigError."""
    from celery.schedules import crontab

    text = str(text).strip()
    m = _INTERVAL.match(text)
    if m:
        seconds = float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
        if seconds < _MIN_INTERVAL_S:
            raise ConfigError(f"schedule {text!r}: an interval must be at least {_MIN_INTERVAL_S}s")
        return timedelta(seconds=seconds)
    parts = text.split()
    if len(parts) != 5:
        raise ConfigError(f"schedule {text!r} is neither a crontab line (5 fields: minute hour day month weekday) "
                          "nor an interval such as 30s, 15m, 2h, 1d")
    try:
        schedule = crontab(minute=parts[0], hour=parts[1], day_of_month=parts[2], month_of_year=parts[3],
                           day_of_week=parts[4])
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"schedule {text!r} is not a valid crontab line ({exc})") from None
    return schedule


def load_jobs(path: Path) -> dict[str, NamedJob]:
    """Read and validate a job spec file; raises SpecFileError listing every problem."""
    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"job spec file {str(path)!r} does not exist; set EMBEDCTL_JOBS or --jobs") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read job spec file {str(path)!r}: {exc}") from None
    base = path.resolve().parent
    errors: list[str] = []
    unknown_top = sorted(set(data) - {"jobs", "root"})
    if unknown_top:
        errors.append(f"unknown top-level key {unknown_top[0]!r} (known: jobs, root)")
    root_text = str(data.get("root", "."))
    root = root_text.rstrip("/") if is_uri(root_text) else (base / root_text).resolve()  # a bucket prefix, or a folder
    jobs_table = data.get("jobs")
    if not isinstance(jobs_table, dict) or not jobs_table:
        errors.append("no [jobs.NAME] tables")
        jobs_table = {}
    jobs: dict[str, NamedJob] = {}
    for name, table in jobs_table.items():
        where = f"jobs.{name}" if _NAME.match(name) else f"jobs.{name!r}"
        if not _NAME.match(name):
            errors.append(f"{where}: job names are letters, digits, '.', '_' and '-' (no path separators)")
            continue
        if not isinstance(table, dict):
            errors.append(f"{where}: must be a table")
            continue
        job_errors = _job_errors(table)
        schedule = table.get("schedule")
        if isinstance(schedule, str):
            try:
                parse_schedule(schedule)
            except ConfigError as exc:
                job_errors.append(str(exc))
        out = None
        if isinstance(table.get("out", ""), str):
            out = _out(root, base, name, table.get("out"))
            if not _inside(out, root):
                job_errors.append(f"out {str(out)!r} is outside the output root {str(root)!r}")
        if isinstance(table.get("corpus"), str):
            corpus = table["corpus"]
            if not is_uri(corpus) and not Path(corpus).is_absolute():
                corpus = str(base / corpus)
            try:
                discover_files(corpus)
            except (CorpusError, StorageError) as exc:
                job_errors.append(str(exc))
        if job_errors:
            errors.extend(f"{where}: {e}" for e in job_errors)
            continue
        values = {k: v for k, v in table.items() if k not in ("schedule", "hnsw")}
        for key, target in _HNSW_KEYS.items():
            if key in table.get("hnsw", {}):
                values[target] = table["hnsw"][key]
        values["corpus"] = corpus
        values["out"] = str(out)
        if isinstance(values.get("dims"), list):
            values["dims"] = tuple(values["dims"])
        try:
            spec = JobSpec(**values)
        except ConfigError as exc:
            errors.append(f"{where}: {exc}")
            continue
        jobs[name] = NamedJob(name=name, spec=spec, schedule=str(schedule) if schedule is not None else None)
    by_out: dict[str, str] = {}
    for name, job in jobs.items():
        other = by_out.setdefault(job.spec.out, name)
        if other != name:
            errors.append(f"jobs.{name}: out {job.spec.out!r} is also the output folder of jobs.{other}; each job "
                          "needs its own (one writer per folder: one job's runs would delete the other's rows)")
    if errors:
        raise SpecFileError(path, errors)
    return jobs


def _job_errors(table: dict) -> list[str]:
    errors = []
    unknown = sorted(set(table) - _JOB_KEYS)
    if unknown:
        errors.append(f"unknown key {unknown[0]!r}; known keys: {', '.join(sorted(_JOB_KEYS))}")
    if "corpus" not in table:
        errors.append("'corpus' is required")
    elif not isinstance(table["corpus"], str):
        errors.append(f"'corpus' must be a string, got {table['corpus']!r}")
    if "out" in table and not isinstance(table["out"], str):
        errors.append(f"'out' must be a string, got {table['out']!r}")
    hnsw = table.get("hnsw", {})
    if not isinstance(hnsw, dict):
        errors.append("'hnsw' must be a table such as { m = 32, ef_construction = 200 }")
    else:
        bad = sorted(set(hnsw) - set(_HNSW_KEYS))
        if bad:
            errors.append(f"unknown hnsw key {bad[0]!r}; known: {', '.join(_HNSW_KEYS)}")
    if "schedule" in table and not isinstance(table["schedule"], str):
        errors.append(f"'schedule' must be a string, got {table['schedule']!r}")
    return errors


def _out(root: Path | str, base: Path, name: str, given: str | None) -> Path | str:
    """A job's output folder: `given` (a URI, or a path relative to the spec file), else <root>/<name>."""
    if given is None:
        return f"{root}/{name}" if is_uri(str(root)) else (Path(root) / name).resolve()
    return given.rstrip("/") if is_uri(given) else (base / given).resolve()


def _inside(out: Path | str, root: Path | str) -> bool:
    """Whether `out` is `root` or below it (a URI below a URI root; a folder below a folder root)."""
    if is_uri(str(out)) or is_uri(str(root)):
        return is_uri(str(out)) and is_uri(str(root)) and (str(out) == str(root)
                                                            or str(out).startswith(str(root) + "/"))
    return out == root or root in Path(out).parents
