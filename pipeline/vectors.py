"""The chunk store: full-dim vectors of each chunk, beside its ids and texts, keyed by chunk number.

Per chunk k, in the store folder:
- `chunk-{k:06d}.rows.parquet`: columns `row` (corpus row number), `id`, `text`, `hash` (64-bit text hash, the
  embedding cache key) of the embedded rows;
- `chunk-{k:06d}.json`: the chunk report (rows read, skipped rows with their reason, truncated rows, seconds);
- `chunk-{k:06d}.npy`: float16 (rows, dim) vectors, L2-normalised at full dim, in the order of the rows file.
Each file is written atomically, the `.npy` last: its existence means the chunk is complete. The report records
the size and checksum of the other two (`files`), written just before the `.npy` appears, so a reader can tell a
complete chunk from a damaged one (`verify`). The files are plain numpy and pyarrow formats.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedctl.pipeline import checksum
from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.fsutil import json_writer, npy_writer
from embedctl.pipeline.storage import Folder, LocalStorage

_DONE = re.compile(r"^chunk-(\d{6,})\.npy$")


class DamagedChunks(StorageError):
    """Complete chunks whose files do not match their checksums: they must be embedded again before a build."""

    def __init__(self, damage: dict[int, list[tuple[Path, str]]], repair: str):
        self.chunks = sorted(damage)
        path, problem = damage[self.chunks[0]][0]
        super().__init__(f"{len(self.chunks)} stored chunks are damaged (first: {path}: {problem}); they are "
                         f"embedded again by the next run of the job, or by {repair}")


_VECTORS, _ROWS, _REPORT = ".npy", ".rows.parquet", ".json"


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
              copy_of: tuple[ChunkStore, int] | None = None) -> dict:
        """Write one chunk's outputs (rows file, report with both files' checksums, then vectors: the completion
        mark); returns the report as written. `copy_of`: a stored chunk whose vectors file holds exactly `vectors`
        (every text was cached from it, in order): its file is copied, which an object store does without the
        bytes leaving it (a re-index of a corpus whose rows were appended uploads no unchanged vectors)."""
        if len(rows) != len(vectors) or len(ids) != len(rows) or len(texts) != len(rows):
            raise ValueError(f"chunk {number}: {len(rows)} rows, {len(ids)} ids, {len(texts)} texts, "
                             f"{len(vectors)} vectors")
        columns = {"row": pa.array(rows, pa.int64()), "id": pa.array(ids, type=id_type),
                   "text": pa.array(texts, pa.string())}
        if hashes is not None:
            columns["hash"] = pa.array(np.asarray(hashes, dtype=np.uint64), pa.uint64())
        table = pa.table(columns)
        same = self._same_rows(copy_of, table)
        if same is not None:  # rows unchanged too (rows appended after them): copied like the vectors
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

        source = self._copy_source(copy_of, half)
        if source is not None:
            files["vectors"] = source[1]
            self.storage.write(self._key(number, _REPORT), json_writer(report))
            self.storage.copy(source[0], self._key(number, _VECTORS))
            return report
        self.storage.write(self._key(number, _VECTORS), npy_writer(half), before_commit=record)
        return report

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

    def _copy_source(self, copy_of: tuple[ChunkStore, int] | None, half: np.ndarray) -> tuple[str, dict] | None:
        """(key, recorded checksum) of the vectors file to copy for `half`, None when it must be written: only a
        file of the same storage whose report records its checksum and whose shape matches."""
        if copy_of is None:
            return None
        store, number = copy_of
        if store.storage != self.storage:
            return None
        try:
            recorded = store.read_report(number)["files"]["vectors"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        stored = store.read_vectors(number)  # (the cache lookup mapped it already)
        if stored.shape != half.shape or not np.array_equal(stored, half):
            return None
        return store._key(number, _VECTORS), recorded

    def verify(self, number: int) -> list[tuple[Path, str]]:
        """(file, what is wrong) for each damaged file of a complete chunk; empty when the chunk is sound."""
        try:
            report = self.read_report(number)
            files = report["files"]
        except (OSError, ValueError, TypeError, KeyError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable or incomplete"
            return [(self.report_path(number), reason)]
        found = []
        for kind, path in (("rows", self.rows_path(number)), ("vectors", self.vectors_path(number))):
            problem = checksum.problem(path, files.get(kind))
            if problem is not None:
                found.append((path, problem))
        return found

    def damaged(self) -> dict[int, list[tuple[Path, str]]]:
        """Chunk number -> its damaged files, over the complete chunks (every file is read once)."""
        return {k: found for k in sorted(self.complete()) if (found := self.verify(k))}

    def discard(self, number: int) -> None:
        """Remove a chunk's files (the completion mark first), so that it is embedded again."""
        for suffix in (_VECTORS, _REPORT, _ROWS):
            self.storage.delete(self._key(number, suffix))  # a folder standing where the file should be too

    def read_vectors(self, number: int, mmap: bool = True) -> np.ndarray:
        """The (rows, dim) float16 vectors of a complete chunk (memory-mapped by default)."""
        return np.load(self.vectors_path(number), mmap_mode="r" if mmap else None, allow_pickle=False)

    def read_rows(self, number: int, columns: list[str] | None = None) -> pa.Table:
        """The rows file of a chunk: `row`, `id`, `text`, `hash` (or only `columns`)."""
        return pq.read_table(self.rows_path(number), columns=columns)

    def read_report(self, number: int) -> dict:
        return json.loads(self.storage.read_bytes(self._key(number, _REPORT)))
