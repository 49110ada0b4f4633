"""Merging concurrent requests into token-budget batches for one model.

Each request brings token sequences; the batcher queues them and one model thread runs them. When the model is
free, the waiting requests are taken in arrival order up to the token budget (the first always, however long)
and run as one call, which the encoder packs into padded batches by length (`pipeline.packing.pack_batches`).
While the model runs, new requests queue up and form the next batch: under load batches fill by themselves. When
the last batch merged several requests (clients are concurrent), the first request of the next one waits up to
`max_wait` seconds for company, so that clients answered together are batched together again; a lone client
never waits. Past `max_queue` waiting requests,
`submit` refuses at once (the server answers 429) instead of queueing work it cannot finish in time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

LOG = logging.getLogger(__name__)


class Overloaded(Exception):
    """More requests are waiting than the batcher accepts."""


@dataclass
class BatchStats:
    """What one model call ran (for the metrics)."""

    requests: int
    sequences: int
    tokens: int
    waits: list[float] = field(default_factory=list)  # seconds each request waited before its batch started
    seconds: float = 0.0


@dataclass
class _Waiting:
    sequences: list[list[int]]
    tokens: int
    future: asyncio.Future
    queued: float


class Batcher:
    """Runs `run(sequences) -> vectors` (one row per sequence) for concurrent callers, merged into batches."""

    def __init__(self, run: Callable[[list[list[int]]], np.ndarray], budget: int, max_wait: float = 0.002,
                 max_queue: int = 256, on_batch: Callable[[BatchStats], None] | None = None):
        if budget <= 0 or max_queue <= 0 or max_wait < 0:
            raise ValueError("budget and max_queue must be > 0 and max_wait >= 0")
        self._run = run
        self.budget = budget
        self.max_wait = max_wait
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: deque[_Waiting] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._model = ThreadPoolExecutor(1, thread_name_prefix="embedctl-model")
        self._last_requests = 0  # requests in the last batch: a lone client's request never waits

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="embedctl-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for waiting in self._queue:
            if not waiting.future.done():
                waiting.future.set_exception(Overloaded("the server is shutting down"))
        self._model.shutdown(wait=False, cancel_futures=True)

    async def submit(self, sequences: list[list[int]]) -> np.ndarray:
        """The vectors of `sequences`, in order, once a batch holding them has run."""
        if self._wake is None:
            raise RuntimeError("Batcher.start() was not called")
        if len(self._queue) >= self.max_queue:
            raise Overloaded(f"{len(self._queue)} requests are already waiting for the model (limit {self.max_queue})")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(sequences, sum(len(s) for s in sequences), future, time.perf_counter()))
        self._wake.set()
        return await future

    def _take(self) -> list[_Waiting]:
        """Waiting requests in arrival order up to the token budget (at least one); cancelled ones are dropped."""
        taken, tokens = [], 0
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # the caller went away
                self._queue.popleft()
                continue
            if taken and tokens + head.tokens > self.budget:
                break
            taken.append(self._queue.popleft())
            tokens += head.tokens
        return taken

    def _queued_tokens(self) -> int:
        return sum(w.tokens for w in self._queue)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                if self.max_wait and self._last_requests > 1 and self._queued_tokens() < self.budget:
                    delay = self._queue[0].queued + self.max_wait - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                batch = self._take()
                if not batch:
                    continue
                sequences = [s for w in batch for s in w.sequences]
                started = time.perf_counter()
                try:
                    vectors = await loop.run_in_executor(self._model, self._run, sequences)
                except Exception as exc:  # every caller of the batch gets the error; the loop goes on
                    LOG.exception("a batch of %d sequences failed", len(sequences))
                    for w in batch:
                        if not w.future.done():
                            w.future.set_exception(exc)
                    continue
                self._last_requests = len(batch)
                stats = BatchStats(len(batch), len(sequences), sum(w.tokens for w in batch),
                                   [started - w.queued for w in batch], time.perf_counter() - started)
                start = 0
                for w in batch:
                    stop = start + len(w.sequences)
                    if not w.future.done():
                        w.future.set_result(vectors[start:stop])
                    start = stop
                if self._on_batch is not None:
                    self._on_batch(stats)
