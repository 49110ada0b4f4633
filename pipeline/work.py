"""Embedding a job's chunks, shared by the embedded runner and the Celery tasks.

Idempotent: a complete chunk is not embedded again, and its outputs are written atomically. The build of the
indexes from the complete chunks is `pipeline.build`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from embedctl.pipeline.cache import EmbeddingCache, text_hashes
from embedctl.pipeline.corpus import Chunk, ChunkRows, read_chunk
from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.loader import dtype_name
from embedctl.pipeline.plan import WorkPlan
from embedctl.pipeline.progress import Update as Progress

if TYPE_CHECKING:  # the encoder (and torch) is imported only by processes that embed
    from embedctl.pipeline.encoder import Encoded, Encoder, Prepared

LOG = logging.getLogger(__name__)

class EncoderOnDemand:
    """The encoder of a plan, loaded the first time a text is not in the cache: a run whose changed texts are all
    cached (or whose chunks are all complete) loads no model. `encoder`: one already loaded, used as it is."""

    def __init__(self, plan: WorkPlan, threads: int | None = None, shm: str = "auto", encoder: Encoder | None = None):
        self.plan, self.threads, self.shm = plan, threads, shm
        self._encoder = encoder

    def __call__(self) -> Encoder:
        if self._encoder is None:
            import torch  # imported here: planning and status need no torch

            from embedctl.pipeline.encoder import load_encoder
            from embedctl.pipeline.models import ModelRef

            if self.threads:
                torch.set_num_threads(self.threads)
            plan = self.plan
            self._encoder = load_encoder(ModelRef(plan.model, Path(plan.model_path)), device=plan.device,
                                         dtype=plan.dtype, max_length=plan.max_length,
                                         batch_tokens=plan.batch_tokens, shm=self.shm, compile=plan.compile)
        return self._encoder


def skip_reason(text: object) -> str | None:
    """Why a corpus text is not embedded (None: it is embedded)."""
    if text is None:
        return "null"
    if not str(text).strip():
        return "empty"
    return None


@dataclass
class _ChunkWork:
    """One chunk between its three steps: read and prepared, embedded, written."""

    chunk: Chunk
    data: ChunkRows
    keep: list[int]  # positions of the rows that are embedded (not null or empty)
    skipped: list[dict]
    texts: list[str]
    hashes: np.ndarray
    vectors: np.ndarray  # (len(keep), dim) float32; cached rows filled in
    found: np.ndarray  # (len(keep),) bool: taken from the cache
    dtypes: set[str] = field(default_factory=set)  # compute dtypes of the cached vectors used
    encoder: Encoder | None = None  # set when some text is not cached
    prepared: Prepared | None = None
    encoded: Encoded | None = None

    @property
    def miss(self) -> np.ndarray:
        return np.flatnonzero(~self.found)


def _prepare(plan: WorkPlan, chunk: Chunk, data: ChunkRows, cache: EmbeddingCache | None,
             encoder: Encoder | None) -> _ChunkWork:
    """Host work before the model: skip reasons, text hashes, cache lookup, and tokenising the texts not cached
    when the model is loaded already (it is loaded by the thread that runs it, on the first text not cached)."""
    reasons = [skip_reason(t) for t in data.texts]
    keep = [i for i, r in enumerate(reasons) if r is None]
    skipped = [{"row": int(data.rows[i]), "id": data.ids[i], "reason": r} for i, r in enumerate(reasons) if r]
    texts = [data.texts[i] for i in keep]
    hashes = text_hashes(texts)
    vectors = np.empty((len(texts), plan.dim), dtype=np.float32)
    found, dtypes = np.zeros(len(texts), dtype=bool), set()
    if cache is not None and len(cache):
        hits = cache.lookup(hashes, plan.dim)
        found, dtypes = hits.found, hits.dtypes
        vectors[found] = hits.vectors[found]
    work = _ChunkWork(chunk, data, keep, skipped, texts, hashes, vectors, found, dtypes)
    if len(work.miss) and encoder is not None:
        work.prepared = encoder.prepare([texts[i] for i in work.miss], prefix=plan.document_prefix)
    return work


def _embed(plan: WorkPlan, work: _ChunkWork, encoder: Encoder | Callable[[], Encoder],
           on_progress: Progress | None) -> _ChunkWork:
    """Run the model on the texts not cached (progress counts cached rows, duplicates and skipped rows too)."""
    if on_progress is not None and work.found.any():
        on_progress(int(work.found.sum()))
    miss = work.miss
    if len(miss):
        work.encoder = encoder if hasattr(encoder, "encode") else encoder()
        if work.prepared is None:
            work.prepared = work.encoder.prepare([work.texts[i] for i in miss], prefix=plan.document_prefix)
        work.encoded = work.encoder.run(work.prepared, on_progress=on_progress)
        work.vectors[miss] = work.encoded.vectors
        if on_progress is not None:
            on_progress(len(miss) - work.encoded.unique)  # duplicates count as done too
    if on_progress is not None and work.skipped:
        on_progress(len(work.skipped))
    return work


def _write(plan: WorkPlan, work: _ChunkWork, seconds: float, stamp: dict | None) -> dict:
    """Write the chunk's vectors, rows and report to the chunk store (atomically); returns the report.

    `stamp`: fields added to the report (the run lifecycle adds the run id).
    """
    data, keep, miss = work.data, work.keep, work.miss
    report = {"chunk": work.chunk.number, "rows": work.chunk.rows, "indexed": len(keep), "embedded": len(miss),
              "reused": int(work.found.sum()), "unique": 0, "skipped": work.skipped, "truncated": 0,
              "truncated_ids": [], "tokens": 0, **(stamp or {})}
    dtypes = set(work.dtypes)
    if work.encoded is not None:
        encoded, model = work.encoded, work.encoder
        truncated_ids = [data.ids[keep[miss[i]]] for i in np.flatnonzero(encoded.truncated)]
        dtypes.add(dtype_name(next(model.model.parameters()).dtype))
        report.update(unique=encoded.unique, truncated=len(truncated_ids), truncated_ids=truncated_ids[:100],
                      tokens=encoded.tokens, device=str(model.device), weights=model.source)
    report["dtypes"] = sorted(dtypes)
    report["seconds"] = round(seconds, 3)
    report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    report["finished_ts"] = round(time.time(), 3)
    id_type = pa.string() if plan.corpus.id_column and data.ids and isinstance(data.ids[0], str) else pa.int64()
    return plan.store.write(work.chunk.number, data.rows[keep], [data.ids[i] for i in keep], work.texts,
                            work.vectors, report, id_type=id_type, hashes=work.hashes)


def embed_rows(plan: WorkPlan, chunk: Chunk, data: ChunkRows, encoder: Encoder | Callable[[], Encoder],
               on_progress: Progress | None = None, cache: EmbeddingCache | None = None,
               stamp: dict | None = None) -> dict:
    """Embed the rows of one chunk and write them to the chunk store; returns the chunk report.

    Texts found in `cache` reuse their stored vectors; only the others run through the model (`encoder` may be
    a function that loads it, called only when some text is not cached).
    """
    t0 = time.perf_counter()
    work = _embed(plan, _prepare(plan, chunk, data, cache, None), encoder, on_progress)
    return _write(plan, work, time.perf_counter() - t0, stamp)


def embed_stream(plan: WorkPlan, chunks: Iterable[tuple[Chunk, ChunkRows]], encoder: Encoder | Callable[[], Encoder],
                 on_progress: Progress | None = None, cache: EmbeddingCache | None = None,
                 overlap: bool = True, stamp: dict | None = None) -> Iterator[dict]:
    """Embed and write a stream of chunks in order, yielding each chunk's report once it is written.

    With `overlap`, the model never waits for I/O: a reader thread reads chunk k+1 from Parquet and tokenises it
    while the model runs chunk k, and a writer thread writes chunk k-1. Chunks are still written one at a time and
    in order, each atomically, so an interrupt leaves complete chunks only (the thread pools finish the read and
    the write in flight before the interrupt propagates).
    """
    if not overlap:
        for chunk, data in chunks:
            yield embed_rows(plan, chunk, data, encoder, on_progress, cache, stamp)
        return
    it = iter(chunks)
    loaded = [encoder if hasattr(encoder, "encode") else None]  # set once the model is loaded (main thread)

    def read_next() -> tuple[_ChunkWork, float] | None:
        item = next(it, None)
        if item is None:
            return None
        t0 = time.perf_counter()
        return _prepare(plan, item[0], item[1], cache, loaded[0]), time.perf_counter() - t0

    def embed(work: _ChunkWork) -> _ChunkWork:
        _embed(plan, work, encoder, on_progress)
        loaded[0] = loaded[0] or work.encoder
        return work

    with ThreadPoolExecutor(1, thread_name_prefix="embedctl-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="embedctl-write") as writer:
        ahead = reader.submit(read_next)
        behind: Future | None = None
        while (item := ahead.result()) is not None:
            ahead = reader.submit(read_next)
            work, t_read = item
            t0 = time.perf_counter()
            embed(work)
            if behind is not None:
                yield behind.result()
            behind = writer.submit(_write, plan, work, t_read + time.perf_counter() - t0, stamp)
        if behind is not None:
            yield behind.result()


def embed_chunk(plan: WorkPlan, number: int, encoder: Encoder | Callable[[], Encoder],
                on_progress: Progress | None = None, cache: EmbeddingCache | None = None,
                stamp: dict | None = None) -> dict:
    """Embed chunk `number` unless it is complete (what a worker runs); returns a small summary."""
    if plan.store.is_complete(number):
        return {"chunk": number, "skipped_complete": True}
    chunks = plan.corpus.chunks
    if not 0 <= number < len(chunks):
        raise StorageError(f"chunk {number} is not in the plan (0..{len(chunks) - 1})")
    chunk = chunks[number]
    report = embed_rows(plan, chunk, read_chunk(plan.corpus, chunk), encoder, on_progress, cache, stamp)
    return {k: report[k] for k in ("chunk", "rows", "indexed", "embedded", "reused", "truncated", "seconds")}


def missing_chunks(plan: WorkPlan) -> list[int]:
    """Numbers of the chunks not complete yet."""
    done = plan.store.complete()
    return [c.number for c in plan.corpus.chunks if c.number not in done]


def chunk_reports(plan: WorkPlan) -> list[dict]:
    """The reports of every chunk of a complete plan, in chunk order."""
    return [plan.store.read_report(c.number) for c in plan.corpus.chunks]
