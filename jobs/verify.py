"""`embedctl verify`: every file of an output folder's current version and of the stored vectors it was built from,
checked against the checksums recorded when they were written; `--repair` embeds damaged chunks again and builds a
new version from sound vectors.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from embedctl.jobs import state
from embedctl.pipeline import checksum, versions
from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.manifest import read_info, version_files
from embedctl.pipeline.plan import WORK, WorkPlan, load_plan
from embedctl.pipeline.segments import ROWS_FILE, VECTORS_FILE
from embedctl.pipeline.storage import Storage, child, is_uri, location, storage_of


@dataclass
class Damage:
    """One damaged file (or a missing one)."""

    path: str
    problem: str
    kind: str  # info | current | deletions | rows | index | vectors | chunk
    chunk: int | None = None
    segment: str | None = None


@dataclass
class Check:
    """What `check` found."""

    out: str
    version: str | None = None
    job_id: str | None = None
    files: int = 0  # files checked
    bytes: int = 0
    chunks: int = 0  # stored chunks checked
    seconds: float = 0.0
    damaged: list[Damage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def check(out: Path) -> Check:
    """Check the current version of `out` and the chunks of its plan; never raises for damage (it reports it)."""
    out = location(out)
    t0 = time.perf_counter()
    result = Check(out=str(out))
    storage = storage_of(out)
    if not (storage.list("") if is_uri(out) else Path(out).is_dir()):
        raise StorageError(f"{out} is not an output folder of `embedctl index` (no such folder)")
    pointer, pointed = versions.pointed_version(storage)
    current = versions.current_folder(storage) or pointed  # pointed: its info.json is damaged, read_info says how
    plan_id = None
    if current is None and pointer is not None:
        result.damaged.append(Damage(storage.describe(versions.CURRENT),
                                     f"points to {pointer.value}, which is missing or incomplete", versions.CURRENT))
    elif current is None:
        result.notes.append("no version is published yet")
    else:
        result.version = current.name
        try:
            info = read_info(current)
        except checksum.DamagedFile as exc:
            result.damaged.append(Damage(exc.shown, exc.problem, "info"))
        else:
            plan_id = info.plan_id
            result.files += 1
            verdicts = checksum.Verdicts(storage)  # what a run's up-to-date check trusts: damage found here drops it
            for ref, path, expected in version_files(current, info):
                kind = ("deletions" if ref is None else "rows" if path.name == ROWS_FILE
                        else "vectors" if path.name == VECTORS_FILE else "index")
                _check_file(result, verdicts, path, expected, kind, ref.id if ref else None, storage)
            verdicts.save()
            if not any(ref.files.get(name) for ref in info.segments for name in ref.files):
                result.notes.append(f"{current.name} was built before checksums were recorded: its files are "
                                    "not checked (the next build records them)")
    plan = _plan_of(out, plan_id)
    if plan is None:
        result.notes.append("no stored vectors to check (none kept, or `embedctl cache prune --all` removed them)")
    else:
        result.job_id = plan.plan_id
        store = plan.store
        for number in sorted(store.complete()):
            result.chunks += 1
            result.bytes += _size(store.vectors_path(number)) + _size(store.rows_path(number))
            for path, problem in store.verify(number):
                result.damaged.append(Damage(_shown(storage, path), problem, "chunk", number))
        missing = [c.number for c in plan.corpus.chunks if c.number not in store.complete()]
        if missing and plan_id == plan.plan_id:  # the current version was built from them: they are lost
            for number in missing:
                result.damaged.append(Damage(_shown(storage, store.vectors_path(number)), "missing", "chunk",
                                             number))
        elif missing:
            result.notes.append(f"{len(missing)} chunks of job {plan.plan_id} are not stored yet")
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _check_file(result: Check, verdicts: checksum.Verdicts, path: Path, expected: dict, kind: str,
                segment: str | None, storage: Storage) -> None:
    result.files += 1
    result.bytes += _size(path)
    problem = verdicts.check(path, expected)
    if problem is not None:
        result.damaged.append(Damage(_shown(storage, path), problem, kind, segment=segment))


def _shown(storage: Storage, path: Path) -> str:
    """The name a user knows a file by: its object's URI when `path` is the cached copy of an object."""
    try:
        key = Path(path).relative_to(storage.local_path(""))
    except ValueError:
        return str(path)
    return storage.describe(key.as_posix())


def _plan_of(out: Path, plan_id: str | None) -> WorkPlan | None:
    """The plan the current version was built from (the newest job when its info.json cannot tell)."""
    candidates = [child(out, WORK, plan_id)] if plan_id else []
    with contextlib.suppress(StorageError):
        candidates.append(state.resolve_work_dir(out))
    for work_dir in candidates:
        try:
            return load_plan(work_dir)
        except StorageError:
            continue
    return None


def damaged_chunks(found: Check) -> list[int]:
    return sorted({d.chunk for d in found.damaged if d.chunk is not None})


def damaged_segments(found: Check) -> frozenset[str]:
    """Segments with a damaged rows, index or vectors file: a repair rewrites them from the stored vectors."""
    return frozenset(d.segment for d in found.damaged if d.segment is not None)


def version_damaged(found: Check) -> bool:
    """Whether the version's own records (info.json, `current`, a deletion set) are damaged: a repair then builds
    every segment anew from the stored vectors."""
    return any(d.kind in ("info", versions.CURRENT, "deletions") for d in found.damaged)
