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

import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedctl.pipeline import checksum
from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.fsutil import atomic_write, read_json, write_json, write_npy

_DONE = re.compile(r"^chunk-(\d{6,})\.npy$")


class DamagedChunks(StorageError):
    """Complete chunks whose files do not match their checksums: they must be embedded again before a build."""

    def __init__(self, damage: dict[int, list[tuple[Path, str]]], repair: str):
        self.chunks = sorted(damage)
        path, problem = damage[self.chunks[0]][0]
        super().__init__(f"{len(self.chunks)} stored chunks are damaged (first: {path}: {problem}); they are "
                         f"embedded again by the next run of the job, or by {repair}")


class ChunkStore:
    """Reads and writes the outputs of the chunks of one plan."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, number: int, suffix: str) -> Path:
        return self.root / f"chunk-{number:06d}{suffix}"

    def vectors_path(self, number: int) -> Path:
        return self._path(number, ".npy")

    def rows_path(self, number: int) -> Path:
        return self._path(number, ".rows.parquet")

    def report_path(self, number: int) -> Path:
        return self._path(number, ".json")

    def is_complete(self, number: int) -> bool:
        return self._path(number, ".npy").exists()

    def complete(self) -> set[int]:
        """Numbers of the complete chunks."""
        if not self.root.is_dir():
            return set()
        return {int(m.group(1)) for p in self.root.iterdir() if (m := _DONE.match(p.name))}

    def write(self, number: int, rows: np.ndarray, ids: list, texts: list, vectors: np.ndarray, report: dict,
              id_type: pa.DataType | None = None, hashes: np.ndarray | None = None) -> dict:
        """Write one chunk's outputs (rows file, report with both files' checksums, then vectors: the completion
        mark); returns the report as written."""
        if len(rows) != len(vectors) or len(ids) != len(rows) or len(texts) != len(rows):
            raise ValueError(f"chunk {number}: {len(rows)} rows, {len(ids)} ids, {len(texts)} texts, "
                             f"{len(vectors)} vectors")
        columns = {"row": pa.array(rows, pa.int64()), "id": pa.array(ids, type=id_type),
                   "text": pa.array(texts, pa.string())}
        if hashes is not None:
            columns["hash"] = pa.array(np.asarray(hashes, dtype=np.uint64), pa.uint64())
        table = pa.table(columns)
        rows_file = atomic_write(self.rows_path(number), lambda tmp: pq.write_table(table, tmp))
        files = {"rows": checksum.checksum(rows_file)}
        report = {**report, "files": files}
        half = np.ascontiguousarray(vectors, dtype=np.float16)

        def record(tmp: Path) -> None:  # the report lands before the completion mark
            files["vectors"] = checksum.checksum(tmp)
            write_json(self.report_path(number), report)

        write_npy(self.vectors_path(number), half, before_replace=record)
        return report

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
        for path in (self.vectors_path(number), self.report_path(number), self.rows_path(number)):
            if path.is_dir() and not path.is_symlink():  # something else stands where the file should be
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def read_vectors(self, number: int, mmap: bool = True) -> np.ndarray:
        """The (rows, dim) float16 vectors of a complete chunk (memory-mapped by default)."""
        return np.load(self._path(number, ".npy"), mmap_mode="r" if mmap else None, allow_pickle=False)

    def read_rows(self, number: int, columns: list[str] | None = None) -> pa.Table:
        """The rows file of a chunk: `row`, `id`, `text`, `hash` (or only `columns`)."""
        return pq.read_table(self._path(number, ".rows.parquet"), columns=columns)

    def read_report(self, number: int) -> dict:
        return read_json(self._path(number, ".json"))
