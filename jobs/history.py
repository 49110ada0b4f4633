"""The run history of an output folder: `OUT/runs.jsonl`, one JSON line per event, folded by run id.

A run writes a `running` event when it starts and its run report (less the skipped rows) when it ends; a run
that found the folder busy writes one `skipped` event. `embedctl jobs status` and `jobs list` read it.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.fsutil import make_dirs, private_opener, storage_error

RUNS_FILE = "runs.jsonl"


def record(out: str | Path, event: dict) -> None:
    """Append one event to OUT/runs.jsonl (an append of one line is atomic for these sizes)."""
    path = Path(out) / RUNS_FILE
    line = json.dumps({**event, "at": datetime.now(UTC).isoformat(timespec="seconds")}, default=str) + "\n"
    try:
        make_dirs(path.parent)
        with open(path, "a+b", opener=private_opener) as fh:
            if fh.tell():  # a line cut by a crash or a full disk: start on a line of our own
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    line = "\n" + line
            fh.write(line.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise storage_error(exc, path) from None


def history(out: str | Path, limit: int | None = None) -> list[dict]:
    """Runs of the output folder, newest first, each the fold of its events."""
    path = Path(out) / RUNS_FILE
    runs: dict[str, dict] = {}
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
    except OSError as exc:
        raise StorageError(f"cannot read the run history {path} ({exc.strerror})") from None
    for line in lines:
        try:
            event = json.loads(line)
            runs.setdefault(event["run_id"], {}).update(event)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a line cut by a crash
    ordered = list(runs.values())[::-1]  # runs in the order they started (first event), newest first
    return ordered[:limit] if limit else ordered
