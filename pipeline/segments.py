"""Segments: the immutable pieces an index version is made of (the one owner of `OUT/segments/`).

    OUT/segments/<segment id>/rows.parquet        row, id, text, hash of the segment's rows (position i = row i)
    OUT/segments/<segment id>/index-<dim>.faiss   one HNSW index per dim, opened by plain `faiss.read_index`

A segment is written once, by the build that creates it, and never changed: a version lists the segments it
uses with its own deletion set for each (`pipeline.manifest`), so versions share unchanged segments by reference
and a changed corpus adds a segment and deletions instead of rebuilding. `collect_garbage` removes a segment when
no kept version and no build in progress refers to it. Every file's size and checksum are recorded in the
manifest of each version that uses the segment.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedctl.pipeline.checksum import checksum
from embedctl.pipeline.fsutil import atomic_write

LOG = logging.getLogger(__name__)

SEGMENTS = "segments"
ROWS_FILE = "rows.parquet"
ROWS_GROUP = 16384
"""Row group size of a segment's rows.parquet: a query reads only the groups of its hits."""


def index_file(dim: int) -> str:
    return f"index-{dim}.faiss"


def new_segment_id() -> str:
    """A fresh segment id: sortable by creation time, unique across hosts."""
    return f"s{time.time_ns() // 1_000_000:013d}-{secrets.token_hex(3)}"


def segment_dir(out: Path | str, segment_id: str) -> Path:
    return Path(out) / SEGMENTS / segment_id


def write_rows(folder: Path, table: pa.Table) -> dict:
    """Write a segment's rows.parquet (atomically, in small row groups for lookups); returns its checksum."""
    import pyarrow.parquet as pq

    return checksum(atomic_write(Path(folder) / ROWS_FILE,
                                 lambda tmp: pq.write_table(table, tmp, row_group_size=ROWS_GROUP)))


def build_index_file(folder: Path, dim: int, vectors: np.ndarray, hnsw_m: int, ef_construction: int,
                     ef_search: int, index_type: str, on_progress: Callable[[int], None] | None = None) -> dict:
    """Build the `dim` index of a segment from its full-dim vectors (sliced, re-normalised) and write it
    atomically; returns its checksum. Idempotent: an existing file is kept (its build completed)."""
    from embedctl.pipeline.index import build_hnsw, slice_normalise, write_index

    path = Path(folder) / index_file(dim)
    if path.exists():
        return checksum(path)
    index = build_hnsw(slice_normalise(vectors, dim), hnsw_m, ef_construction, ef_search, on_progress, index_type)
    return write_index(index, path)


ROW_OVERHEAD_BYTES = 300
"""Per row of a segment build besides the vectors: its id, text and hash as read to write rows.parquet (WordNet
glosses average about 80 characters; longer texts cost more)."""


def build_bytes_per_row(full_dim: int, dim: int, hnsw_m: int, index_type: str = "hnsw") -> int:
    """Memory one index build task needs per row of its segment, in bytes (`python -m bench.segments` measures it):
    the segment's full-dim float16 vectors twice (2 x full dim gathered, 2 x full dim of the memory-mapped chunk
    files they are read from, which count in the process's RSS while read), their float32 slice (4 x dim), the
    index's copy of it (4 x dim flat, 2 x dim sqfp16, 1 x dim sq8), the HNSW graph (2 x M neighbours of 4 bytes on
    level 0, about 1/M of that above), and the row itself (`ROW_OVERHEAD_BYTES`)."""
    storage = {"hnsw": 4 * dim, "hnsw-sqfp16": 2 * dim, "hnsw-sq8": dim}[index_type]
    return 4 * full_dim + 4 * dim + storage + int(8 * hnsw_m * (1 + 1 / hnsw_m)) + ROW_OVERHEAD_BYTES


def is_built(folder: Path, dims: Iterable[int]) -> bool:
    """Whether a segment's rows file and the index of every dim are written."""
    folder = Path(folder)
    return (folder / ROWS_FILE).is_file() and all((folder / index_file(d)).is_file() for d in dims)


def collect_garbage(out: Path | str, referenced: set[str]) -> list[str]:
    """Remove the segments that no kept version and no build plan refers to (`referenced`); returns their ids.

    A build writes its plan (naming its new segments) before any of their files, so a segment being built, by
    this run or a run of the other mode, is always referenced."""
    root = Path(out) / SEGMENTS
    removed = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.is_dir() and folder.name not in referenced:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    if removed:
        LOG.info("removed %d segments no version uses", len(removed))
    return removed


def deletions_bitmap(deleted: np.ndarray, rows: int) -> np.ndarray:
    """The FAISS ID-selector bitmap of a segment: bit i set when position i is live (little-endian bits)."""
    live = np.ones(rows, dtype=bool)
    live[deleted] = False
    return np.packbits(live, bitorder="little")
