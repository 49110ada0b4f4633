"""Overlay chunks: a re-index whose texts are mostly unchanged stores only the vectors it computed and points at the
stored ones (`pipeline/vectors.py`). Runs through the CLI as users run it, on the tiny Qwen3 model: what it stores,
that every reader sees the same vectors a whole chunk would hold, that retention and `cache prune` keep what the
pointers need, that damage behind a pointer is found and repaired, and that a chain of re-indexes is compacted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from embedctl.cli import main
from embedctl.jobs.runner import run_embedded
from embedctl.jobs.spec import JobSpec
from embedctl.pipeline import vectors
from embedctl.pipeline.plan import load_plan, work_in_use
from embedctl.pipeline.storage import LocalStorage
from tests import indexfiles

ROWS, CHUNK = 600, 100
WORDS = "dog cat house tree river stone light water fire city music paper glass cloud rain bird fish road".split()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _texts(n: int, edits: dict[int, str] | None = None) -> list[str]:
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 6)) + f" {i}" for i in range(n)]
    for i, text in (edits or {}).items():
        texts[i] = text
    return texts


def _corpus(path: Path, texts: list[str]) -> Path:
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts}), path)
    return path


def _index(corpus: Path, out: Path, model: Path, *extra) -> dict:
    result = invoke("index", corpus, "--out", out, "--model", model, "--chunk-rows", CHUNK, "--dims", 32, "--quiet",
                    "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _works(out: Path) -> dict[str, vectors.ChunkStore]:
    return {p.name: load_plan(p).store for p in sorted((out / "work").iterdir()) if p.is_dir()}


def _current_store(out: Path) -> vectors.ChunkStore:
    from embedctl.pipeline.manifest import read_info

    return load_plan(out / "work" / read_info(indexfiles.current(out)).plan_id).store


def _embed(model: Path, texts: list[str]) -> np.ndarray:
    from embedctl.pipeline.encoder import load_encoder
    from embedctl.pipeline.models import ModelRef

    return load_encoder(ModelRef("tiny", model), device="cpu", shm="off").encode(texts).vectors


SPREAD = {i: f"edited text {i} about rivers and stones" for i in range(7, ROWS, 50)}  # 12 rows, 2 in each chunk


@pytest.fixture
def reindexed(tmp_path, tiny_qwen3):
    """An index of 600 rows, then a re-index of the corpus with 12 rows edited across all 6 chunks."""
    corpus, out = tmp_path / "c.parquet", tmp_path / "idx"
    _index(_corpus(corpus, _texts(ROWS)), out, tiny_qwen3)
    [first] = _works(out)
    report = _index(_corpus(corpus, _texts(ROWS, SPREAD)), out, tiny_qwen3)
    return corpus, out, first, report


def test_a_reindex_of_spread_edits_stores_only_the_vectors_it_computed(reindexed, tiny_qwen3):
    corpus, out, first, report = reindexed
    assert (report["rows_embedded"], report["rows_reused"], report["rows_indexed"]) == (12, 588, 600)
    works = _works(out)
    assert first in works and len(works) == 2  # the published plan reads vectors in the first plan's folder: kept
    old, new = works[first], _current_store(out)
    for number in range(ROWS // CHUNK):
        own = np.load(new.vectors_path(number))
        assert own.shape[0] == 2  # the two edited rows; the 98 others are pointers
        report = new.read_report(number)
        assert [s["chunk"] for s in report["sources"]] == [f"work/{first}/chunks/chunk-{number:06d}"]
        assert sum(count for _s, _start, count in report["layout"]) == CHUNK
        logical, before = new.read_vectors(number), old.read_vectors(number)
        picked = np.array([97, 3, 50, 3])
        np.testing.assert_array_equal(new.read_vectors(number, rows=picked), logical[picked])  # (what builds read)
        rows = new.read_rows(number).column("row").to_numpy()
        unchanged = ~np.isin(rows, list(SPREAD))
        np.testing.assert_array_equal(logical[unchanged], before[unchanged])  # the very vectors stored before
        edited = rows[~unchanged]
        fresh = _embed(tiny_qwen3, [SPREAD[int(r)] for r in edited])
        cosine = np.sum(fresh * logical[~unchanged].astype(np.float32), axis=1) / np.linalg.norm(fresh, axis=1)
        assert (cosine > 0.999).all(), cosine  # (float16 storage)
    total = sum(p.stat().st_size for p in (out / "work" / new.folder.key.split("/")[1]).rglob("*.npy"))
    whole = sum(p.stat().st_size for p in (out / "work" / first).rglob("*.npy"))
    assert total < 0.05 * whole, (total, whole)
    assert invoke("verify", out).exit_code == 0
    # cache prune keeps the folder the current plan reads from; the search answers as before
    pruned = invoke("cache", "prune", out)
    assert pruned.exit_code == 0, pruned.output
    assert set(_works(out)) == set(works)
    hits = invoke("query", out, SPREAD[57], "-k", 10, "--json")
    assert hits.exit_code == 0, hits.output
    current = _texts(ROWS, SPREAD)
    found = json.loads(hits.stdout)
    assert len(found) == 10 and all(h["text"] == current[int(h["id"][1:])] for h in found)


def test_damage_behind_a_pointer_is_named_by_verify_and_repaired(reindexed, tiny_qwen3):
    corpus, out, first, _report = reindexed
    source = out / "work" / first / "chunks" / "chunk-000003.npy"
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF
    source.write_bytes(bytes(data))
    checked = invoke("verify", out)
    assert checked.exit_code == 1 and f"damaged  {source}" in checked.stdout, checked.output
    repaired = invoke("verify", out, "--repair", "--quiet")
    assert repaired.exit_code == 0, repaired.output
    assert invoke("verify", out).exit_code == 0
    # chunk 3 was embedded again, whole: nothing reads the damaged file any more
    store = _current_store(out)
    assert "layout" not in store.read_report(3) and np.load(store.vectors_path(3)).shape[0] == CHUNK
    current = _texts(ROWS, SPREAD)
    hits = json.loads(invoke("query", out, current[350], "-k", 10, "--json").stdout)
    assert len(hits) == 10 and all(h["text"] == current[int(h["id"][1:])] for h in hits)


def test_a_damaged_layout_is_named_by_verify(reindexed):
    _corpus_path, out, _first, _report = reindexed
    report_path = _current_store(out).report_path(2)
    report = json.loads(report_path.read_text())
    report["layout"][0][2] += 1  # still JSON, but one row too many
    report_path.write_text(json.dumps(report))
    checked = invoke("verify", out)
    assert checked.exit_code == 1 and f"damaged  {report_path}" in checked.stdout, checked.output
    assert "its layout covers 101 rows" in checked.stdout


def test_nightly_appends_keep_one_copy_of_the_vectors(tmp_path, tiny_qwen3):
    """Unchanged chunks point at the stored vectors instead of copying them: after re-indexes of a growing
    corpus the output folder holds each vector once (plus the small files of the new rows), and only the folders
    the current plan reads from."""
    corpus, out = tmp_path / "c.parquet", tmp_path / "idx"
    rows = 250
    for night in range(5):
        report = _index(_corpus(corpus, _texts(rows)), out, tiny_qwen3)
        assert report["rows_embedded"] == (rows if night == 0 else 30)
        npy = list((out / "work").rglob("chunk-*.npy"))
        stored = sum(np.load(p, mmap_mode="r").shape[0] for p in npy)
        # every vector once, but the few rows of a tail chunk that was mostly new when stored (written whole again
        # once mostly new rows join them: below OVERLAY_SHARE a chunk does not point)
        assert rows <= stored <= rows + CHUNK * vectors.OVERLAY_SHARE, (night, stored)
        current = _current_store(out).folder.key.split("/")[1]
        assert set(_works(out)) == work_in_use(LocalStorage(out), [current])  # no folder nothing points into
        rows += 30
    assert invoke("verify", out).exit_code == 0


def test_a_chain_of_reindexes_is_compacted_and_old_folders_go(tmp_path, tiny_qwen3, monkeypatch):
    monkeypatch.setattr(vectors, "MAX_SOURCES", 3)
    corpus, out = tmp_path / "c.parquet", tmp_path / "idx"
    edits: dict[int, str] = {}
    spec = JobSpec(corpus=str(corpus), out=str(out), model=str(tiny_qwen3), dims=(32,), chunk_rows=CHUNK)
    seen = []
    for night in range(6):
        edits.update({i: f"night {night} text {i} about glass" for i in range(night, ROWS, 100)})
        report = run_embedded(JobSpec(**{**spec.__dict__, "corpus": str(_corpus(corpus, _texts(ROWS, edits)))}))
        assert report.rows_embedded == (ROWS if night == 0 else ROWS // 100)
        store = _current_store(out)
        sources = [len(store.read_report(k).get("sources", [])) for k in range(ROWS // CHUNK)]
        own = [np.load(store.vectors_path(k)).shape[0] for k in range(ROWS // CHUNK)]
        seen.append((sources, own, len(_works(out))))
        assert max(sources) <= vectors.MAX_SOURCES - 1  # with its own file: at most MAX_SOURCES files a chunk
        assert len(_works(out)) <= vectors.MAX_SOURCES  # folders nothing points at any more are removed
    # nights 1 and 2 point (one own row per chunk); night 3 would need a 4th file: written whole
    assert [s[0][0] for s in seen] == [0, 1, 2, 0, 1, 2], seen
    assert [s[1][0] for s in seen] == [CHUNK, 1, 1, CHUNK, 1, 1], seen
    assert [s[2] for s in seen] == [1, 2, 3, 1, 2, 3], seen
    store = _current_store(out)
    texts = _texts(ROWS, edits)
    stored = np.concatenate([store.read_vectors(k) for k in range(ROWS // CHUNK)]).astype(np.float32)
    fresh = _embed(tiny_qwen3, texts)
    cosine = np.sum(fresh * stored, axis=1) / np.linalg.norm(fresh, axis=1)
    assert (cosine > 0.999).all(), cosine.min()
    assert invoke("verify", out).exit_code == 0
