"""Exact (brute-force) inner-product search in tiles, on the GPU through faiss-gpu or on the CPU.

The database is searched a tile of rows at a time and each tile's top k is merged into the running top k, so the
vectors never need to be in device memory (or, decoded from a quantised index, in host memory) whole. A backend is
one function `search(tile, queries, k) -> (scores, local indices)`: `faiss.knn_gpu` with one
`StandardGpuResources` per process, or `faiss.knn` on the CPU. `backend(device)` is the one place a device name
becomes a backend (tests swap it to run the GPU code path with the CPU backend).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import faiss
import numpy as np

from embedctl.pipeline.errors import ConfigError
from embedctl.settings import setting

Search = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]

EXACT_DEVICES = ("auto", "cpu", "gpu")
"""Values of `--exact-device`: auto (the GPU when faiss-gpu sees one, else the CPU), cpu, gpu."""

TILE_BYTES = 256 << 20
"""Bytes of float32 vectors in one tile of the database (rows = TILE_BYTES / (4 x dim)); EMBEDCTL_EXACT_TILE_ROWS
sets the rows instead."""

TILE_ROWS_ENV = "EMBEDCTL_EXACT_TILE_ROWS"

GPU_MAX_K = 2048
"""The most neighbours faiss-gpu's k-selection returns per query."""


def gpu_available() -> bool:
    """Whether this FAISS is built with GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_exact_device(setting: str, k: int = 1) -> str:
    """`auto|cpu|gpu` -> `cpu` or `gpu` for searches of `k` neighbours; `gpu` where faiss-gpu sees no GPU, or for
    more neighbours than it returns, is a ConfigError (one line); `auto` then resolves to `cpu`."""
    if setting not in EXACT_DEVICES:
        raise ConfigError(f"--exact-device must be one of {', '.join(EXACT_DEVICES)}, got {setting!r}")
    if setting == "cpu" or (setting == "auto" and k > GPU_MAX_K):
        return "cpu"
    if gpu_available():
        if k > GPU_MAX_K:
            raise ConfigError(f"-k {k} is more than the {GPU_MAX_K} neighbours faiss-gpu returns; use a smaller -k "
                              "or --exact-device cpu")
        return "gpu"
    if setting == "auto":
        return "cpu"
    raise ConfigError("--exact-device gpu: this FAISS has no GPU support or sees no GPU; install the gpu extra "
                      "(pip install 'embedctl[gpu]') on a CUDA host, or use --exact-device cpu")


def default_tile_rows(dim: int) -> int:
    """Database rows per tile: EMBEDCTL_EXACT_TILE_ROWS when set, else TILE_BYTES of float32 vectors of `dim`."""
    return setting("exact_tile_rows") or max(1, TILE_BYTES // (4 * max(dim, 1)))


def cpu_search(tile: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product top k of `queries` over `tile` on the CPU (`faiss.knn`)."""
    return faiss.knn(queries, tile, k, metric=faiss.METRIC_INNER_PRODUCT)


_GPU: list = []  # the process's StandardGpuResources, made on first use
_GPU_LOCK = threading.Lock()  # a GpuResources serves one calling thread at a time; segments search in threads


def gpu_search(tile: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product top k of `queries` over `tile` on the GPU (`faiss.knn_gpu`)."""
    if k > GPU_MAX_K:
        raise ConfigError(f"-k {k} is more than the {GPU_MAX_K} neighbours faiss-gpu returns; use a smaller -k or "
                          "--exact-device cpu")
    with _GPU_LOCK:
        if not _GPU:
            _GPU.append(faiss.StandardGpuResources())
        return faiss.knn_gpu(_GPU[0], queries, tile, k, metric=faiss.METRIC_INNER_PRODUCT)


def backend(device: str) -> Search:
    """The tile search of `device` (`cpu` or `gpu`, as `resolve_exact_device` returns)."""
    if device == "cpu":
        return cpu_search
    if device == "gpu":
        return gpu_search
    raise ConfigError(f"exact search device must be cpu or gpu, got {device!r}")


def k_limit(device: str) -> int | None:
    """The most neighbours the backend of `device` returns per call (None: no limit)."""
    return GPU_MAX_K if device == "gpu" else None


def knn_tiled(database: np.ndarray, queries: np.ndarray, k: int, tile_rows: int, search: Search,
              max_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product top k of each query over `database` (float32, (n, d)), `tile_rows` rows at a time.

    Returns (scores, positions), each (len(queries), k), best first and ties by lower position; positions are row
    numbers of `database`, -1 (score -inf) where it has fewer than k rows. The same result as one search of the
    whole database, whatever the tile size. `max_k`: the most neighbours one `search` call may ask for."""
    if tile_rows <= 0:
        raise ValueError(f"tile_rows must be > 0, got {tile_rows!r}")
    n = len(database)
    tiles = ((database[s:s + tile_rows], np.arange(s, min(s + tile_rows, n), dtype=np.int64))
             for s in range(0, n, tile_rows))
    return knn_tiles(tiles, queries, k, search, max_k)


def knn_tiles(tiles: Iterable[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int, search: Search,
              max_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`knn_tiled` over tiles given as (vectors, the id of each row): returns ids instead of positions.

    Tiles are made one at a time as they are searched, so a caller can decode or gather each tile on demand."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for vectors, row_ids in tiles:
        if len(vectors) == 0 or len(queries) == 0:
            continue
        tile_scores, local = _search_tile(search, np.ascontiguousarray(vectors, dtype=np.float32), queries, k,
                                          max_k or len(vectors))
        found = local >= 0
        tile_ids = np.where(found, row_ids[np.where(found, local, 0)], -1)
        scores, ids = _merge(np.concatenate([scores, np.where(found, tile_scores, -np.inf)], axis=1),
                             np.concatenate([ids, tile_ids], axis=1), k)
    return scores, ids


def _search_tile(search: Search, vectors: np.ndarray, queries: np.ndarray, k: int,
                 limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The tile's top k and every row tied with its k-th (FAISS keeps any of the rows tied at its cut, so the
    merge could not prefer the lowest id): asks for more than k until each query's last hit scores below its
    k-th, or the tile (or `limit`) is exhausted."""
    n = len(vectors)
    kt = min(k + 1, n, max(limit, k))
    scores, local = search(vectors, queries, kt)
    while kt > k and kt < min(n, limit):
        tied = np.flatnonzero(scores[:, kt - 1] == scores[:, k - 1])
        if not len(tied):
            break
        kt = min(2 * kt, n, limit)
        more_scores, more_local = search(vectors, queries[tied], kt)
        pad = ((0, 0), (0, kt - scores.shape[1]))
        scores = np.pad(scores, pad, constant_values=-np.inf)
        local = np.pad(local, pad, constant_values=-1)
        scores[tied], local[tied] = more_scores, more_local
    return scores, local


def _merge(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row by score, ties by lower id (missing ids, -1, have score -inf and come last)."""
    key = np.where(ids >= 0, ids, np.iinfo(np.int64).max)
    by_id = np.argsort(key, axis=1, kind="stable")
    scores, ids = np.take_along_axis(scores, by_id, 1), np.take_along_axis(ids, by_id, 1)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, best, 1), np.take_along_axis(ids, best, 1)
