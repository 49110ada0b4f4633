"""The chunk store: full-dim vectors of each chunk, beside its ids and texts, keyed by chunk number.

Per chunk k, in the store folder:
- `chunk-{k:06d}.rows.parquet`: columns `row` (corpus row number), `id`, `text`, `hash` (64-bit text hash, the
  embedding cache key) of the embedded rows;
- `chunk-{k:06d}.json`: the chunk report (rows read, skipped rows with their reason, truncated rows, seconds);
- `chunk-{k:06d}.npy`: float16 (rows, dim) vectors, L2-normalised at full dim, in the order of the rows file.
Each file is written atomically, the `.npy` last: its existence means the chunk is complete. The report records
the size and checksum of the other two (`files`), written just before the `.npy` appears, so a reader can tell a
complete chunk from a damaged one (`verify`). The files are plain numpy and pyarrow formats.

An **overlay chunk** (a re-index whose texts are mostly unchanged) stores only the vectors it had to compute: its
`.npy` holds those rows, and its report names the stored vectors files the other rows are in (`sources`: each
file's key less `.npy` from the output folder, its recorded checksum and row count) and where each run of rows is
(`layout`: `[source, start, count]` in row order; source -1 is the chunk's own file). A source is always a file
that holds the vectors it is cited for (never an overlay's logical row numbers), so a chunk reads at most
`MAX_SOURCES` files, and an overlay that would need more is written whole (compaction). The work folders that a
kept plan's chunks point into are kept with it (`plan.work_in_use`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedctl.pipeline import checksum
from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.fsutil import json_writer, npy_writer
from embedctl.pipeline.storage import Folder, LocalStorage, Storage

_DONE = re.compile(r"^chunk-(\d{6,})\.npy$")


class DamagedChunks(StorageError):
    """Complete chunks whose files do not match their checksums: they must be embedded again before a build."""

    def __init__(self, damage: dict[int, list[tuple[Path, str]]], repair: str):
        self.chunks = sorted(damage)
        path, problem = damage[self.chunks[0]][0]
        super().__init__(f"{len(self.chunks)} stored chunks are damaged (first: {path}: {problem}); they are "
                         f"embedded again by the next run of the job, or by {repair}")


_VECTORS, _ROWS, _REPORT = ".npy", ".rows.parquet", ".json"

MAX_SOURCES = 8
"""At most this many vectors files behind one chunk (its own included): an overlay that would read more is written
whole instead, which bounds both a read's fan-out and how many earlier work folders a plan keeps alive."""

OVERLAY_SHARE = 0.5
"""A chunk is written as an overlay only when at least this share of its rows is already stored in the output
folder: below it, the pointers save little and the chunk would tie itself to earlier work folders for nothing."""


@dataclass(frozen=True)
class Source:
    """A stored vectors file that rows of a chunk are read from: the chunk's key less its suffix (from the output
    folder), the file's recorded checksum and its row count."""

    key: str
    checksum: dict | None
    rows: int

    def to_dict(self) -> dict:
        return {"chunk": self.key, "vectors": self.checksum, "rows": self.rows}

    @classmethod
    def from_dict(cls, data: dict) -> Source:
        return cls(str(data["chunk"]), data.get("vectors"), int(data["rows"]))


@dataclass
class Layout:
    """Where the vectors of each row of a chunk are: `sources[source[i]]` at position `position[i]`."""

    sources: list[Source]
    source: np.ndarray  # (rows,) int64
    position: np.ndarray  # (rows,) int64
    storage: Storage | None = None  # the storage the sources' keys are in


def chunk_name(number: int) -> str:
    """The name of chunk `number` (its files' names less their suffix; the run state's heartbeats use it too)."""
    return f"chunk-{number:06d}"


class ChunkStore:
    """Reads and writes the outputs of the chunks of one plan, in a folder of the output folder's storage (a local
    path: that folder)."""

    def __init__(self, root: Path | Folder):
        self.folder = root if isinstance(root, Folder) else Folder(LocalStorage(root), "")
        self.storage = self.folder.storage
        self.root = self.folder.path

    def _key(self, number: int, suffix: str) -> str:
        return self.folder.child(chunk_name(number) + suffix)

    def _path(self, number: int, suffix: str) -> Path:
        return self.storage.local_path(self._key(number, suffix))

    def vectors_path(self, number: int) -> Path:
        return self._path(number, _VECTORS)

    def rows_path(self, number: int) -> Path:
        return self._path(number, _ROWS)

    def report_path(self, number: int) -> Path:
        return self._path(number, _REPORT)

    def is_complete(self, number: int) -> bool:
        return self.storage.exists(self._key(number, _VECTORS))

    def complete(self) -> set[int]:
        """Numbers of the complete chunks."""
        return {int(m.group(1)) for e in self.storage.list(self.folder.key) if (m := _DONE.match(e.name))}

    def newest_write(self) -> float | None:
        """Unix time of the newest chunk file written (None when there is none)."""
        stats = [st for e in self.storage.list(self.folder.key) if (st := self.storage.stat(e.key)) is not None]
        return max((st.mtime for st in stats), default=None)

    def write(self, number: int, rows: np.ndarray, ids: list, texts: list, vectors: np.ndarray, report: dict,
              id_type: pa.DataType | None = None, hashes: np.ndarray | None = None,
              copy_of: tuple[ChunkStore, int] | None = None, stored: Layout | None = None) -> dict:
        """Write one chunk's outputs (rows file, report with both files' checksums, then vectors: the completion
        mark); returns the report as written. `copy_of`: a stored chunk whose rows file may equal this one's (every
        text was cached from it, in order): it is then copied, which an object store does without the bytes
        leaving it. `stored`: where rows whose vectors are stored already are (source -1: not stored); when most
        are, the chunk is written as an overlay that points at them (the module docstring) and stores only the
        others, so a re-index uploads no unchanged vectors and keeps no second copy of them."""
        if len(rows) != len(vectors) or len(ids) != len(rows) or len(texts) != len(rows):
            raise ValueError(f"chunk {number}: {len(rows)} rows, {len(ids)} ids, {len(texts)} texts, "
                             f"{len(vectors)} vectors")
        columns = {"row": pa.array(rows, pa.int64()), "id": pa.array(ids, type=id_type),
                   "text": pa.array(texts, pa.string())}
        if hashes is not None:
            columns["hash"] = pa.array(np.asarray(hashes, dtype=np.uint64), pa.uint64())
        table = pa.table(columns)
        same = self._same_rows(copy_of, table)
        if same is not None:  # rows unchanged (rows were appended after them): copied
            self.storage.copy(same[0], self._key(number, _ROWS))
            files = {"rows": same[1]}
        else:
            self.storage.write(self._key(number, _ROWS), lambda tmp: pq.write_table(table, tmp))
            files = {"rows": checksum.checksum(self.rows_path(number))}
        report = {**report, "files": files}
        half = np.ascontiguousarray(vectors, dtype=np.float16)

        def record(tmp: Path) -> None:  # the report lands before the completion mark
            files["vectors"] = checksum.checksum(tmp)
            self.storage.write(self._key(number, _REPORT), json_writer(report))

        overlay = self._overlay(stored, len(half))
        if overlay is not None:
            report["sources"], report["layout"], own = overlay
            half = np.ascontiguousarray(half[own])
        self.storage.write(self._key(number, _VECTORS), npy_writer(half), before_commit=record)
        return report

    def _overlay(self, stored: Layout | None, rows: int) -> tuple[list[dict], list[list[int]], np.ndarray] | None:
        """(sources, layout, positions of the rows this chunk stores itself) of an overlay of `stored`, or None
        when the chunk is better written whole (too few rows stored, or too many files behind them)."""
        if stored is None or not rows or len(stored.source) != rows or stored.storage != self.storage:
            return None
        found = stored.source >= 0
        used = np.unique(stored.source[found])
        if found.sum() < OVERLAY_SHARE * rows or len(used) + 1 > MAX_SOURCES:  # + its own file
            return None
        mine = self.folder.key + "/" if self.folder.key else ""
        if not mine or any(stored.sources[i].key.startswith(mine) for i in used):
            return None  # a source in this very chunk store (never made, but a pointer to itself would be a loop)
        renumber = np.full(len(stored.sources), -1, np.int64)
        renumber[used] = np.arange(len(used))
        source = np.where(found, renumber[np.maximum(stored.source, 0)], -1)
        position = stored.position.copy()
        own = np.flatnonzero(~found)
        position[own] = np.arange(len(own))
        breaks = np.flatnonzero((np.diff(source) != 0) | (np.diff(position) != 1)) + 1
        starts = np.concatenate([[0], breaks])
        stops = np.concatenate([breaks, [rows]])
        layout = [[int(source[a]), int(position[a]), int(b - a)] for a, b in zip(starts, stops, strict=True)]
        return [stored.sources[i].to_dict() for i in used], layout, own

    def layout(self, number: int, report: dict | None = None) -> Layout:
        """Where each row's vector of complete chunk `number` is stored (its own file for a whole chunk)."""
        report = self.read_report(number) if report is None else report
        own = Source(self._key(number, ""), (report.get("files") or {}).get("vectors"), 0)
        if "layout" not in report:
            rows = int(report["indexed"]) if "indexed" in report else len(self.read_vectors(number))
            return Layout([replace_rows(own, rows)], np.zeros(rows, np.int64), np.arange(rows, dtype=np.int64),
                          self.storage)
        sources = [Source.from_dict(d) for d in report["sources"]]
        runs = np.asarray(report["layout"], dtype=np.int64).reshape(-1, 3)
        counts = runs[:, 2]
        rows = int(counts.sum())
        starts = np.repeat(runs[:, 1] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        position = starts + np.arange(rows, dtype=np.int64)
        source = np.repeat(runs[:, 0], counts)
        mine = source < 0
        own = replace_rows(own, int(mine.sum()))
        source = np.where(mine, len(sources), source)
        return Layout([*sources, own], source, position, self.storage)

    def source_path(self, source: Source) -> Path:
        """The local file (a cached copy on an object store) of a source's vectors."""
        return self.storage.local_path(source.key + _VECTORS)

    def referenced(self) -> set[str]:
        """Keys (less `.npy`) of the vectors files of other chunks that the complete chunks of this store point at."""
        found: set[str] = set()
        for number in self.complete():
            try:
                report = self.read_report(number)
            except (OSError, ValueError):
                continue
            found.update(Source.from_dict(d).key for d in report.get("sources", []))
        return found

    def _same_rows(self, copy_of: tuple[ChunkStore, int] | None, table: pa.Table) -> tuple[str, dict] | None:
        """(key, recorded checksum) of the stored rows file equal to `table`, None when there is none."""
        if copy_of is None or copy_of[0].storage != self.storage:
            return None
        store, number = copy_of
        try:
            recorded = store.read_report(number)["files"]["rows"]
            same = store.read_rows(number).equals(table)
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
            return None
        return (store._key(number, _ROWS), recorded) if same else None

    def verify(self, number: int, seen: dict | None = None) -> list[tuple[Path, str]]:
        """(file, what is wrong) for each damaged file of a complete chunk; empty when the chunk is sound. An
        overlay's sources are checked too, and its layout against its files (`seen`: verdicts of files checked
        already, shared by the calls of one check so that a source cited by many chunks is read once)."""
        seen = {} if seen is None else seen

        def problem(path: Path, expected: dict | None) -> str | None:
            key = (str(path), json.dumps(expected, sort_keys=True))
            if key not in seen:
                seen[key] = checksum.problem(path, expected)
            return seen[key]

        try:
            report = self.read_report(number)
            files = report["files"]
        except (OSError, ValueError, TypeError, KeyError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable or incomplete"
            return [(self.report_path(number), reason)]
        found = []
        for kind, path in (("rows", self.rows_path(number)), ("vectors", self.vectors_path(number))):
            found_problem = problem(path, files.get(kind))
            if found_problem is not None:
                found.append((path, found_problem))
        sources = []
        for data in report.get("sources", []):  # an overlay: the stored vectors it points at
            try:
                source = Source.from_dict(data)
            except (KeyError, TypeError, ValueError):
                return [*found, (self.report_path(number), "its list of sources is unreadable")]
            sources.append(source)
            path = self.source_path(source)
            found_problem = problem(path, source.checksum)
            if found_problem is not None:
                found.append((path, found_problem))
        if "layout" in report and not found:
            wrong = self._layout_problem(number, report, sources)
            if wrong is not None:
                found.append((self.report_path(number), wrong))
        return found

    def _layout_problem(self, number: int, report: dict, sources: list[Source]) -> str | None:
        """What is wrong with an overlay's layout against its sound files (None: it describes them)."""
        try:
            runs = np.asarray(report["layout"], dtype=np.int64).reshape(-1, 3)
            rows = pq.read_metadata(self.rows_path(number)).num_rows
            own = np.load(self.vectors_path(number), mmap_mode="r").shape[0]
        except (OSError, ValueError, TypeError, KeyError):
            return "its layout is unreadable"
        limits = np.array([s.rows for s in sources] + [own], dtype=np.int64)
        src = runs[:, 0]
        if (runs[:, 2] < 1).any() or (runs[:, 1] < 0).any() or (src < -1).any() or (src >= len(sources)).any():
            return "its layout names rows that no file holds"
        if int(runs[:, 2].sum()) != rows or int(runs[src < 0, 2].sum()) != own:
            return f"its layout covers {int(runs[:, 2].sum())} rows, its rows file holds {rows}"
        if (runs[:, 1] + runs[:, 2] > limits[np.where(src < 0, len(sources), src)]).any():
            return "its layout names rows past the end of a source"
        return None

    def damaged(self) -> dict[int, list[tuple[Path, str]]]:
        """Chunk number -> its damaged files, over the complete chunks (every file is read once)."""
        seen: dict = {}
        return {k: found for k in sorted(self.complete()) if (found := self.verify(k, seen))}

    def discard(self, number: int) -> None:
        """Remove a chunk's files (the completion mark first), so that it is embedded again."""
        for suffix in (_VECTORS, _REPORT, _ROWS):
            self.storage.delete(self._key(number, suffix))  # a folder standing where the file should be too

    def read_vectors(self, number: int, mmap: bool = True, rows: np.ndarray | None = None) -> np.ndarray:
        """The (rows, dim) float16 vectors of a complete chunk (memory-mapped by default; an overlay's are gathered
        from its sources into memory). `rows`: only those positions, in that order (an overlay then reads only the
        pages of its sources that hold them)."""
        own = np.load(self.vectors_path(number), mmap_mode="r" if mmap else None, allow_pickle=False)
        report = self.read_report(number)
        if "layout" not in report:
            return own if rows is None else np.asarray(own[rows])
        layout = self.layout(number, report)
        source, position = layout.source, layout.position
        if rows is not None:
            source, position = source[rows], position[rows]
        out = np.empty((len(source), own.shape[1]), dtype=np.float16)
        for i in np.unique(source):
            sel = source == i
            stored = own if i == len(layout.sources) - 1 else np.load(self.source_path(layout.sources[i]),
                                                                       mmap_mode="r")
            out[sel] = stored[position[sel]]
        return out

    def read_rows(self, number: int, columns: list[str] | None = None) -> pa.Table:
        """The rows file of a chunk: `row`, `id`, `text`, `hash` (or only `columns`)."""
        return pq.read_table(self.rows_path(number), columns=columns)

    def read_report(self, number: int) -> dict:
        return json.loads(self.storage.read_bytes(self._key(number, _REPORT)))


def replace_rows(source: Source, rows: int) -> Source:
    return Source(source.key, source.checksum, rows)
