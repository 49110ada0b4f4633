"""The steps of a job, shared by the embedded runner and the Celery tasks: embed one chunk, build and publish.

Both steps are idempotent: a complete chunk is not embedded again, and outputs are written atomically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline import versions
from pipeline.cache import EmbeddingCache, text_hashes
from pipeline.corpus import Chunk, ChunkRows, read_chunk
from pipeline.errors import CorpusError, StorageError
from pipeline.fsutil import write_json
from pipeline.index import ROWS_FILE, build_hnsw, index_file, slice_normalise, write_index, write_rows
from pipeline.plan import WorkPlan

if TYPE_CHECKING:  # the encoder (and torch) is imported only by processes that embed
    from pipeline.encoder import Encoder

LOG = logging.getLogger(__name__)

Progress = Callable[[int], None]
ProgressFactory = Callable[[str, int, str, int], AbstractContextManager[Progress]]
"""(description, total, unit, initial) -> a context manager yielding an update(n) callable (e.g. a tqdm bar)."""


class _Silent:
    def __call__(self, n: int) -> None:
        pass

    def note(self, text: str) -> None:
        pass


def no_progress(desc: str, total: int, unit: str = "", initial: int = 0) -> AbstractContextManager[Progress]:
    """A ProgressFactory that shows nothing (its update also takes `.note(text)`, like the CLI's bars)."""
    return nullcontext(_Silent())


def skip_reason(text: object) -> str | None:
    """Why a corpus text is not embedded (None: it is embedded)."""
    if text is None:
        return "null"
    if not str(text).strip():
        return "empty"
    return None


def embed_rows(plan: WorkPlan, chunk: Chunk, data: ChunkRows, encoder: Encoder | Callable[[], Encoder],
               on_progress: Progress | None = None, cache: EmbeddingCache | None = None) -> dict:
    """Embed the rows of one chunk and write them to the chunk store; returns the chunk report.

    Texts found in `cache` reuse their stored vectors; only the others run through the model (`encoder` may be
    a function that loads it, called only when some text is not cached).
    """
    t0 = time.perf_counter()
    reasons = [skip_reason(t) for t in data.texts]
    keep = [i for i, r in enumerate(reasons) if r is None]
    skipped = [{"row": int(data.rows[i]), "id": data.ids[i], "reason": r} for i, r in enumerate(reasons) if r]
    texts = [data.texts[i] for i in keep]
    hashes = text_hashes(texts)
    vectors = np.empty((len(texts), plan.dim), dtype=np.float32)
    found = np.zeros(len(texts), dtype=bool)
    if cache is not None and len(cache):
        found, cached = cache.lookup(hashes, plan.dim)
        vectors[found] = cached[found]
        if on_progress is not None and found.any():
            on_progress(int(found.sum()))
    miss = np.flatnonzero(~found)
    report = {"chunk": chunk.number, "rows": chunk.rows, "indexed": len(keep), "embedded": len(miss),
              "reused": int(found.sum()), "unique": 0, "skipped": skipped, "truncated": 0, "truncated_ids": [],
              "tokens": 0}
    if len(miss):
        model = encoder if hasattr(encoder, "encode") else encoder()
        encoded = model.encode([texts[i] for i in miss], prefix=plan.document_prefix, on_progress=on_progress)
        vectors[miss] = encoded.vectors
        truncated_ids = [data.ids[keep[miss[i]]] for i in np.flatnonzero(encoded.truncated)]
        report.update(unique=encoded.unique, truncated=len(truncated_ids), truncated_ids=truncated_ids[:100],
                      tokens=encoded.tokens, device=str(model.device), weights=model.source,
                      dtype=str(next(model.model.parameters()).dtype).removeprefix("torch."))
        if on_progress is not None:
            on_progress(len(miss) - encoded.unique)  # duplicates count as done too
    if on_progress is not None and skipped:
        on_progress(len(skipped))
    report["seconds"] = round(time.perf_counter() - t0, 3)
    id_type = pa.string() if plan.corpus.id_column and data.ids and isinstance(data.ids[0], str) else pa.int64()
    plan.store.write(chunk.number, data.rows[keep], [data.ids[i] for i in keep], texts, vectors, report,
                     id_type=id_type, hashes=hashes)
    return report


def embed_chunk(plan: WorkPlan, number: int, encoder: Encoder | Callable[[], Encoder],
                on_progress: Progress | None = None, cache: EmbeddingCache | None = None) -> dict:
    """Embed chunk `number` unless it is complete (what a worker runs); returns a small summary."""
    if plan.store.is_complete(number):
        return {"chunk": number, "skipped_complete": True}
    chunks = plan.corpus.chunks
    if not 0 <= number < len(chunks):
        raise StorageError(f"chunk {number} is not in the plan (0..{len(chunks) - 1})")
    chunk = chunks[number]
    report = embed_rows(plan, chunk, read_chunk(plan.corpus, chunk), encoder, on_progress, cache)
    return {k: report[k] for k in ("chunk", "rows", "indexed", "embedded", "reused", "truncated", "seconds")}


def missing_chunks(plan: WorkPlan) -> list[int]:
    """Numbers of the chunks not complete yet."""
    done = plan.store.complete()
    return [c.number for c in plan.corpus.chunks if c.number not in done]


def summarise(plan: WorkPlan) -> dict:
    """Totals over the chunk reports of a complete plan."""
    reports = [plan.store.read_report(c.number) for c in plan.corpus.chunks]
    skipped = [s for r in reports for s in r["skipped"]]
    return {
        "rows_total": plan.corpus.rows,
        "rows_indexed": sum(r["indexed"] for r in reports),
        "rows_skipped": len(skipped),
        "skipped": skipped[:1000],
        "rows_truncated": sum(r["truncated"] for r in reports),
        "tokens": sum(r["tokens"] for r in reports),
    }


def build_and_publish(plan: WorkPlan, progress: ProgressFactory = no_progress) -> dict:
    """Build the indexes of a complete plan into a new version folder and publish it; returns its info."""
    missing = missing_chunks(plan)
    if missing:
        raise StorageError(f"cannot build: {len(missing)} chunks are not embedded yet (first: {missing[0]}); "
                           "run the job again to finish them")
    t0 = time.perf_counter()
    store = plan.store
    numbers = [c.number for c in plan.corpus.chunks]
    tables = [store.read_rows(k) for k in numbers]
    rows = pa.concat_tables(tables, promote_options="permissive")
    n = rows.num_rows
    if n == 0:
        raise CorpusError(f"nothing to index: all {plan.corpus.rows} texts of the corpus are null or empty")
    vectors = np.empty((n, plan.dim), dtype=np.float16)
    pos = 0
    for k in numbers:
        part = store.read_vectors(k)
        vectors[pos:pos + len(part)] = part
        pos += len(part)
    build = versions.new_build_dir(plan.out)
    try:
        write_rows(rows, build / ROWS_FILE)
        timings = {}
        for dim in plan.dims:
            t_dim = time.perf_counter()
            with progress(f"index {dim}d", n, "vec", 0) as update:
                index = build_hnsw(slice_normalise(vectors, dim), plan.hnsw_m, plan.ef_construction,
                                   plan.ef_search, update, plan.index_type)
            write_index(index, build / index_file(dim))
            timings[str(dim)] = round(time.perf_counter() - t_dim, 3)
        info = {
            "format": 1,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": plan.model, "model_path": plan.model_path, "model_fingerprint": plan.model_fingerprint,
            "model_type": plan.model_type, "pooling": plan.pooling, "dim": plan.dim, "dtype": plan.dtype,
            "max_length": plan.max_length, "document_prefix": plan.document_prefix,
            "query_prefix": plan.query_prefix, "dims": list(plan.dims), "rows": n,
            "files": {str(d): index_file(d) for d in plan.dims}, "rows_file": ROWS_FILE,
            "hnsw": {"m": plan.hnsw_m, "ef_construction": plan.ef_construction, "ef_search": plan.ef_search},
            "index_type": plan.index_type,
            "corpus": {"source": plan.corpus.source, "fingerprint": plan.corpus.fingerprint,
                       "rows": plan.corpus.rows, "text_column": plan.corpus.text_column,
                       "id_column": plan.corpus.id_column, "files": len(plan.corpus.files)},
            "index_key": plan.index_key, "build_seconds": timings,
        }
        write_json(build / versions.INFO, info)
        target = versions.publish(plan.out, build)
    except BaseException:
        versions.discard(build)
        raise
    LOG.info("published %s (%d rows, dims %s) in %.1fs", target, n, plan.dims, time.perf_counter() - t0)
    return {**info, "version": target.name, "path": str(target)}
