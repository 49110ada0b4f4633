"""Indexes: Matryoshka slices, plain-FAISS files, versions published by an atomic pointer swap."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from embedctl.jobs.runner import run_embedded
from embedctl.jobs.spec import JobSpec
from embedctl.pipeline import versions
from embedctl.pipeline.errors import ConfigError, StorageError
from embedctl.pipeline.index import IndexReader, slice_normalise
from embedctl.pipeline.plan import WORK, index_dims
from tests import indexfiles


def test_slice_is_normalised_prefix():
    rng = np.random.default_rng(0)
    full = rng.normal(size=(50, 64)).astype(np.float32)
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    for d in (32, 16):
        expected = full[:, :d] / np.linalg.norm(full[:, :d], axis=1, keepdims=True)
        assert np.allclose(slice_normalise(full, d), expected, atol=1e-6)



def test_index_dims_keep_the_defaults_below_the_model_and_refuse_explicit_dims_they_cannot_honour():
    assert index_dims(64, None, (1024, 32, 16)) == [64, 32, 16]  # defaults above the model's dim are left out
    assert index_dims(64, (16, 32, 64)) == [64, 32, 16]
    with pytest.raises(ConfigError, match="--dims 1024 is above the model's dim 64"):
        index_dims(64, (1024, 32))
    with pytest.raises(ConfigError, match="--dims lists 32 twice"):
        index_dims(64, (32, 16, 32))


@pytest.fixture
def small_corpus(write_corpus):
    words = "dog cat house tree river stone light water fire city music paper glass cloud rain".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 6)) + f" {i}" for i in range(90)]
    texts[10] = None
    texts[20] = "   "
    return write_corpus({"id": [f"doc-{i}" for i in range(90)], "text": texts})


def _spec(corpus, out, model, **kw):
    return JobSpec(corpus=str(corpus), out=str(out), model=str(model), **{"dims": (32, 16), "chunk_rows": 25, **kw})


def test_index_files_are_plain_formats_and_slices_derive_from_full_vectors(tmp_path, small_corpus, tiny_qwen3):
    out = tmp_path / "out"
    report = run_embedded(_spec(small_corpus, out, tiny_qwen3)).to_dict()
    assert report["status"] == "published" and report["rows_indexed"] == 88
    assert report["rows_skipped"] == 2
    assert {(s["id"], s["reason"]) for s in report["skipped"]} == {("doc-10", "null"), ("doc-20", "empty")}
    version = versions.current_version(out)
    assert version.name == "v000001" and (out / "current").is_symlink()
    [rows_file] = indexfiles.segment_files(out, "rows.parquet")  # a corpus that fits one segment
    rows = pq.read_table(rows_file)  # plain pyarrow
    assert rows.num_rows == 88 and "doc-10" not in rows.column("id").to_pylist()
    chunk_dir = out / WORK / report["job_id"] / "chunks"
    full = np.concatenate([np.load(chunk_dir / f"chunk-{k:06d}.npy") for k in range(4)])  # plain numpy
    assert full.dtype == np.float16 and full.shape == (88, 64)
    for dim in (64, 32, 16):
        [index_path] = indexfiles.segment_files(out, f"index-{dim}.faiss")
        index = faiss.read_index(str(index_path))  # plain faiss
        assert index.ntotal == 88 and index.d == dim
        stored = np.stack([index.reconstruct(i) for i in range(88)])
        assert np.allclose(stored, slice_normalise(full, dim), atol=1e-6)


def test_search_maps_rows_to_ids_and_texts(tmp_path, small_corpus, tiny_qwen3):
    from embedctl.pipeline.encoder import load_encoder
    from embedctl.pipeline.models import ModelRef

    out = tmp_path / "out"
    run_embedded(_spec(small_corpus, out, tiny_qwen3))
    reader = IndexReader(out)
    encoder = load_encoder(ModelRef("tiny", tiny_qwen3), device="cpu")
    text = pq.read_table(small_corpus).column("text")[33].as_py()
    for dim in (64, 32, 16):
        hits = reader.search(encoder.encode([text]).vectors, k=3, dim=dim, ef=64)[0]
        assert hits[0].id == "doc-33" and hits[0].text == text and hits[0].row == 33
        assert hits[0].score == pytest.approx(1.0, abs=1e-2)


def test_failed_build_leaves_previous_version_current(tmp_path, small_corpus, tiny_qwen3, monkeypatch):
    import embedctl.pipeline.build
    import embedctl.pipeline.segments

    out = tmp_path / "out"
    run_embedded(_spec(small_corpus, out, tiny_qwen3))
    before = IndexReader(out)
    calls = []

    real = embedctl.pipeline.segments.build_index_file

    def failing_build(folder, dim, *args, **kwargs):
        calls.append(dim)
        if len(calls) == 2:
            raise StorageError("no space left on the device of index-32.faiss")
        return real(folder, dim, *args, **kwargs)

    monkeypatch.setattr(embedctl.pipeline.build, "build_index_file", failing_build)
    with pytest.raises(StorageError, match="no space left"):
        run_embedded(_spec(small_corpus, out, tiny_qwen3, hnsw_m=16))  # new index settings: rebuild
    assert versions.current_version(out).name == "v000001"
    assert [p.name for p in (out / "versions").iterdir()] == ["v000001"]  # no half-built version
    assert IndexReader(out).info == before.info
    built = []

    def counting_build(folder, dim, *args, **kwargs):
        built.append(dim)
        return real(folder, dim, *args, **kwargs)

    monkeypatch.setattr(embedctl.pipeline.build, "build_index_file", counting_build)
    again = run_embedded(_spec(small_corpus, out, tiny_qwen3, hnsw_m=16))
    assert again.version == "v000002" and again.segments_built == 1
    assert built == [32, 16]  # the re-run built only the pieces the failed run had not: 64 was done


def test_publish_swaps_atomically_and_readers_keep_their_version(tmp_path, small_corpus, tiny_qwen3):
    out = tmp_path / "out"
    run_embedded(_spec(small_corpus, out, tiny_qwen3))
    reader_v1 = IndexReader(out)
    report = run_embedded(_spec(small_corpus, out, tiny_qwen3, dims=(16,)))
    assert report.version == "v000002" and report.rows_embedded == 0  # vectors reused
    assert reader_v1.dir.name == "v000001" and reader_v1.segments[0].index(32).ntotal == 88
    assert IndexReader(out).dims == [64, 16]
