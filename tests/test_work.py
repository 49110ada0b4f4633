"""The embedding stream: reading ahead and writing behind the model gives the same chunks as one step at a time,
errors in any thread reach the caller, and an interrupt leaves complete chunks only."""

from __future__ import annotations

import numpy as np
import pytest

from embedctl.jobs.spec import JobSpec
from embedctl.pipeline import work
from embedctl.pipeline.corpus import iter_chunks
from embedctl.pipeline.encoder import load_encoder
from embedctl.pipeline.errors import ModelError, StorageError
from embedctl.pipeline.models import ModelRef
from embedctl.pipeline.plan import plan_job


@pytest.fixture
def corpus(write_corpus):
    texts = [f"text number {i} about {'rivers' if i % 3 else 'stones'}" for i in range(70)]
    texts[5], texts[40] = None, " "  # skipped rows
    texts[12] = texts[11]  # a duplicate
    return write_corpus({"id": [f"r{i}" for i in range(70)], "text": texts})


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
