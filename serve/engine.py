"""The model side of the server: texts or token ids in, full-dim normalised vectors out.

Texts are looked up in an LRU cache of recent (prefix + text) embeddings first; the others are tokenised in a
thread (the encoder's tokenizer, the same cut at max_length and the same end token as `embedctl index`) and
handed to the batcher, which runs them in the model's thread merged with other requests' texts.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
from cachetools import LRUCache

from embedctl.pipeline.encoder import Encoder, Prepared
from embedctl.pipeline.errors import ConfigError, WeightsLost
from embedctl.serve.batcher import Batcher

LOG = logging.getLogger(__name__)

INLINE_CHARS = 2048
"""Texts up to this many characters in all are tokenised on the event loop (microseconds); longer ones in a
thread, so that other requests are not held up."""


class LRU:
    """The `size` most recently used entries (`cachetools.LRUCache`; `size` 0: nothing is kept). Used only from the
    event loop's thread."""

    def __init__(self, size: int):
        self.size = size
        self._items: LRUCache | None = LRUCache(maxsize=size) if size > 0 else None

    def get(self, key: str) -> tuple[np.ndarray, int] | None:
        return self._items.get(key) if self._items is not None else None

    def put(self, key: str, value: tuple[np.ndarray, int]) -> None:
        if self._items is not None:
            self._items[key] = value

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else 0


@dataclass
class Embedded:
    vectors: np.ndarray  # (n, dim) float32, L2-normalised, full dim
    tokens: int  # tokens of the inputs (cached ones included: what the request is billed, as OpenAI counts)
    cached: int  # inputs answered from the cache


class Engine:
    """One model, its cache and its batcher; `embed_texts` and `embed_tokens` may be awaited concurrently."""

    def __init__(self, encoder: Encoder, cache: int, max_wait: float, max_queue: int,
                 on_batch=None, on_cache=None, reload=None):
        self.encoder = encoder
        self._reload = reload  # makes the encoder again (on the restarted exporter's weights)
        self.cache = LRU(cache)
        self._on_cache = on_cache
        self.batcher = Batcher(self._run, encoder.batch_tokens, max_wait, max_queue, on_batch)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def vocab(self) -> int:
        return len(self.encoder.tokenizer)

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()

    def _run(self, sequences: list[list[int]]) -> np.ndarray:
        """The model thread: one encoder call over sequences of many requests."""
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        prepared = Prepared(inverse=np.arange(len(sequences)), ids=sequences, truncated=np.zeros(len(sequences), bool),
                            lengths=lengths, order=np.argsort(-lengths, kind="stable"))
        try:
            return self.encoder.run(prepared).vectors
        except WeightsLost as exc:
            if self._reload is None:
                raise
            LOG.error("%s: mapping the restarted exporter's weights, then running the batch again", exc)
            self.encoder = self._reload()  # waits for the exporter (EMBEDCTL_DEVICE_SHARE=on: never from disk)
            return self.encoder.run(prepared).vectors

    async def embed_texts(self, texts: list[str], prefix: str = "") -> Embedded:
        keys = [prefix + t for t in texts]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        tokens, missing = 0, {}
        for i, key in enumerate(keys):
            hit = self.cache.get(key)
            if hit is None:
                missing.setdefault(key, []).append(i)
            else:
                out[i], n = hit
                tokens += n
        misses = sum(len(v) for v in missing.values())
        if self._on_cache is not None:
            self._on_cache(len(texts) - misses, misses)
        if missing:
            unique = list(missing)
            if sum(map(len, unique)) <= INLINE_CHARS:  # a few short texts: a thread hop costs more
                sequences, _cut = self.encoder.tokenize(unique)
            else:
                sequences, _cut = await asyncio.to_thread(self.encoder.tokenize, unique)
            vectors = await self.batcher.submit(sequences)
            for key, seq, vector in zip(unique, sequences, vectors, strict=True):
                self.cache.put(key, (vector, len(seq)))
                out[missing[key]] = vector
                tokens += len(seq) * len(missing[key])
        return Embedded(out, tokens, len(texts) - misses)

    def check_tokens(self, sequences: list[list[int]]) -> list[list[int]]:
        """Token-id inputs as the model takes them: ids checked against the vocabulary, cut at max_length, the end
        token appended for last-token pooling (as tokenising a text does)."""
        vocab, encoder = self.vocab, self.encoder
        limit = encoder.token_limit
        ready = []
        for n, seq in enumerate(sequences):
            if not seq:
                raise ConfigError(f"input {n} is an empty list of token ids")
            bad = next((t for t in seq if not 0 <= t < vocab), None)
            if bad is not None:
                raise ConfigError(f"input {n} holds token id {bad}, outside the model's vocabulary of {vocab}")
            seq = list(seq)
            if encoder.eos_id is not None and seq[-1] == encoder.eos_id:
                seq = seq[:-1]
            seq = seq[:limit]
            if encoder.eos_id is not None:
                seq.append(encoder.eos_id)
            ready.append(seq)
        return ready

    async def embed_tokens(self, sequences: list[list[int]]) -> Embedded:
        ready = self.check_tokens(sequences)
        vectors = await self.batcher.submit(ready)
        return Embedded(np.asarray(vectors, dtype=np.float32), sum(len(s) for s in ready), 0)

