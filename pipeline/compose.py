"""The build plan of a version: which segments of the current version it keeps (with which deletions), and which
new segments it builds from which stored vectors (the one owner of `OUT/work/<job id>/build/`).

    work/<job id>/build/<key>/build.json           the plan (`BuildPlan`)
    work/<job id>/build/<key>/<sources of seg>      rows of a new segment: positions in the job's stored rows
    work/<job id>/build/<key>/<deletions of seg>    the new deletion set of a kept segment (both: `pipeline.deletions`)
    work/<job id>/build/<key>/done/<seg>-<part>.json   a piece written (rows, or the index of one dim): its checksum

A row of the current version stays where it is when the corpus still has its id with the same text (hash); other
rows of the version are deleted from their segments, and rows the version lacks (new or changed texts) go into new
segments, with the live rows of the segments the merge policy rewrites. The key covers the job, the current
version and the settings: a build that died is resumed by the next run, which builds only the missing pieces.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedctl.pipeline.deletions import deletions_file, read_positions, sources_file, write_positions
from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.fsutil import json_writer
from embedctl.pipeline.manifest import VersionInfo, read_deletions
from embedctl.pipeline.merge import MergePolicy, SegmentState
from embedctl.pipeline.plan import WorkPlan
from embedctl.pipeline.segments import LAYOUT, new_segment_id, read_rows
from embedctl.pipeline.storage import Folder, LocalStorage, Storage, join, storage_of

BUILD = "build"
PLAN = "build.json"
DONE = "done"


def segment_key(plan: WorkPlan) -> str:
    """What a segment must match to be reused by a plan: the vectors (model, instruction, length, dtype) and the
    index settings (dims, HNSW graph, storage) and the segment layout (the files a segment holds: a segment without
    a full vectors file is rewritten). efSearch and the query instruction are read at search time."""
    key = [plan.vector_key, list(plan.dims), plan.hnsw_m, plan.ef_construction, plan.index_type, LAYOUT]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]


@dataclass
class PlanRows:
    """The rows of a complete job's chunks, in chunk order (a row's position here is its `source`)."""

    ids: pa.Array
    hashes: np.ndarray  # uint64
    starts: np.ndarray  # int64: position of each chunk's first row; one more at the end
    chunks: list[int]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(chunk index, offset in its chunk) of positions."""
        where = np.searchsorted(self.starts, positions, side="right") - 1
        return where, positions - self.starts[where]


def plan_rows(plan: WorkPlan) -> PlanRows:
    tables, starts = [], [0]
    numbers = [c.number for c in plan.corpus.chunks]
    for k in numbers:
        table = plan.store.read_rows(k, columns=["id", "hash"])
        tables.append(table)
        starts.append(starts[-1] + table.num_rows)
    table = pa.concat_tables(tables, promote_options="permissive")
    ids = table.column("id").combine_chunks()
    return PlanRows(ids=ids, hashes=table.column("hash").to_numpy().astype(np.uint64),
                    starts=np.asarray(starts, np.int64), chunks=numbers)


@dataclass
class NewSegment:
    id: str
    rows: int


@dataclass
class KeptSegment:
    ref: dict  # the SegmentRef of the current version
    deleted: int  # in the new version


@dataclass
class BuildPlan:
    """What a build does (see the module doc)."""

    key: str
    plan_id: str
    base: str | None  # the version whose segments it keeps (None: a build from scratch)
    segment_key: str
    dims: list[int]
    kept: list[KeptSegment] = field(default_factory=list)
    new: list[NewSegment] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)  # segments of the base rewritten by the merge policy
    rows_new: int = 0  # rows not in the base (new or changed texts)
    rows_rewritten: int = 0  # live rows moved out of rewritten segments
    current: str | None = ""  # the version current when it was planned (None: none; "": not recorded): the
    # publish commits only if it still is, so that of two runs that built on one version only the first publishes
    folder: Folder | None = None  # where its files are

    @property
    def pieces(self) -> list[tuple[str, int]]:
        """(segment, dim) of every index file to build."""
        return [(s.id, d) for s in self.new for d in self.dims]

    def sources(self, segment: str) -> np.ndarray:
        return read_positions(self.folder.storage, self.folder.child(sources_file(segment)))

    def deletions(self, segment: str) -> np.ndarray:
        key = self.folder.child(deletions_file(segment))
        storage = self.folder.storage
        return read_positions(storage, key) if storage.exists(key) else np.zeros(0, np.int64)

    def _done_key(self, segment: str, part: str) -> str:
        return self.folder.child(f"{DONE}/{segment}-{part}.json")

    def done(self, segment: str, part: str) -> dict | None:
        """The checksum recorded when the piece (`rows` or a dim) was written, None while it is not."""
        return _read_json(self.folder.storage, self._done_key(segment, part))

    def mark_done(self, segment: str, part: str, checksum: dict) -> None:
        self.folder.storage.write(self._done_key(segment, part), json_writer(checksum))

    def missing(self) -> list[tuple[str, int]]:
        return [(s, d) for s, d in self.pieces if self.done(s, str(d)) is None]

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(replace(self, folder=None)).items() if k != "folder"}

    @classmethod
    def from_dict(cls, data: dict, folder: Folder) -> BuildPlan:
        return cls(**{**data, "kept": [KeptSegment(**k) for k in data["kept"]],
                      "new": [NewSegment(**n) for n in data["new"]], "folder": folder})


def _read_json(storage: Storage, key: str) -> dict | None:
    """A JSON file of a build, None when it is missing or unreadable."""
    try:
        return json.loads(storage.read_bytes(key))
    except (OSError, ValueError):
        return None


def _builds(plan: WorkPlan) -> Folder:
    """The folder of a job's build plans."""
    storage = storage_of(plan.out)
    return Folder(storage, plan.work.child(BUILD))


def _key(plan: WorkPlan, base: Path | None, base_info: VersionInfo | None, policy: MergePolicy,
         forced: frozenset[str]) -> str:
    parts = [plan.plan_id, segment_key(plan), base.name if base else None,
             [s.id for s in base_info.segments] if base_info else None, asdict(policy), sorted(forced)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def load_build(plan: WorkPlan, key: str) -> BuildPlan:
    builds = _builds(plan)
    folder = Folder(builds.storage, builds.child(key))
    try:
        return BuildPlan.from_dict(json.loads(folder.storage.read_bytes(folder.child(PLAN))), folder)
    except FileNotFoundError:
        raise StorageError(f"no build {key} in {plan.work_dir}; run the job again to plan it") from None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise StorageError(f"cannot read the build plan {folder.path / PLAN} ({exc}); remove {folder.path} and run "
                           "the job again") from None


def _plans(builds: Folder) -> list[tuple[float, str]]:
    """(mtime, build key) of each build plan in a folder of builds."""
    found = []
    for entry in builds.storage.list(builds.key):
        if entry.folder and (st := builds.storage.stat(join(entry.key, PLAN))) is not None:
            found.append((st.mtime, entry.name))
    return found


def latest_build(plan: WorkPlan) -> BuildPlan | None:
    """The newest build plan of a job (the one its run is building), or None."""
    plans = sorted(_plans(_builds(plan)), key=lambda p: p[0])
    return load_build(plan, plans[-1][1]) if plans else None


def reusable(plan: WorkPlan, base_info: VersionInfo | None) -> bool:
    """Whether the segments of a version can serve this plan (same vectors and index settings; format 2)."""
    return (base_info is not None and base_info.segment_key == segment_key(plan)
            and all(s.path is None for s in base_info.segments))


def compose(plan: WorkPlan, base: Path | Folder | None, base_info: VersionInfo | None, policy: MergePolicy,
            forced: frozenset[str] = frozenset(), current: str | None = "") -> BuildPlan:
    """The build plan of the next version of a complete job (reusing a plan already made for the same job, base
    and settings: the pieces it built are kept). `current`: the name of the current version (None: there is none),
    which the publish checks is still current."""
    if not reusable(plan, base_info):
        base = base_info = None
    key = _key(plan, base, base_info, policy, forced)
    builds = _builds(plan)
    folder = Folder(builds.storage, builds.child(key))
    storage = folder.storage
    if storage.exists(folder.child(PLAN)):
        try:
            build = load_build(plan, key)
        except StorageError:  # a torn or garbled plan: its pieces cannot be trusted, plan the build again
            storage.delete(folder.key)
        else:
            if build.current != current:
                build.current = current
                storage.write(folder.child(PLAN), json_writer(build.to_dict()))
            return build
    rows = plan_rows(plan)
    n = len(rows.hashes)
    assigned = np.zeros(n, dtype=bool)
    states, kept_positions, deletions = [], {}, {}
    for ref in base_info.segments if base_info else ():
        if ref.id in forced:  # rewritten from the stored vectors, without reading its (damaged) files
            continue
        table = read_rows(storage_of(plan.out), ref.prefix, columns=["id", "hash"])
        live = np.ones(ref.rows, dtype=bool)
        live[read_deletions(base, base_info, ref)] = False
        pos = _positions(table.column("id"), rows.ids)
        found = pos >= 0
        same = np.zeros(ref.rows, dtype=bool)
        same[found] = rows.hashes[pos[found]] == table.column("hash").to_numpy()[found]
        keep = live & same
        keep[keep] = ~assigned[pos[keep]]  # an id is live in one segment only
        assigned[pos[keep]] = True
        kept_positions[ref.id] = pos[keep]
        deletions[ref.id] = np.flatnonzero(~keep)
        states.append(SegmentState(ref.id, ref.rows, int((~keep).sum())))
    new_positions = np.flatnonzero(~assigned)
    rewrite = policy.choose(states, len(new_positions))
    sources = np.sort(np.concatenate([new_positions] + [kept_positions[i] for i in rewrite]).astype(np.int64))
    count = math.ceil(len(sources) / policy.segment_rows) if len(sources) else 0
    build = BuildPlan(key=key, plan_id=plan.plan_id, base=base.name if base else None, segment_key=segment_key(plan),
                      dims=list(plan.dims), rewritten=list(rewrite), rows_new=len(new_positions),
                      rows_rewritten=len(sources) - len(new_positions), current=current, folder=folder)
    for part in np.array_split(sources, count) if count else []:
        segment = NewSegment(new_segment_id(), len(part))
        write_positions(storage, folder.child(sources_file(segment.id)), part)
        build.new.append(segment)
    for ref in base_info.segments if base_info else ():
        if ref.id not in rewrite and ref.id not in forced:
            write_positions(storage, folder.child(deletions_file(ref.id)), deletions[ref.id])
            build.kept.append(KeptSegment(ref=asdict(ref), deleted=len(deletions[ref.id])))
    storage.write(folder.child(PLAN), json_writer(build.to_dict()))
    return build


def _positions(ids: pa.ChunkedArray, value_set: pa.Array) -> np.ndarray:
    """Position of each id in `value_set` (-1 where absent)."""
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if ids.type != value_set.type:
        try:
            ids = ids.cast(value_set.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return np.full(len(ids), -1, np.int64)  # the id column changed type: nothing matches
    return pc.index_in(ids, value_set=value_set).fill_null(-1).to_numpy().astype(np.int64)


def gather_rows(plan: WorkPlan, rows: PlanRows, positions: np.ndarray) -> pa.Table:
    """The stored rows (row, id, text, hash) at `positions`, in that order."""
    where, offset = rows.locate(positions)
    parts = []
    for c in np.unique(where):
        sel = where == c
        table = plan.store.read_rows(rows.chunks[c], columns=["row", "id", "text", "hash"])
        parts.append((np.flatnonzero(sel), table.take(pa.array(offset[sel]))))
    order = np.argsort(np.concatenate([p[0] for p in parts]), kind="stable") if parts else np.zeros(0, np.int64)
    table = pa.concat_tables([p[1] for p in parts], promote_options="permissive") if parts else None
    return table.take(pa.array(order)) if table is not None else pa.table({})


def gather_vectors(plan: WorkPlan, rows: PlanRows, positions: np.ndarray) -> np.ndarray:
    """The stored full-dim float16 vectors at `positions`, in that order."""
    where, offset = rows.locate(positions)
    out = np.empty((len(positions), plan.dim), dtype=np.float16)
    for c in np.unique(where):
        sel = where == c
        out[sel] = plan.store.read_vectors(rows.chunks[c], rows=offset[sel])  # (an overlay reads only those)
    return out


def segments_in_use(work_root: Path | Storage) -> set[str]:
    """The segments the build plans under OUT/work refer to (new or kept): garbage collection spares them."""
    storage = work_root if isinstance(work_root, Storage) else LocalStorage(work_root)
    found: set[str] = set()
    for job in storage.list():
        builds = Folder(storage, join(job.key, BUILD))
        for _mtime, key in _plans(builds) if job.folder else []:
            data = _read_json(storage, join(builds.child(key), PLAN))
            if not isinstance(data, dict):
                continue
            found.update(s["id"] for s in data.get("new", []))
            found.update(k["ref"]["id"] for k in data.get("kept", []))
    return found


def remove_builds(plan: WorkPlan, keep: str | None = None) -> None:
    """Remove the build plans of a job (all but `keep`)."""
    builds = _builds(plan)
    for entry in builds.storage.list(builds.key):
        if entry.name != keep:
            builds.storage.delete(entry.key)

