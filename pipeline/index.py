"""FAISS HNSW indexes for the full dim and Matryoshka slices, and search across a version's segments.

Every sliced index is derived from the full-dim vectors (first d dims, re-normalised), never by running the
model again. Within a segment, index position i is row i of the segment's `rows.parquet` (`row`, `id`, `text`),
so a search maps to corpus ids and texts; each `index-<dim>.faiss` opens with plain `faiss.read_index`. A search
of a version searches every segment of the dim, skips the rows the version deleted inside FAISS (an ID selector in
the search parameters, so each segment still returns its k best live rows) and merges the top k. Exact search (the
baseline of `embedctl eval`) runs in FAISS on the CPU with the same selector, or on the GPU over the live rows in
tiles (`pipeline.exact`).

A funnel search (`IndexReader.funnel_positions`) shortlists N live rows per segment in a small dim's HNSW, then
re-ranks them exactly at the full dim with the segment's full vectors (`vectors.npy`, memory-mapped: only the
shortlisted rows are read), scored as the full-dim index scores them (the float16 vectors re-normalised in
float32), so a shortlist that covers the segment gives exactly the full-dim exact search.
"""

from __future__ import annotations

import errno
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from embedctl.pipeline import exact as exact_search
from embedctl.pipeline.checksum import DamagedFile, checksum
from embedctl.pipeline.checksum import verify as verify_checksum
from embedctl.pipeline.defaults import DEFAULT_SHORTLIST, INDEX_TYPES
from embedctl.pipeline.errors import ConfigError
from embedctl.pipeline.manifest import SegmentRef, VersionInfo, read_deletions, read_info
from embedctl.pipeline.segments import (
    ROWS_FILE,
    ROWS_GROUP,
    VECTORS_FILE,
    deletions_bitmap,
    index_file,
    open_index,
    open_remote_rows,
    open_rows,
    open_vectors,
)
from embedctl.pipeline.storage import Folder, LocalStorage, Storage, join
from embedctl.pipeline.versions import resolve_index_dir, version_folder

LOG = logging.getLogger(__name__)

ADD_BATCH = 8192
"""Vectors added to an HNSW index per call (the progress step)."""
RERANK_QUERIES = 64
"""Queries re-ranked together: their shortlists' rows are gathered from the vectors file once, at most
RERANK_QUERIES x shortlist rows of 4 x full dim bytes in float32 (64 x 200 x 2560 x 4 bytes at the reference
model's dim and the default shortlist)."""


def slice_normalise(vectors: np.ndarray, dim: int) -> np.ndarray:
    """First `dim` dims of each vector, L2-normalised again (float32): a Matryoshka slice."""
    out = as_float32(vectors[:, :dim])
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))[:, None]
    np.maximum(norms, 1e-12, out=norms)
    out /= norms
    return out


def as_float32(vectors: np.ndarray) -> np.ndarray:
    """A new float32 array of `vectors` (2-d). float16 is widened by FAISS's vectorised decoder, 2.5x numpy's
    `astype` (which dominated a funnel's re-rank), to the same values."""
    if vectors.dtype != np.float16 or not vectors.size:
        return np.array(vectors, dtype=np.float32)
    n, d = vectors.shape
    codes = np.ascontiguousarray(vectors).view(np.uint8).reshape(n, 2 * d)
    return faiss.ScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16).decode(codes)


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


def write_index(index: faiss.Index, storage: Storage, key: str) -> dict:
    """Write a FAISS index under `key`, atomically; returns its checksum."""
    storage.write(key, lambda tmp: _faiss_write(index, tmp))
    return checksum(storage.local_path(key))


@dataclass
class Hit:
    """One search result."""

    id: object
    score: float
    text: str
    row: int

    def to_dict(self) -> dict:
        return {"id": self.id, "score": self.score, "text": self.text, "row": self.row}


def rerank(vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) of the k best of each query's `candidates` (positions into `vectors`; -1: none) by their
    exact full-dim inner product with `queries` (full-dim, normalised), best first; -inf / -1 pad.

    `vectors`: a segment's float16 full vectors, usually memory-mapped: only the candidates' rows are read (sorted,
    so each page once per batch of queries), re-normalised in float32 as the full-dim index stores them."""
    full = vectors.shape[1]
    n = len(queries)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    positions = np.full((n, k), -1, dtype=np.int64)
    for start in range(0, n, RERANK_QUERIES):
        cand = candidates[start:start + RERANK_QUERIES]
        rows = np.unique(cand[cand >= 0])
        if not len(rows):
            continue
        block = slice_normalise(vectors[rows], full)
        all_scores = np.asarray(queries[start:start + RERANK_QUERIES], np.float32) @ block.T
        where = np.searchsorted(rows, np.maximum(cand, 0))
        cand_scores = np.where(cand >= 0, np.take_along_axis(all_scores, where, 1), -np.inf)
        kk = min(k, cand.shape[1])
        best = np.argsort(-cand_scores, axis=1, kind="stable")[:, :kk]
        top = np.take_along_axis(cand_scores, best, 1)
        scores[start:start + len(cand), :kk] = top
        positions[start:start + len(cand), :kk] = np.where(np.isfinite(top), np.take_along_axis(cand, best, 1), -1)
    return scores, positions


class SegmentReader:
    """One segment of a version: its rows, its deletion set as a FAISS ID selector, its indexes (memory-mapped).

    Files are checked against their recorded checksums before first use (unless `verify` is False)."""

    def __init__(self, version_dir: Path | Folder, info: VersionInfo, ref: SegmentRef, verify: bool = True,
                 fetch_rows: bool = True):
        self.ref = ref
        version = version_folder(version_dir)
        self.storage = version.storage
        self.folder = self.storage.local_path(ref.prefix)
        self.verify = verify
        self._remedy = (f"nothing was read from it; repair the index with `embedctl verify {self.storage.root} "
                        "--repair`")
        self.deleted = read_deletions(version_dir, info, ref, check=verify)
        self._bitmap = deletions_bitmap(self.deleted, ref.rows) if len(self.deleted) else None
        expected = ref.files.get(ROWS_FILE) or {}
        if not fetch_rows and not isinstance(self.storage, LocalStorage) and expected.get("pages") == "crc32":
            self._rows = open_remote_rows(self.storage, ref.prefix, expected)  # pages checked as they are read
        else:
            self._rows = open_rows(self._checked(ROWS_FILE))
        self._rows_lock = threading.Lock()  # one reader of the rows file at a time (a server searches in threads)
        self._indexes: dict[int, faiss.Index] = {}
        self._vectors: np.ndarray | None = None

    def _checked(self, name: str) -> Path:
        key = join(self.ref.prefix, name)
        path = self.storage.local_path(key)  # faiss and pyarrow open (and map) files
        if self.verify:
            try:
                verify_checksum(path, self.ref.files.get(name), self._remedy, self.storage.describe(key))
            except DamagedFile:
                if isinstance(self.storage, LocalStorage):
                    raise
                self.storage.drop_copy(key)  # a damaged cached copy: fetched again, the store's copy decides
                path = self.storage.local_path(key)
                verify_checksum(path, self.ref.files.get(name), self._remedy, self.storage.describe(key))
        return path

    def index(self, dim: int) -> faiss.Index:
        """The index of `dim`, memory-mapped (IO_FLAG_MMAP_IFC maps the HNSW graph instead of reading it)."""
        if dim not in self._indexes:
            self._indexes[dim] = open_index(self._checked(index_file(dim)))
        return self._indexes[dim]

    @property
    def has_vectors(self) -> bool:
        """Whether the segment has its full vectors file (segments built before embedctl wrote them have none)."""
        return VECTORS_FILE in self.ref.files

    def vectors(self) -> np.ndarray:
        """The segment's full-dim float16 vectors, memory-mapped (checked against their checksum on first use)."""
        if self._vectors is None:
            self._vectors = open_vectors(self._checked(VECTORS_FILE))
            if self._vectors.ndim != 2 or len(self._vectors) != self.ref.rows:
                raise DamagedFile(self.storage.local_path(join(self.ref.prefix, VECTORS_FILE)),
                                  f"{self._vectors.shape} vectors for {self.ref.rows} rows", self._remedy,
                                  self.storage.describe(join(self.ref.prefix, VECTORS_FILE)))
        return self._vectors

    def rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`rerank` of this segment's candidates with its full vectors (memory-mapped, checked on first use)."""
        return rerank(self.vectors(), queries, candidates, k)

    def exact_full(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) of the k best live rows by exact full-dim search of the vectors file (in tiles):
        the baseline of a funnel where no full-dim index exists (`--keep-full`)."""
        vectors = self.vectors()
        full = vectors.shape[1]
        n = len(vectors)
        rows = exact_search.default_tile_rows(full)
        live = np.ones(n, dtype=bool)
        live[self.deleted] = False

        def tiles():
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                keep = np.flatnonzero(live[start:stop])
                yield slice_normalise(vectors[start:stop][keep], full), keep + start

        return exact_search.knn_tiles(tiles(), slice_normalise(queries, full), min(k, max(n, 1)),
                                      exact_search.cpu_search)

    def params(self, ef: int | None = None, exact: bool = False) -> faiss.SearchParameters | None:
        """Search parameters that skip the deleted rows (and set efSearch for HNSW)."""
        params = faiss.SearchParameters() if exact else faiss.SearchParametersHNSW()
        if not exact and ef is not None:
            params.efSearch = int(ef)
        if self._bitmap is not None:
            params.sel = faiss.IDSelectorBitmap(self.ref.rows, faiss.swig_ptr(self._bitmap))
        return params

    def search(self, queries: np.ndarray, k: int, dim: int, ef: int, exact: bool = False,
               exact_device: str = "cpu"):
        """(scores, positions) of the k best live rows of this segment for each query (positions -1: none).

        Deleted rows are skipped inside FAISS. HNSW then walks through deleted rows too, so efSearch grows with the
        deleted share (ef x rows / live rows), and a query that still comes back short of min(k, live rows) is
        answered by exact search over the segment's stored vectors. `exact` searches those vectors by brute force
        on `exact_device`: `cpu` in FAISS with the deletion selector, `gpu` in tiles of live rows (`_tiled`)."""
        index = self.index(dim)
        kk = min(k, max(self.ref.rows, 1))
        storage = faiss.downcast_index(faiss.downcast_index(index).storage)
        if exact:
            if exact_device == "cpu":
                return storage.search(queries, kk, params=self.params(exact=True))
            return self._tiled(storage, queries, kk, exact_device)
        live = self.ref.rows - len(self.deleted)
        scaled = min(self.ref.rows, math.ceil(ef * self.ref.rows / max(live, 1)))
        scores, positions = index.search(queries, kk, params=self.params(scaled))
        short = (positions >= 0).sum(axis=1) < min(kk, live)
        if short.any():
            scores[short], positions[short] = storage.search(queries[short], kk, params=self.params(exact=True))
        return scores, positions

    def _tiled(self, storage: faiss.Index, queries: np.ndarray, k: int, device: str) -> tuple[np.ndarray, np.ndarray]:
        """Exact search of the stored vectors on `device` by `exact_search.knn_tiles`: each tile is a range of
        positions, decoded to float32 (read in place for a flat storage), less its deleted rows; ids are segment
        positions."""
        search = exact_search.backend(device)
        n, d = storage.ntotal, storage.d
        rows = exact_search.default_tile_rows(d)
        live = np.ones(n, dtype=bool)
        live[self.deleted] = False
        flat = None
        if isinstance(storage, faiss.IndexFlat) and n:  # float32 already: a view, no copy
            flat = faiss.rev_swig_ptr(storage.get_xb(), n * d).reshape(n, d)

        def tiles():
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                block = flat[start:stop] if flat is not None else storage.reconstruct_n(start, stop - start)
                keep = np.flatnonzero(live[start:stop])
                if len(keep) == stop - start:
                    yield block, np.arange(start, stop, dtype=np.int64)
                else:
                    yield block[keep], keep + start

        return exact_search.knn_tiles(tiles(), queries, k, search, exact_search.k_limit(device))

    def lookup(self, positions: Sequence[int]) -> dict[int, tuple[object, str, int]]:
        """position -> (id, text, corpus row), reading only the row groups that hold them."""
        wanted = sorted({int(p) for p in positions if p >= 0})
        found: dict[int, tuple[object, str, int]] = {}
        for g in sorted({p // ROWS_GROUP for p in wanted}):
            with self._rows_lock:
                try:
                    table = self._rows.read_row_group(g, columns=["row", "id", "text"])
                except OSError as exc:  # a page that fails its CRC (a remote copy read by ranges)
                    raise DamagedFile(self.storage.describe(join(self.ref.prefix, ROWS_FILE)), str(exc),
                                      self._remedy) from None
            base = g * ROWS_GROUP
            rows, ids, texts = (table.column(c).to_pylist() for c in ("row", "id", "text"))
            for p in wanted:
                if base <= p < base + table.num_rows:
                    found[p] = (ids[p - base], texts[p - base], rows[p - base])
        return found

    def ids(self) -> list:
        """The ids of the segment's rows, by position (deleted ones included)."""
        with self._rows_lock:
            return self._rows.read(columns=["id"]).column("id").to_pylist()


class IndexReader:
    """A published index version: its info and its segments (each with rows, deletions and per-dim indexes).

    Every file is checked against the checksum info.json recorded for it before it is first used (the rows and
    deletion files when the reader opens, an index file when its dim is first searched): a damaged file is never
    searched. With `verify=False` the checks are skipped (`--no-verify`: `python -m bench.verify` measures what
    they cost).
    """

    def __init__(self, path: Path | str, verify: bool = True, fetch_rows: bool = True):
        """`fetch_rows` False: on an object store, read the rows files by ranges (what a one-shot query does, which
        looks up a few rows; a server or an evaluation fetches them whole into the cache)."""
        self.dir = resolve_index_dir(path)
        self.info = read_info(self.dir)
        self.verify = verify
        self.segments = [SegmentReader(self.dir, self.info, ref, verify, fetch_rows) for ref in self.info.segments]

    @property
    def dims(self) -> list[int]:
        return list(self.info.dims)

    def _dim(self, dim: int | None) -> int:
        dim = dim or self.dims[0]
        if dim not in self.dims:
            raise ConfigError(f"--dim {dim} is not indexed here; choose one of {', '.join(map(str, self.dims))}")
        return dim

    def load(self, dim: int | None = None) -> None:
        """Open the indexes of `dim` (every dim when None) in every segment (checking them)."""
        for d in [self._dim(dim)] if dim else self.dims:
            for segment in self.segments:
                segment.index(d)

    def search_positions(self, queries: np.ndarray, k: int, dim: int | None = None, ef: int | None = None,
                         exact: bool = False,
                         exact_device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, segment numbers, positions) of the k best live rows over all segments, best first.

        `queries`: full-dim normalised vectors, sliced and re-normalised to `dim`. efSearch is at least k (HNSW
        returns at most efSearch hits); `exact` searches the stored vectors by brute force instead, on
        `exact_device` (`cpu` or `gpu`: see `pipeline.exact.resolve_exact_device`)."""
        if k <= 0:
            raise ConfigError(f"-k must be > 0, got {k!r}")
        if ef is not None and ef <= 0:
            raise ConfigError(f"--ef must be > 0, got {ef!r}")
        dim = self._dim(dim)
        ef = max(ef or self.info.hnsw["ef_search"], k)
        q = slice_normalise(queries, dim)
        return _merge(_map(lambda seg: seg.search(q, k, dim, ef, exact, exact_device), self.segments), k)

    def check_funnel(self, funnel: int, k: int, shortlist: int, where: str | None = None) -> None:
        """Refuse (one line) a funnel this index cannot run: a dim without an index, one not below the full dim, a
        shortlist shorter than k, segments without their full vectors file (built before embedctl wrote them)."""
        where = where or str(self.dir)
        if funnel >= self.info.dim:
            raise ConfigError(f"--funnel {funnel} is not below the full dim {self.info.dim}: the funnel shortlists in "
                              f"a smaller dim and re-ranks at {self.info.dim}; give one of "
                              f"{', '.join(str(d) for d in self.dims if d < self.info.dim) or 'the smaller dims'}")
        if funnel not in self.dims:
            smaller = [str(d) for d in self.dims if d < self.info.dim]
            choose = f"choose one of {', '.join(smaller)}" if smaller else "none is indexed"
            raise ConfigError(f"--funnel {funnel} is not indexed in {where} ({choose}); index it with "
                              f"`embedctl index ... --dims {funnel}`")
        if shortlist < k:
            raise ConfigError(f"--shortlist {shortlist} is below -k {k}: the re-rank returns at most the shortlist; "
                              f"give --shortlist of at least {k}")
        old = [seg.ref.id for seg in self.segments if not seg.has_vectors]
        if old:
            raise ConfigError(f"{where}: {len(old)} of its {len(self.segments)} segments (first: {old[0]}) were built "
                              "before embedctl kept the full vectors per segment, which the funnel re-ranks with; "
                              "re-index it (the same `embedctl index` command: it rebuilds the segments from the "
                              "stored vectors), then search with --funnel")

    def funnel_positions(self, queries: np.ndarray, k: int, funnel: int, shortlist: int,
                         ef: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, segment numbers, positions) of the k best live rows over all segments by a funnel: `shortlist`
        live rows per segment from the HNSW of dim `funnel`, re-ranked by their exact full-dim inner product
        (scores are full-dim cosines). `queries`: full-dim normalised vectors."""
        if k <= 0:
            raise ConfigError(f"-k must be > 0, got {k!r}")
        if ef is not None and ef <= 0:
            raise ConfigError(f"--ef must be > 0, got {ef!r}")
        self.check_funnel(funnel, k, shortlist)
        ef = max(ef or self.info.hnsw["ef_search"], shortlist)  # HNSW returns at most efSearch hits
        small = slice_normalise(queries, funnel)
        full = slice_normalise(queries, self.info.dim)

        def one(seg: SegmentReader):
            _, candidates = seg.search(small, shortlist, funnel, ef)
            return seg.rerank(full, candidates, k)

        return _merge(_map(one, self.segments), k)

    def exact_full_positions(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, segment numbers, positions) of exact full-dim search over the segments' vectors files."""
        return _merge(_map(lambda seg: seg.exact_full(queries, k), self.segments), k)

    def search(self, queries: np.ndarray, k: int, dim: int | None = None, ef: int | None = None,
               funnel: int | None = None, shortlist: int | None = None) -> list[list[Hit]]:
        """The k best live rows for each query, with their ids and texts; `funnel`: by a funnel from that dim
        (`funnel_positions`, `shortlist` candidates per segment)."""
        t0 = time.perf_counter()
        if funnel is not None:
            scores, segments, positions = self.funnel_positions(queries, k, funnel,
                                                                shortlist or DEFAULT_SHORTLIST, ef)
        else:
            scores, segments, positions = self.search_positions(queries, k, dim, ef)
        LOG.debug("searched %d queries in %.1f ms", len(queries), 1000 * (time.perf_counter() - t0))
        looked = [seg.lookup(positions[segments == n]) for n, seg in enumerate(self.segments)]
        return [[Hit(id=i, score=float(s), text=t, row=r)
                 for s, n, p in zip(qs, qn, qp, strict=True) if p >= 0
                 for i, t, r in [looked[n][int(p)]]]
                for qs, qn, qp in zip(scores, segments, positions, strict=True)]


def _merge(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, segment numbers, positions) of the k best of each segment's (scores, positions), best first."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    positions = np.concatenate([p[1] for p in parts], axis=1)
    segment = np.concatenate([np.full(p[1].shape, n, np.int64) for n, p in enumerate(parts)], axis=1)
    scores = np.where(positions >= 0, scores, -np.inf)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    take = np.take_along_axis
    return take(scores, best, 1), take(segment, best, 1), take(positions, best, 1)


_POOL: list[ThreadPoolExecutor] = []


def _map(fn, items: list) -> list:
    """`fn` over the segments, in threads when there are several (FAISS releases the GIL while it searches); one
    pool per process, made on first use and kept (making threads per query costs more than a small search)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(_threads(), thread_name_prefix="embedctl-search"))
    return list(_POOL[0].map(fn, items))


def _threads() -> int:
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
