"""The embedding stream: reading ahead and writing behind the model gives the same chunks as one step at a time,
errors in any thread reach the caller, and an interrupt leaves complete chunks only."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from embedctl.jobs.spec import JobSpec
from embedctl.pipeline import work
from embedctl.pipeline.corpus import iter_chunks
from embedctl.pipeline.encoder import load_encoder
from embedctl.pipeline.errors import ModelError, StorageError
from embedctl.pipeline.models import ModelRef
from embedctl.pipeline.plan import plan_job


def _texts():
    texts = [f"text number {i} about {'rivers' if i % 3 else 'stones'}" for i in range(70)]
    texts[5], texts[40] = None, " "  # skipped rows
    texts[12] = texts[11]  # a duplicate
    return texts


@pytest.fixture
def corpus(write_corpus):
    return write_corpus({"id": [f"r{i}" for i in range(70)], "text": _texts()})


@pytest.fixture(scope="module")
def encoder(tiny_qwen3):
    return load_encoder(ModelRef("tiny", tiny_qwen3), device="cpu", shm="off")


def _plan(corpus, out, model):
    return plan_job(JobSpec(corpus=str(corpus), out=str(out), model=str(model), chunk_rows=16, dims=()))


def _stream(plan, encoder, overlap, **kw):
    return list(work.embed_stream(plan, iter_chunks(plan.corpus), encoder, overlap=overlap, **kw))


def test_overlapped_stream_writes_the_same_chunks_as_serial(tmp_path, corpus, encoder, tiny_qwen3):
    plans = {mode: _plan(corpus, tmp_path / mode, tiny_qwen3) for mode in ("serial", "overlap")}
    progress = {mode: [] for mode in plans}
    reports = {mode: _stream(plan, encoder, mode == "overlap", on_progress=progress[mode].append)
               for mode, plan in plans.items()}
    assert [r["chunk"] for r in reports["overlap"]] == list(range(5))  # in order, each once
    for a, b in zip(reports["serial"], reports["overlap"], strict=True):
        timing = ("seconds", "finished", "finished_ts")
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    for number in range(5):
        serial, overlap = (plans[m].store.read_vectors(number) for m in ("serial", "overlap"))
        assert np.array_equal(serial, overlap)
        assert plans["serial"].store.read_rows(number).equals(plans["overlap"].store.read_rows(number))
    assert sum(progress["overlap"]) == sum(progress["serial"]) == 70


def test_a_failed_write_stops_the_stream_after_the_complete_chunks(tmp_path, corpus, encoder, tiny_qwen3,
                                                                   monkeypatch):
    from embedctl.pipeline.vectors import ChunkStore

    plan = _plan(corpus, tmp_path / "out", tiny_qwen3)
    original = ChunkStore.write

    def write(store, number, *args, **kwargs):
        if number == 2:
            raise StorageError("disk full")
        return original(store, number, *args, **kwargs)

    monkeypatch.setattr(ChunkStore, "write", write)
    with pytest.raises(StorageError, match="disk full"):
        _stream(plan, encoder, overlap=True)
    assert plan.store.complete() == {0, 1}


def test_a_model_that_fails_to_load_fails_the_stream(tmp_path, corpus, tiny_qwen3):
    plan = _plan(corpus, tmp_path / "out", tiny_qwen3)

    def load():
        raise ModelError("cannot load the model")

    with pytest.raises(ModelError, match="cannot load"):
        _stream(plan, load, overlap=True)
    assert plan.store.complete() == set()


def test_an_interrupt_leaves_complete_chunks_only(tmp_path, corpus, encoder, tiny_qwen3):
    plan = _plan(corpus, tmp_path / "out", tiny_qwen3)
    seen = []

    def progress(n):
        seen.append(n)
        if sum(seen) > 40:  # in the third chunk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _stream(plan, encoder, overlap=True, on_progress=progress)
    complete = plan.store.complete()
    assert complete == set(range(len(complete))) and 1 <= len(complete) <= 2
    assert not list(plan.store.root.glob(".*.tmp")) and not list(plan.store.root.glob("*.tmp"))
    for number in complete:
        assert len(plan.store.read_vectors(number)) == plan.store.read_rows(number).num_rows
    resumed = list(work.embed_stream(plan, iter_chunks(plan.corpus, set(work.missing_chunks(plan))), encoder))
    assert [r["chunk"] for r in resumed] == sorted(set(range(5)) - complete)


def test_compile_is_a_job_setting_that_does_not_change_the_plan(tmp_path, corpus, tiny_qwen3):
    from embedctl.pipeline.errors import ConfigError

    base = {"corpus": str(corpus), "out": str(tmp_path / "o"), "model": str(tiny_qwen3), "dims": []}
    plain, fast = plan_job(JobSpec.from_dict(base)), plan_job(JobSpec.from_dict({**base, "compile": True}))
    off = plan_job(JobSpec.from_dict({**base, "compile": "off"}))
    assert (plain.compile, fast.compile, off.compile) == ("auto", "on", "off")
    assert plain.plan_id == fast.plan_id == off.plan_id  # same vectors: a compiled run resumes an eager one
    with pytest.raises(ConfigError, match="--compile must be one of auto, on, off"):
        JobSpec.from_dict({**base, "compile": "sometimes"})
    old = {**fast.to_dict(), "compile": True}  # a plan written before --compile auto
    assert type(fast).from_dict(old).compile == "on"


def _small_change(out, corpus, write_corpus, encoder, model):
    """Index `corpus` into `out` (5 chunks of 16), then write the corpus with one text changed in each chunk."""
    _plan(corpus, out, model).save()
    _stream(_plan(corpus, out, model), encoder, True)
    texts = _texts()
    for i in (1, 20, 33, 50, 66):  # one changed text in each chunk
        texts[i] = f"a changed text {i} about lakes"
    texts[67] = texts[20]  # the same changed text in two chunks: embedded once
    return write_corpus({"id": [f"r{i}" for i in range(70)], "text": texts}, name="changed.parquet")


@pytest.mark.parametrize("overlap", [True, False])
def test_a_small_change_over_many_chunks_runs_the_model_once(tmp_path, corpus, write_corpus, encoder, tiny_qwen3,
                                                             monkeypatch, overlap):
    from embedctl.pipeline.cache import EmbeddingCache

    changed = _small_change(tmp_path / "out", corpus, write_corpus, encoder, tiny_qwen3)
    calls = []
    original_run = type(encoder).run
    monkeypatch.setattr(encoder, "run", lambda prepared, **kw: calls.append(prepared.unique) or original_run(
        encoder, prepared, **kw), raising=False)

    def rerun(out, gather):
        monkeypatch.setattr(work, "GATHER_TEXTS", gather)
        calls.clear()
        plan = _plan(changed, out, tiny_qwen3)
        progress = []
        reports = _stream(plan, encoder, overlap, cache=EmbeddingCache(plan.cache_sources()),
                          on_progress=progress.append)
        assert sum(progress) == 70
        return plan, reports, list(calls)

    shutil.copytree(tmp_path / "out", tmp_path / "alone")
    gathered, reports, gathered_calls = rerun(tmp_path / "out", work.GATHER_TEXTS)
    alone, alone_reports, alone_calls = rerun(tmp_path / "alone", 0)  # one encoder call a chunk, as before
    assert gathered_calls == [5] and alone_calls == [1, 1, 1, 1, 2]
    assert [(r["chunk"], r["embedded"], r["unique"]) for r in reports] == [(0, 1, 1), (1, 1, 1), (2, 1, 1),
                                                                         (3, 1, 1), (4, 2, 2)]
    timing = ("seconds", "finished", "finished_ts", "files", "run_id")
    for a, b in zip(reports, alone_reports, strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    scratch = _plan(changed, tmp_path / "scratch", tiny_qwen3)  # no cache: every text through the model
    _stream(scratch, encoder, overlap)
    for number in range(5):
        assert gathered.store.read_rows(number).equals(scratch.store.read_rows(number))
        # the cached rows are the stored vectors; a changed text ran in another batch (other padding): equal up to
        # the float16 the store keeps
        cached = ~np.char.startswith(np.array(gathered.store.read_rows(number).column("text").to_pylist()), "a changed")
        mine, before = gathered.store.read_vectors(number), alone.store.read_vectors(number)
        assert np.array_equal(mine[cached], before[cached]) and np.allclose(mine, before, atol=2e-3)
        # from scratch, every text ran in other batches: equal up to the float16 the store keeps
        assert np.allclose(gathered.store.read_vectors(number), scratch.store.read_vectors(number), atol=2e-3)


def test_an_interrupt_in_a_gathered_call_leaves_complete_chunks_only(tmp_path, corpus, write_corpus, encoder,
                                                                    tiny_qwen3):
    from embedctl.pipeline.cache import EmbeddingCache

    changed = _small_change(tmp_path / "out", corpus, write_corpus, encoder, tiny_qwen3)
    plan = _plan(changed, tmp_path / "out", tiny_qwen3)
    seen = []

    def progress(n):
        seen.append(n)
        if len(seen) == 6:  # the cached rows of the 5 chunks are counted; then the model's first batch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _stream(plan, encoder, True, cache=EmbeddingCache(plan.cache_sources()), on_progress=progress)
    assert plan.store.complete() == set()  # the 5 chunks wait for the one call
    assert not list(plan.store.root.glob(".*.tmp")) and not list(plan.store.root.glob("*.tmp"))
    progress = []
    resumed = _stream(plan, encoder, True, cache=EmbeddingCache(plan.cache_sources()), on_progress=progress.append)
    assert [r["chunk"] for r in resumed] == list(range(5)) and sum(progress) == 70
    assert [r["embedded"] for r in resumed] == [1, 1, 1, 1, 2]


def test_groups_gather_mostly_cached_chunks_within_their_limits(monkeypatch):
    from types import SimpleNamespace

    def chunk(misses, rows=100, dim=4):
        return SimpleNamespace(miss=np.arange(misses), texts=["t"] * rows, vectors=np.zeros((rows, dim), np.float32))

    def sizes(works):
        return [[len(w.miss) for w in group] for group in work._groups(works)]

    monkeypatch.setattr(work, "GATHER_TEXTS", 10)
    monkeypatch.setattr(work, "GATHER_CHUNKS", 3)
    # a chunk mostly to embed runs alone, between the groups around it; a group ends at the text or chunk limit
    assert sizes([chunk(2), chunk(0), chunk(80), chunk(4), chunk(4), chunk(4), chunk(1), chunk(1), chunk(1),
                  chunk(1)]) == [[2, 0], [80], [4, 4], [4, 1, 1], [1, 1]]
    monkeypatch.setattr(work, "GATHER_BYTES", 2 * 100 * 4 * 4)  # the vectors of two chunks
    assert sizes([chunk(1)] * 5) == [[1, 1], [1, 1], [1]]
