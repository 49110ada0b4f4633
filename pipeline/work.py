"""Embedding a job's chunks, shared by the embedded runner and the Celery tasks.

Idempotent: a complete chunk is not embedded again, and its outputs are written atomically. The build of the
indexes from the complete chunks is `pipeline.build`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
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
    from embedctl.pipeline.vectors import Layout

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
    whole: tuple | None = None  # (store, chunk) whose vectors file these vectors are, all of them cached
    stored: Layout | None = None  # where the cached rows' vectors are stored (an overlay points there)
    seconds: float = 0.0  # time spent reading and preparing it

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
    if cache is not None and len(cache):
        work.whole, work.stored = hits.whole, hits.stored
    if len(work.miss) and encoder is not None and not _gathers(work):  # a gathered chunk is tokenised with the rest
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


GATHER_TEXTS = 512
"""At most this many texts not cached, of chunks whose texts are mostly cached (a re-index of a small change), run
through the model in one encoder call (`_groups`): one call per chunk costs a fixed overhead each."""
GATHER_CHUNKS = 32
GATHER_BYTES = 256 << 20
"""At most this many chunks, and this many bytes of their vectors, held for one gathered call (their rows and
vectors stay in memory until it has run)."""


def _gathers(work: _ChunkWork) -> bool:
    """Whether a chunk's texts not cached may join those of its neighbours: few, and most of its texts cached (a
    chunk embedded from scratch runs alone, as it always has)."""
    misses = len(work.miss)
    return misses <= GATHER_TEXTS and 2 * misses <= len(work.texts)


def _groups(works: Iterable[_ChunkWork]) -> Iterator[list[_ChunkWork]]:
    """Consecutive chunks, in order, grouped into the chunks that share one encoder call (`_embed_group`)."""
    group: list[_ChunkWork] = []
    misses = held = 0
    for work in works:
        if not _gathers(work):
            if group:
                yield group
                group, misses, held = [], 0, 0
            yield [work]
            continue
        if group and (misses + len(work.miss) > GATHER_TEXTS or len(group) >= GATHER_CHUNKS
                      or held + work.vectors.nbytes > GATHER_BYTES):
            yield group
            group, misses, held = [], 0, 0
        group.append(work)
        misses += len(work.miss)
        held += work.vectors.nbytes
    if group:
        yield group


def _embed_group(plan: WorkPlan, works: list[_ChunkWork], encoder: Encoder | Callable[[], Encoder],
                 on_progress: Progress | None) -> list[_ChunkWork]:
    """`_embed` for consecutive chunks whose texts not cached run through the model in one call; each chunk gets
    its own vectors, and the report figures (`unique`, `tokens`, truncated rows) it would get embedded alone. A text
    embedded here shares its batch with other chunks' texts: its vector may differ from a call of its chunk's alone
    in the last float32 bits (other padding), as it already did with what else changed in its chunk."""
    texts = [work.texts[i] for work in works for i in work.miss]
    if len(works) == 1 or not texts:
        return [_embed(plan, work, encoder, on_progress) for work in works]
    for work in works:
        if on_progress is not None and work.found.any():
            on_progress(int(work.found.sum()))
    model = encoder if hasattr(encoder, "encode") else encoder()
    prepared = model.prepare(texts, prefix=plan.document_prefix)
    encoded = model.run(prepared, on_progress=on_progress)
    start = 0
    for work in works:
        stop = start + len(work.miss)
        if stop > start:
            unique = np.unique(prepared.inverse[start:stop])  # positions among the call's distinct texts
            work.encoder, work.encoded = model, replace(
                encoded, vectors=encoded.vectors[start:stop], truncated=encoded.truncated[start:stop],
                tokens=int(prepared.lengths[unique].sum()), unique=len(unique))
            work.vectors[work.miss] = work.encoded.vectors
        start = stop
    if on_progress is not None:
        on_progress(len(texts) - encoded.unique)  # duplicates count as done too
        skipped = sum(len(work.skipped) for work in works)
        if skipped:
            on_progress(skipped)
    return works


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
                            work.vectors, report, id_type=id_type, hashes=work.hashes, copy_of=work.whole,
                            stored=work.stored)


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

    Consecutive chunks whose texts are mostly cached (a re-index of a small change) run their few texts not cached
    through the model in one call (`_groups`), then are written one by one; a chunk is complete only once written,
    so an interrupt before the call ends loses those chunks' model time only.

    With `overlap`, the model never waits for I/O: a reader thread reads chunk k+1 from Parquet and tokenises it
    while the model runs chunk k, and a writer thread writes chunk k-1. Chunks are still written one at a time and
    in order, each atomically, so an interrupt leaves complete chunks only (the thread pools finish the read and
    the write in flight before the interrupt propagates).
    """
    if not overlap:
        def read_each() -> Iterator[_ChunkWork]:
            for chunk, data in chunks:
                t0 = time.perf_counter()
                work = _prepare(plan, chunk, data, cache, None)
                work.seconds = time.perf_counter() - t0
                yield work

        for group in _groups(read_each()):
            t0 = time.perf_counter()
            _embed_group(plan, group, encoder, on_progress)
            for work, seconds in _shares(group, time.perf_counter() - t0):
                yield _write(plan, work, work.seconds + seconds, stamp)
        return
    it = iter(chunks)
    loaded = [encoder if hasattr(encoder, "encode") else None]  # set once the model is loaded (main thread)

    def read_next() -> _ChunkWork | None:
        item = next(it, None)
        if item is None:
            return None
        t0 = time.perf_counter()
        work = _prepare(plan, item[0], item[1], cache, loaded[0])
        work.seconds = time.perf_counter() - t0
        return work

    with ThreadPoolExecutor(1, thread_name_prefix="embedctl-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="embedctl-write") as writer:

        def read() -> Iterator[_ChunkWork]:
            ahead = reader.submit(read_next)
            while (work := ahead.result()) is not None:
                ahead = reader.submit(read_next)
                yield work

        behind: Future | None = None
        for group in _groups(read()):
            t0 = time.perf_counter()
            _embed_group(plan, group, encoder, on_progress)
            loaded[0] = loaded[0] or next((w.encoder for w in group if w.encoder is not None), None)
            for work, seconds in _shares(group, time.perf_counter() - t0):
                if behind is not None:
                    yield behind.result()
                behind = writer.submit(_write, plan, work, work.seconds + seconds, stamp)
        if behind is not None:
            yield behind.result()


def _shares(group: list[_ChunkWork], seconds: float) -> list[tuple[_ChunkWork, float]]:
    """Each chunk of a group with its share of the group's model time (by texts embedded; evenly when none)."""
    misses = [len(work.miss) for work in group]
    total = sum(misses)
    return [(work, seconds * (m / total if total else 1 / len(group))) for work, m in zip(group, misses, strict=True)]


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
