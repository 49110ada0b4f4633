"""Segments: the immutable pieces an index version is made of (the one owner of `OUT/segments/`).

    OUT/segments/<segment id>/rows.parquet        row, id, text, hash of the segment's rows (position i = row i)
    OUT/segments/<segment id>/index-<dim>.faiss   one HNSW index per dim, opened by plain `faiss.read_index`
    OUT/segments/<segment id>/vectors.npy         the rows' full-dim float16 vectors (row i = position i), a plain
                                                  `.npy` that `np.load(..., mmap_mode="r")` maps: the funnel's
                                                  re-rank reads only the rows it shortlisted

A segment is written once, by the build that creates it, and never changed: a version lists the segments it
uses with its own deletion set for each (`pipeline.manifest`), so versions share unchanged segments by reference
and a changed corpus adds a segment and deletions instead of rebuilding. `collect_garbage` removes a segment when
no kept version and no build in progress refers to it. Every file's size and checksum are recorded in the
manifest of each version that uses the segment.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from embedctl.pipeline.checksum import checksum
from embedctl.pipeline.fsutil import npy_writer
from embedctl.pipeline.storage import (
    Folder,
    LocalStorage,
    Storage,
    declare_immutable,
    grandparent,
    join,
    storage_of,
)

if TYPE_CHECKING:
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

LOG = logging.getLogger(__name__)

SEGMENTS = "segments"
declare_immutable(f"{SEGMENTS}/")  # a segment's files are written once under its unique id
ROWS_FILE = "rows.parquet"
ROWS_GROUP = 16384
"""Row group size of a segment's rows.parquet: a query reads only the groups of its hits."""
VECTORS_FILE = "vectors.npy"
LAYOUT = 2
"""The files every segment holds: 2 = rows, indexes and the full vectors (`VECTORS_FILE`); segments of layout 1 (no
vectors file) are neither reused by a build nor taken as up to date, so the next `embedctl index` rewrites them."""


def index_file(dim: int) -> str:
    return f"index-{dim}.faiss"


def new_segment_id() -> str:
    """A fresh segment id: sortable by creation time, unique across hosts."""
    return f"s{time.time_ns() // 1_000_000:013d}-{secrets.token_hex(3)}"


def segment_prefix(segment_id: str, path: str | None = None) -> str:
    """The storage key of a segment's folder: `path` when a version recorded one (format 1), else
    segments/<id>."""
    return path or join(SEGMENTS, segment_id)


def segment_dir(out: Path | str, segment_id: str) -> Path | Folder:
    """A segment's folder: a local path, or the folder itself on an object store."""
    storage = storage_of(out)
    folder = Folder(storage, segment_prefix(segment_id))
    return folder.path if isinstance(storage, LocalStorage) else folder


def _folder(folder: Path | Folder) -> Folder:
    """A segment folder given by its path (OUT/segments/<id>: the layout this module owns)."""
    if isinstance(folder, Folder):
        return folder
    folder = Path(folder)
    return Folder(LocalStorage(grandparent(folder)), segment_prefix(folder.name))


def write_rows(folder: Path | Folder, table: pa.Table) -> dict:
    """Write a segment's rows.parquet (atomically, in small row groups for lookups); returns its checksum."""
    import pyarrow.parquet as pq

    segment = _folder(folder)
    key = segment.child(ROWS_FILE)
    segment.storage.write(key, lambda tmp: pq.write_table(table, tmp, row_group_size=ROWS_GROUP,
                                                          write_page_checksum=True))
    # page checksums (CRC-32 of each page): a reader of a few row groups of a remote copy checks what it reads
    return {**checksum(segment.storage.local_path(key)), "pages": "crc32"}


def write_vectors(folder: Path | Folder, vectors: np.ndarray) -> dict:
    """Write a segment's full-dim vectors (float16, row i = position i) atomically; returns its checksum."""
    segment = _folder(folder)
    key = segment.child(VECTORS_FILE)
    segment.storage.write(key, npy_writer(np.ascontiguousarray(vectors, dtype=np.float16)))
    return checksum(segment.storage.local_path(key))


def open_vectors(path: Path) -> np.ndarray:
    """A segment's full vectors, memory-mapped read-only (`path`: its local copy): rows are read when touched."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def rows_path(storage: Storage, prefix: str) -> Path:
    """A local copy of a segment's rows.parquet (for pyarrow)."""
    return storage.local_path(join(prefix, ROWS_FILE))


def read_rows(storage: Storage, prefix: str, columns: list[str] | None = None) -> pa.Table:
    """A segment's rows: `row`, `id`, `text`, `hash` (or only `columns`)."""
    import pyarrow.parquet as pq

    return pq.read_table(rows_path(storage, prefix), columns=columns)


def read_ids(storage: Storage, prefix: str) -> pa.Array:
    """The ids of a segment's rows, by position."""
    return read_rows(storage, prefix, ["id"]).column("id").combine_chunks()


def open_rows(path: Path) -> pq.ParquetFile:
    """A segment's rows.parquet opened for lookups by row group (`path`: its local copy)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path)


def open_remote_rows(storage: Storage, prefix: str, expected: dict) -> pq.ParquetFile:
    """A segment's rows.parquet on an object store, read by ranged GETs of the row groups a lookup needs (a one-shot
    query downloads the rows it returns, not the file), each page checked against its CRC-32 (`write_rows`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embedctl.pipeline.s3files import ObjectFile

    handle = ObjectFile(storage.describe(join(prefix, ROWS_FILE)), int(expected["bytes"]))
    return pq.ParquetFile(pa.PythonFile(handle, mode="r"), page_checksum_verification=True)


def open_index(path: Path) -> faiss.Index:
    """A segment's index file, memory-mapped (IO_FLAG_MMAP_IFC maps the HNSW graph instead of reading it; an index
    type that cannot be mapped is read)."""
    import faiss

    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError:
        return faiss.read_index(str(path))


def build_index_file(folder: Path | Folder, dim: int, vectors: np.ndarray, hnsw_m: int, ef_construction: int,
                     ef_search: int, index_type: str, on_progress: Callable[[int], None] | None = None) -> dict:
    """Build the `dim` index of a segment from its full-dim vectors (sliced, re-normalised) and write it
    atomically; returns its checksum. Idempotent: an existing file is kept (its build completed)."""
    from embedctl.pipeline.index import build_hnsw, slice_normalise, write_index

    segment = _folder(folder)
    key = segment.child(index_file(dim))
    if segment.storage.exists(key):
        return checksum(segment.storage.local_path(key))
    index = build_hnsw(slice_normalise(vectors, dim), hnsw_m, ef_construction, ef_search, on_progress, index_type)
    return write_index(index, segment.storage, key)


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


def is_built(folder: Path | Folder, dims: Iterable[int]) -> bool:
    """Whether a segment's rows file, its vectors file and the index of every dim are written."""
    segment = _folder(folder)
    return all(segment.storage.exists(segment.child(name))
               for name in [ROWS_FILE, VECTORS_FILE, *map(index_file, dims)])


def collect_garbage(out: Path | str | Storage, referenced: set[str]) -> list[str]:
    """Remove the segments that no kept version and no build plan refers to (`referenced`); returns their ids.

    A build writes its plan (naming its new segments) before any of their files, so a segment being built, by
    this run or a run of the other mode, is always referenced."""
    storage = storage_of(out)
    removed = []
    for entry in storage.list(SEGMENTS):
        if entry.folder and entry.name not in referenced:
            storage.delete(entry.key)
            removed.append(entry.name)
    if removed:
        LOG.info("removed %d segments no version uses", len(removed))
    return removed


def deletions_bitmap(deleted: np.ndarray, rows: int) -> np.ndarray:
    """The FAISS ID-selector bitmap of a segment: bit i set when position i is live (little-endian bits)."""
    live = np.ones(rows, dtype=bool)
    live[deleted] = False
    return np.packbits(live, bitorder="little")
