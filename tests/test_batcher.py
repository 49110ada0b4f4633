"""The server's batcher and cache without HTTP: concurrent requests merge into token-budget batches, a full queue
refuses at once, a failed batch fails only its own requests, and repeated texts skip the model."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from embedctl.serve.batcher import Batcher, Overloaded


def _model(calls: list, gate: threading.Event | None = None, fail_on: int | None = None,
           entered: threading.Event | None = None):
    """A model that records its calls; with `gate`, each call waits for it (after setting `entered`)."""

    def run(sequences: list[list[int]]) -> np.ndarray:
        if entered is not None:
            entered.set()
        if gate is not None:
            assert gate.wait(10), "the test never opened the gate"
        calls.append([list(s) for s in sequences])
        if fail_on is not None and any(s[0] == fail_on for s in sequences):
            raise RuntimeError("model failed")
        return np.array([[float(s[0]), float(len(s))] for s in sequences], dtype=np.float32)

    return run


async def _busy(entered: threading.Event) -> None:
    """Until the model thread is inside a call."""
    assert await asyncio.to_thread(entered.wait, 10), "the model was never called"


async def _queued(batcher: Batcher, n: int) -> None:
    """Until `n` requests wait in the batcher's queue (a submit queues its request at its first step)."""
    for _ in range(1000):
        if batcher.waiting == n:
            return
        await asyncio.sleep(0)  # let the submitting tasks run
    raise AssertionError(f"{batcher.waiting} requests queued, not {n}")


def test_requests_that_arrive_while_the_model_runs_form_the_next_batch():
    async def main():
        calls, gate, entered = [], threading.Event(), threading.Event()
        batcher = Batcher(_model(calls, gate, entered=entered), budget=100, max_wait=0)
        batcher.start()
        first = asyncio.create_task(batcher.submit([[1, 1, 1]]))
        await _busy(entered)  # the model is busy with the first request
        rest = [asyncio.create_task(batcher.submit([[n] * 10, [n + 100] * 5])) for n in range(2, 8)]
        await _queued(batcher, 6)
        gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return calls, results

    calls, results = asyncio.run(main())
    assert [len(c) for c in calls] == [1, 12]  # 6 requests of 15 tokens (90 <= 100) merged into one call
    assert results[0].tolist() == [[1, 3]]
    for n, result in zip(range(2, 8), results[1:], strict=True):  # each caller gets its own rows, in order
        assert result.tolist() == [[n, 10], [n + 100, 5]]


def test_the_token_budget_splits_batches_and_a_long_request_runs_alone():
    async def main():
        calls, gate, entered = [], threading.Event(), threading.Event()
        batcher = Batcher(_model(calls, gate, entered=entered), budget=20, max_wait=0)
        batcher.start()
        blocker = asyncio.create_task(batcher.submit([[0]]))
        await _busy(entered)
        tasks = [asyncio.create_task(batcher.submit([[n] * 8])) for n in range(1, 5)]
        tasks.append(asyncio.create_task(batcher.submit([[9] * 50])))  # over the budget by itself
        await _queued(batcher, 5)
        gate.set()
        await asyncio.gather(blocker, *tasks)
        await batcher.close()
        return calls

    calls = asyncio.run(main())
    assert [[s[0] for s in c] for c in calls] == [[0], [1, 2], [3, 4], [9]]


def test_a_lone_client_never_waits():
    """A client alone (the last batch held its request only) is answered at once, however long `max_wait`."""
    async def main():
        calls, stats, took = [], [], []
        batcher = Batcher(_model(calls), budget=1000, max_wait=30.0, on_batch=stats.append)
        batcher.start()
        for n in range(3):
            t0 = time.perf_counter()
            await asyncio.wait_for(batcher.submit([[n]]), 5.0)  # well under the 30 s a waiting request takes
            took.append(time.perf_counter() - t0)
        await batcher.close()
        return calls, stats, took

    calls, stats, took = asyncio.run(main())
    assert [[s[0] for s in c] for c in calls] == [[0], [1], [2]]
    assert max(took) < 5.0 and all(w < 5.0 for s in stats for w in s.waits), (took, stats)


def test_concurrent_clients_wait_for_each_other():
    """Once a batch merged several requests, the first request of the next one waits `max_wait` for company."""
    async def main():
        calls, stats, gate, entered = [], [], threading.Event(), threading.Event()
        batcher = Batcher(_model(calls, gate, entered=entered), budget=1000, max_wait=0.2, on_batch=stats.append)
        batcher.start()
        lone = asyncio.create_task(batcher.submit([[1]]))
        await _busy(entered)
        pair = [asyncio.create_task(batcher.submit([[n]])) for n in (2, 3)]
        await _queued(batcher, 2)
        gate.set()
        await asyncio.gather(lone, *pair)  # batches [1] and [2, 3]: the last one merged two clients
        await asyncio.gather(batcher.submit([[4]]), batcher.submit([[5]]))
        await batcher.close()
        return calls, stats

    calls, stats = asyncio.run(main())
    assert [[s[0] for s in c] for c in calls] == [[1], [2, 3], [4, 5]]
    assert stats[2].waits[0] >= 0.2 - 0.01, stats  # [4] waited for company (asyncio may wake a tick early)


def test_a_full_queue_refuses_and_a_failed_batch_fails_only_its_requests():
    async def main():
        calls, gate, entered = [], threading.Event(), threading.Event()
        batcher = Batcher(_model(calls, gate, fail_on=66, entered=entered), budget=4, max_wait=0, max_queue=2)
        batcher.start()
        running = asyncio.create_task(batcher.submit([[1]]))
        await _busy(entered)
        bad = asyncio.create_task(batcher.submit([[66, 1, 1, 1]]))
        good = asyncio.create_task(batcher.submit([[5, 1, 1, 1]]))
        await _queued(batcher, 2)
        with pytest.raises(Overloaded):
            await batcher.submit([[7]])
        gate.set()
        results = await asyncio.gather(running, bad, good, return_exceptions=True)
        await batcher.close()
        return results

    running, bad, good = asyncio.run(main())
    assert running.tolist() == [[1, 1]] and isinstance(bad, RuntimeError) and good.tolist() == [[5, 4]]


def test_the_engine_embeds_as_the_encoder_does_and_caches_repeated_texts(tiny_qwen3):
    from embedctl.pipeline.encoder import load_encoder
    from embedctl.pipeline.models import ModelRef, format_instruction
    from embedctl.serve.engine import Engine

    encoder = load_encoder(ModelRef("tiny", tiny_qwen3), device="cpu", shm="off")
    prefix = format_instruction("Find the passage", "qwen3")
    texts = ["a river", "a dog that barks", "a river", "stone"]

    async def main():
        counted = []
        engine = Engine(encoder, cache=100, max_wait=0, max_queue=10, on_cache=lambda h, m: counted.append((h, m)))
        engine.start()
        first = await engine.embed_texts(texts, prefix)
        second = await engine.embed_texts(["stone", "new text"], prefix)
        tokens = await engine.embed_tokens(encoder.tokenize([prefix + "a river"])[0])
        await engine.close()
        return first, second, tokens, counted

    first, second, tokens, counted = asyncio.run(main())
    expected = encoder.encode(texts, prefix=prefix)
    assert np.allclose(first.vectors, expected.vectors, atol=1e-5) and first.tokens == expected.tokens + len(
        encoder.tokenize([prefix + "a river"])[0][0])
    assert counted == [(0, 4), (1, 1)]  # hits: none in the first request (its repeat is embedded once), "stone"
    assert np.allclose(second.vectors[0], expected.vectors[3], atol=1e-5)
    assert np.allclose(tokens.vectors[0], expected.vectors[0], atol=1e-5)  # ids with the end token already added


def test_a_served_index_follows_current_and_keeps_the_old_version_when_the_new_one_is_damaged(tmp_path, tiny_qwen3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embedctl.jobs.runner import run_embedded
    from embedctl.jobs.spec import JobSpec
    from embedctl.pipeline.manifest import read_info
    from embedctl.serve.indexes import ServedIndexes
    from tests import indexfiles

    corpus, out = tmp_path / "c.parquet", tmp_path / "docs"

    def publish(texts: list[str]) -> Path:
        pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts}), corpus)
        run_embedded(JobSpec(corpus=str(corpus), out=str(out), model=str(tiny_qwen3), dims=(32,), chunk_rows=100))
        return indexfiles.current(out)

    v1 = publish([f"text number {i}" for i in range(120)])
    served = ServedIndexes([out]).get("docs")

    async def reader_dir():
        return (await served.current()).dir

    assert asyncio.run(reader_dir()) == v1
    held = served.reader  # a request that started on v1 keeps its reader
    v2 = publish([f"text number {i}" for i in range(130)])
    [added] = [s for s in read_info(v2).segments if s.rows == 10]
    index_file = added.folder(out) / "index-32.faiss"
    index_file.write_bytes(bytes(b ^ 0xFF for b in index_file.read_bytes()))  # garbled, same size
    assert asyncio.run(reader_dir()) == v1 and served.failed == str(v2)  # logged, the old version stays
    assert len(held.search(np.ones((1, 64), np.float32), k=3)[0]) == 3
    index_file.unlink()
    v3 = publish([f"text number {i}" for i in range(140)])  # the next run rebuilds the damaged segment
    assert asyncio.run(reader_dir()) == v3 and served.reloads == 1 and served.failed is None
