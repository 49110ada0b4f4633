"""The chunk store: full-dim vectors of each chunk, beside its ids and texts, keyed by chunk number.

Per chunk k, in the store folder:
- `chunk-{k:06d}.rows.parquet`: columns `row` (corpus row number), `id`, `text`, `hash` (64-bit text hash, the
  embedding cache key) of the embedded rows;
- `chunk-{k:06d}.json`: the chunk report (rows read, skipped rows with their reason, truncated rows, seconds);
- `chunk-{k:06d}.npy`: float16 (rows, dim) vectors, L2-normalised at full dim, in the order of the rows file.
Each file is written atomically, the `.npy` last: its existence means the chunk is complete. The files are
plain numpy and pyarrow formats.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedctl.pipeline.fsutil import atomic_write, read_json, write_json

_DONE = re.compile(r"^chunk-(\d{6,})\.npy$")


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
              id_type: pa.DataType | None = None, hashes: np.ndarray | None = None) -> None:
        """Write one chunk's outputs (rows file, report, then vectors: the completion mark)."""
        if len(rows) != len(vectors) or len(ids) != len(rows) or len(texts) != len(rows):
            raise ValueError(f"chunk {number}: {len(rows)} rows, {len(ids)} ids, {len(texts)} texts, "
                             f"{len(vectors)} vectors")
        columns = {"row": pa.array(rows, pa.int64()), "id": pa.array(ids, type=id_type),
                   "text": pa.array(texts, pa.string())}
        if hashes is not None:
            columns["hash"] = pa.array(np.asarray(hashes, dtype=np.uint64), pa.uint64())
        table = pa.table(columns)
        atomic_write(self._path(number, ".rows.parquet"), lambda tmp: pq.write_table(table, tmp))
        write_json(self._path(number, ".json"), report)
        half = np.ascontiguousarray(vectors, dtype=np.float16)
        atomic_write(self._path(number, ".npy"), lambda tmp: _save_npy(tmp, half))

    def read_vectors(self, number: int, mmap: bool = True) -> np.ndarray:
        """The (rows, dim) float16 vectors of a complete chunk (memory-mapped by default)."""
        return np.load(self._path(number, ".npy"), mmap_mode="r" if mmap else None, allow_pickle=False)

    def read_rows(self, number: int, columns: list[str] | None = None) -> pa.Table:
        """The rows file of a chunk: `row`, `id`, `text`, `hash` (or only `columns`)."""
        return pq.read_table(self._path(number, ".rows.parquet"), columns=columns)

    def read_report(self, number: int) -> dict:
        return read_json(self._path(number, ".json"))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.save would append ".npy" to a temporary name
        np.save(fh, array, allow_pickle=False)
