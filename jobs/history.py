"""The run history of an output folder: `OUT/runs.jsonl`, one JSON line per event, folded by run id.

A run writes a `running` event when it starts and its run report (less the skipped rows) when it ends; a run
that found the folder busy writes one `skipped` event. `embedctl jobs status` and `jobs list` read it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.storage import Storage, storage_of

RUNS_FILE = "runs.jsonl"


def record(out: str | Path | Storage, event: dict) -> None:
    """Append one event to OUT/runs.jsonl (`Storage.append`: an append of one line is atomic for these sizes)."""
    line = json.dumps({**event, "at": datetime.now(UTC).isoformat(timespec="seconds")}, default=str) + "\n"
    storage_of(out).append(RUNS_FILE, line.encode("utf-8"))


def history(out: str | Path | Storage, limit: int | None = None) -> list[dict]:
    """Runs of the output folder, newest first, each the fold of its events."""
    storage = storage_of(out)
    runs: dict[str, dict] = {}
    try:
        lines = storage.read_appended(RUNS_FILE).decode("utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise StorageError(f"cannot read the run history {storage.describe(RUNS_FILE)} ({exc.strerror})") from None
    for line in lines:
        try:
            event = json.loads(line)
            runs.setdefault(event["run_id"], {}).update(event)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a line cut by a crash
    ordered = list(runs.values())[::-1]  # runs in the order they started (first event), newest first
    return ordered[:limit] if limit else ordered
