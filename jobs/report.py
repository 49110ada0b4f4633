"""The run report: one type, the same fields whichever way a job ran (embedded, on Celery workers, scheduled).

`embedctl index --json` and `embedctl jobs run --json` print it; `OUT/work/<job id>/report.json` keeps the last
one of a job; the run history (`OUT/runs.jsonl`) records it without the list of skipped rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from embedctl.pipeline.fsutil import json_writer
from embedctl.pipeline.storage import location, storage_of

REPORT_FILE = "report.json"

STATUSES = ("published", "up-to-date", "skipped", "failed")
"""How a run ended: a new version; nothing to do; another run held the output folder; an error."""


@dataclass
class RunReport:
    """What one run did. Counts are rows of the corpus; `chunks_*` count chunks of the job's plan."""

    run_id: str
    status: str
    mode: str  # embedded | celery
    out: str
    started: str  # ISO time, UTC
    job: str | None = None  # the job's name in a spec file (None for `embedctl index`)
    job_id: str | None = None  # the plan id: the work folder OUT/work/<job_id>
    finished: str | None = None
    seconds: float = 0.0  # start to end of the run
    model: str | None = None
    dims: list[int] = field(default_factory=list)
    index_type: str | None = None
    version: str | None = None  # the version published (or found up to date)
    path: str | None = None
    rows_total: int = 0  # rows of the corpus
    rows_indexed: int = 0  # rows in the version
    rows_embedded: int = 0  # texts run through the model by this run
    rows_reused: int = 0  # vectors taken from the embedding cache by this run
    rows_deleted: int = 0  # ids of the previous version that the new one no longer has
    rows_skipped: int = 0  # null or empty texts
    rows_truncated: int = 0  # texts cut at max_length
    chunks_total: int = 0
    chunks_embedded: int = 0  # chunks this run wrote
    chunks_done_before: int = 0  # chunks complete before this run (resumed)
    tokens: int = 0  # tokens run through the model by this run
    embed_seconds: float | None = None  # start of the run to its last chunk written
    rows_per_second: float | None = None  # rows_embedded / embed_seconds
    versions_removed: list[str] = field(default_factory=list)  # retention
    segments: int = 0  # segments of the version
    segments_built: int = 0  # new segments this run built (the others are kept from the previous version)
    rows_rewritten: int = 0  # live rows the merge policy moved out of rewritten segments
    reason: str | None = None  # why a run was skipped or up to date
    error: str | None = None  # why a run failed
    skipped: list[dict] = field(default_factory=list)  # the first 1,000 skipped rows: row, id, reason
    requests: dict = field(default_factory=dict)  # object store requests (GET, HEAD, PUT, LIST, DELETE), bytes_up,
    # bytes_down: what the run cost on S3 (empty for local folders)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_history(self) -> dict:
        """The report as a history event (without the list of skipped rows)."""
        return {k: v for k, v in asdict(self).items() if k != "skipped"}

    @classmethod
    def from_dict(cls, data: dict) -> RunReport:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def field_names() -> list[str]:
    """The fields of every run report, in order (the README documents them)."""
    return [f.name for f in fields(RunReport)]


def write_report(work_dir: Path | str, report: RunReport) -> str:
    """Write the run report into a work folder (a local path or a URI); returns where it is (for messages)."""
    storage = storage_of(location(work_dir))  # the work folder's storage (OUT/work/<job id>)
    storage.write(REPORT_FILE, json_writer(report.to_dict()))
    return storage.describe(REPORT_FILE)


def read_report(work_dir: Path | str) -> RunReport | None:
    """The last report written in a work folder (None when there is none or it cannot be read)."""
    storage = storage_of(location(work_dir))
    try:
        return RunReport.from_dict(json.loads(storage.read_bytes(REPORT_FILE)))
    except (OSError, ValueError, TypeError):
        return None
