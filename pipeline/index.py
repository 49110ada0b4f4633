"""FAISS HNSW indexes for the full dim and Matryoshka slices, built from the chunk store, and searched.

Every sliced index is derived from the full-dim vectors (first d dims, re-normalised), never by running the
model again. Index positions are row numbers of `rows.parquet` (columns `row`, `id`, `text`) in the same
version folder, so a search maps to corpus ids and texts; each `index-<dim>.faiss` opens with plain
`faiss.read_index`.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedctl.pipeline.checksum import checksum
from embedctl.pipeline.checksum import verify as verify_checksum
from embedctl.pipeline.defaults import INDEX_TYPES
from embedctl.pipeline.errors import ConfigError
from embedctl.pipeline.fsutil import atomic_write
from embedctl.pipeline.manifest import read_info
from embedctl.pipeline.versions import resolve_index_dir

LOG = logging.getLogger(__name__)

ROWS_FILE = "rows.parquet"
ROWS_GROUP = 16384
"""Row group size of rows.parquet: a query reads only the groups of its hits."""
ADD_BATCH = 8192
"""Vectors added to an HNSW index per call (the progress step)."""


def index_file(dim: int) -> str:
    return f"index-{dim}.faiss"


def slice_normalise(vectors: np.ndarray, dim: int) -> np.ndarray:
    """First `dim` dims of each vector, L2-normalised again (float32): a Matryoshka slice."""
    out = np.array(vectors[:, :dim], dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    out /= norms
    return out


def new_hnsw(dim: int, m: int, index_type: str = "hnsw") -> faiss.Index:
    """An empty inner-product HNSW index of `index_type`."""
    if index_type == "hnsw":
        return faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    if index_type == "hnsw-sqfp16":
        return faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, m, faiss.METRIC_INNER_PRODUCT)
    if index_type == "hnsw-sq8":
        return faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, m, faiss.METRIC_INNER_PRODUCT)
    raise ConfigError(f"index type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")


def build_hnsw(vectors: np.ndarray, m: int, ef_construction: int, ef_search: int,
               on_progress: Callable[[int], None] | None = None, index_type: str = "hnsw") -> faiss.Index:
    """An inner-product HNSW index over `vectors` (float32, normalised), added in batches."""
    index = new_hnsw(vectors.shape[1], m, index_type)
    if not index.is_trained:  # scalar quantisers learn each dim's range
        index.train(vectors)
    index.hnsw.efConstruction = ef_construction
    index.hnsw.efSearch = ef_search
    for start in range(0, len(vectors), ADD_BATCH):
        batch = vectors[start:start + ADD_BATCH]
        index.add(batch)
        if on_progress is not None:
            on_progress(len(batch))
    return index


def _faiss_write(index: faiss.Index, path: Path) -> None:
    try:
        faiss.write_index(index, str(path))
    except RuntimeError as exc:  # faiss reports a failed write as text: give it back its OS error
        text = str(exc)
        code = errno.ENOSPC if "No space left" in text else errno.EIO
        raise OSError(code, text.rsplit(": ", 1)[-1].strip("()")) from None


def write_index(index: faiss.Index, path: Path) -> dict:
    """Write a FAISS index atomically; returns its checksum."""
    return checksum(atomic_write(path, lambda tmp: _faiss_write(index, tmp)))


def write_rows(table: pa.Table, path: Path) -> dict:
    """Write rows.parquet (row, id, text) atomically, in small row groups for lookups; returns its checksum."""
    return checksum(atomic_write(path, lambda tmp: pq.write_table(table, tmp, row_group_size=ROWS_GROUP)))


@dataclass
class Hit:
    """One search result."""

    id: object
    score: float
    text: str
    row: int

    def to_dict(self) -> dict:
        return {"id": self.id, "score": self.score, "text": self.text, "row": self.row}


class IndexReader:
    """A published index version: its info, its per-dim FAISS indexes (memory-mapped) and its rows.

    Every file is checked against the checksum info.json recorded for it before it is first used (the rows file
    when the reader opens, an index file when its dim is first searched): a damaged file is never searched. With
    `verify=False` the checks are skipped (`--no-verify`: `python -m bench.verify` measures what they cost).
    """

    def __init__(self, path: Path, verify: bool = True):
        self.dir = resolve_index_dir(path)
        self.info = read_info(self.dir)
        self.verify = verify
        self._indexes: dict[int, faiss.Index] = {}
        self._rows = pq.ParquetFile(self._checked(self.info.rows_file))

    def _checked(self, name: str) -> Path:
        path = self.dir / name
        if self.verify:
            out = self.dir.parent.parent
            verify_checksum(path, self.info.checksums.get(name),
                            f"nothing was read from it; repair the index with `embedctl verify {out} --repair`")
        return path

    @property
    def dims(self) -> list[int]:
        return list(self.info.dims)

    def index(self, dim: int) -> faiss.Index:
        """The index of `dim`, memory-mapped (IO_FLAG_MMAP_IFC maps the HNSW graph instead of reading it)."""
        if dim not in self.dims:
            raise ConfigError(f"--dim {dim} is not indexed here; choose one of {', '.join(map(str, self.dims))}")
        if dim not in self._indexes:
            path = str(self._checked(self.info.files[str(dim)]))
            try:
                self._indexes[dim] = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC)
            except RuntimeError:
                self._indexes[dim] = faiss.read_index(path)
        return self._indexes[dim]

    def lookup(self, positions: Sequence[int]) -> list[tuple[object, str, int]]:
        """(id, text, corpus row) of index positions, reading only the row groups that hold them."""
        wanted = sorted({int(p) for p in positions if p >= 0})
        groups = sorted({p // ROWS_GROUP for p in wanted})
        found: dict[int, tuple[object, str, int]] = {}
        for g in groups:
            table = self._rows.read_row_group(g, columns=["row", "id", "text"])
            base = g * ROWS_GROUP
            rows, ids, texts = (table.column(c).to_pylist() for c in ("row", "id", "text"))
            for p in wanted:
                if base <= p < base + table.num_rows:
                    found[p] = (ids[p - base], texts[p - base], rows[p - base])
        return [found[int(p)] for p in positions if p >= 0]

    def search(self, queries: np.ndarray, k: int, dim: int | None = None, ef: int | None = None) -> list[list[Hit]]:
        """Search full-dim normalised query vectors at `dim` (sliced and re-normalised) with efSearch `ef`.

        efSearch is raised to `k` when it is below (HNSW returns at most efSearch hits)."""
        if k <= 0:
            raise ConfigError(f"-k must be > 0, got {k!r}")
        if ef is not None and ef <= 0:
            raise ConfigError(f"--ef must be > 0, got {ef!r}")
        dim = dim or self.dims[0]
        index = self.index(dim)
        hnsw = faiss.downcast_index(index).hnsw
        hnsw.efSearch = max(ef or self.info.hnsw["ef_search"], k)
        t0 = time.perf_counter()
        scores, positions = index.search(slice_normalise(queries, dim), k)
        LOG.debug("searched %d queries at dim %d in %.1f ms", len(queries), dim, 1000 * (time.perf_counter() - t0))
        results = []
        for qs, qp in zip(scores, positions, strict=True):
            looked = self.lookup(qp)
            results.append([Hit(id=i, score=float(s), text=t, row=r)
                            for (i, t, r), s in zip(looked, qs[qp >= 0], strict=True)])
        return results
