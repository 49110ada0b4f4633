"""Retrieval evaluation of a published index: recall@k and MRR per dim, exact search vs HNSW.

Queries come from a Parquet file (a query text column and the id of its relevant row). Exact search is a
brute-force inner product over the vectors each index stores (its HNSW storage), so "exact" and "HNSW" differ
only by the graph search; both search every segment of the version, without its deleted rows. Exact search runs
on the CPU or, with faiss-gpu, on the GPU (`pipeline.exact`); HNSW always runs on the CPU. The benchmark and
`embedctl eval` use this same code.

A funnel (`funnel` dims) is measured beside: shortlist in that dim's HNSW, exact re-rank at the full dim, with its
agreement with exact full-dim search (by the full-dim index's stored vectors, or by the segments' vectors files
where no full-dim index was built: `--keep-full`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from embedctl.pipeline.defaults import DEFAULT_SHORTLIST
from embedctl.pipeline.errors import ConfigError, CorpusError
from embedctl.pipeline.exact import resolve_exact_device
from embedctl.pipeline.index import IndexReader


@dataclass
class QuerySet:
    texts: list[str]
    relevant: np.ndarray  # keys of the relevant rows (`row_keys`; -1: not in the index)


def load_queries(path: Path, query_column: str, relevant_column: str, reader: IndexReader,
                 limit: int | None = None) -> QuerySet:
    """Queries and the index positions of their relevant rows (queries whose row is not indexed are dropped)."""
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise CorpusError(f"cannot read queries {str(path)!r} as Parquet: {exc}") from None
    for column in (query_column, relevant_column):
        if column not in table.column_names:
            raise CorpusError(f"column {column!r} is not in {str(path)!r} (columns: {', '.join(table.column_names)}); "
                              "choose it with --query-column / --relevant-column")
    if limit:
        table = table.slice(0, limit)
    position = {}
    for base, segment in zip(_bases(reader), reader.segments, strict=True):
        live = np.ones(segment.ref.rows, dtype=bool)
        live[segment.deleted] = False
        position.update({str(i): base + n for n, i in enumerate(segment.ids()) if live[n]})
    texts = table.column(query_column).to_pylist()
    relevant = np.array([position.get(str(r), -1) for r in table.column(relevant_column).to_pylist()], np.int64)
    keep = [i for i, (t, r) in enumerate(zip(texts, relevant, strict=True)) if t and r >= 0]
    if not keep:
        raise CorpusError(f"none of the relevant ids in {str(path)!r} is in the index; is it the right index?")
    return QuerySet([texts[i] for i in keep], relevant[keep])


def _bases(reader: IndexReader) -> np.ndarray:
    """The key of each segment's first row: a row's key is its segment's base plus its position."""
    return np.concatenate([[0], np.cumsum([s.ref.rows for s in reader.segments])[:-1]]).astype(np.int64)


def _keys(reader: IndexReader, segments: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return np.where(positions >= 0, _bases(reader)[segments] + positions, -1)


def _metrics(found: np.ndarray, relevant: np.ndarray, ks: tuple[int, ...]) -> dict:
    hit_rank = np.full(len(relevant), np.inf)
    rows, cols = np.nonzero(found == relevant[:, None])
    hit_rank[rows] = cols + 1
    out = {f"recall@{k}": round(float(np.mean(hit_rank <= k)), 4) for k in ks}
    out[f"mrr@{max(ks)}"] = round(float(np.mean(np.where(hit_rank <= max(ks), 1.0 / hit_rank, 0.0))), 4)
    return out


def _agreement(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    return round(float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact, strict=True)])), 4)


def evaluate(reader: IndexReader, query_vectors: np.ndarray, queries: QuerySet, ks: tuple[int, ...] = (1, 10),
             ef: int | None = None, dims: list[int] | None = None, exact_device: str = "cpu",
             funnel: tuple[int, ...] = (), shortlist: int = DEFAULT_SHORTLIST) -> dict:
    """Recall@k and MRR per dim for exact search and HNSW; with HNSW's agreement with exact (recall vs exact).

    `exact_device` (auto|cpu|gpu) is where the exact search runs; the result records the device it resolved to and
    the time of each search per query. Each dim of `funnel` adds a funnel from that dim (`shortlist` candidates
    per segment) and its agreement with exact full-dim search."""
    if not ks or min(ks) <= 0:
        raise ConfigError(f"-k values must be positive, got {ks!r}")
    k = max(ks)
    for dim in funnel:
        reader.check_funnel(dim, k, shortlist)
    exact_device = resolve_exact_device(exact_device, k)
    ef = max(ef or reader.info.hnsw["ef_search"], k)  # HNSW returns at most efSearch hits
    results = {}
    full = reader.info.dim
    exact_full = None
    for dim in sorted(set(dims or reader.dims) | set(funnel), reverse=True):
        reader.load(dim)
        t0 = time.perf_counter()
        _, segments, positions = reader.search_positions(query_vectors, k, dim, ef)
        seconds = time.perf_counter() - t0
        approx = _keys(reader, segments, positions)
        t0 = time.perf_counter()
        _, segments, positions = reader.search_positions(query_vectors, k, dim, exact=True,  # brute force
                                                         exact_device=exact_device)
        exact_seconds = time.perf_counter() - t0
        exact = _keys(reader, segments, positions)
        results[str(dim)] = {"exact": _metrics(exact, queries.relevant, ks),
                             "hnsw": _metrics(approx, queries.relevant, ks),
                             f"hnsw_recall@{k}_vs_exact": _agreement(approx, exact, k),
                             "ef_search": ef,
                             "hnsw_ms_per_query": round(1000 * seconds / len(query_vectors), 4),
                             "exact_ms_per_query": round(1000 * exact_seconds / len(query_vectors), 4)}
        if dim == full:
            exact_full = exact
        if dim in funnel:
            t0 = time.perf_counter()
            _, segments, positions = reader.funnel_positions(query_vectors, k, dim, shortlist, ef)
            funnel_seconds = time.perf_counter() - t0
            if exact_full is None:  # no full-dim index (--keep-full): exact search of the vectors files
                exact_full = _keys(reader, *reader.exact_full_positions(query_vectors, k)[1:])
            found = _keys(reader, segments, positions)
            results[str(dim)].update({"funnel": _metrics(found, queries.relevant, ks),
                                      f"funnel_recall@{k}_vs_exact_{full}": _agreement(found, exact_full, k),
                                      "shortlist": shortlist,
                                      "funnel_ms_per_query": round(1000 * funnel_seconds / len(query_vectors), 4)})
    return {"index": str(reader.dir), "queries": len(queries.texts), "k": list(ks), "exact_device": exact_device,
            "full_dim": full, "dims": results}
