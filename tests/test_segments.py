"""Segmented indexes: a re-index keeps the segments of the previous version, marks deleted and changed rows in
their deletion sets and builds only a segment of the new rows; searches skip deleted rows inside FAISS; the merge
policy keeps the segment count and the deleted share bounded; versions share segment files; retention removes a
segment only when no kept version uses it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedctl.jobs.runner import run_embedded
from embedctl.jobs.spec import JobSpec
from embedctl.pipeline.index import IndexReader
from embedctl.pipeline.manifest import read_info
from embedctl.pipeline.merge import MergePolicy, SegmentState
from tests import indexfiles

WORDS = "dog cat house tree river stone light water fire city music paper glass cloud rain bird fish road".split()


def _texts(n: int, salt: str = "") -> list[str]:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 6)) + f" {salt}{i}" for i in range(n)]


def _write(path: Path, ids: list, texts: list) -> Path:
    pq.write_table(pa.table({"id": ids, "text": texts}), path)
    return path


def _spec(corpus: Path, out: Path, model: Path, **kw) -> JobSpec:
    return JobSpec(corpus=str(corpus), out=str(out), model=str(model), **{"dims": (32,), "chunk_rows": 100,
                                                                           "hnsw_m": 16, "ef_construction": 80, **kw})


def _vectors(model: Path, texts: list[str]) -> np.ndarray:
    from embedctl.pipeline.encoder import load_encoder
    from embedctl.pipeline.models import ModelRef

    return load_encoder(ModelRef("tiny", model), device="cpu", shm="off").encode(texts).vectors


def test_a_reindex_keeps_the_segment_marks_deletions_and_builds_only_the_new_rows(tmp_path, tiny_qwen3):
    ids, texts = [f"d{i}" for i in range(300)], _texts(300)
    corpus = _write(tmp_path / "c.parquet", ids, texts)
    out = tmp_path / "out"
    first = run_embedded(_spec(corpus, out, tiny_qwen3))
    assert first.segments == first.segments_built == 1
    [segment_v1] = read_info(indexfiles.current(out)).segments
    files_v1 = {p.name: p.stat().st_ino for p in segment_v1.folder(out).iterdir()}
    new_texts = list(texts)
    for i in range(0, 300, 30):
        new_texts[i] = f"changed {i} about rivers"  # 10 changed
    keep = [i for i in range(300) if i not in range(5, 300, 60)]  # 5 deleted
    new_ids = [ids[i] for i in keep] + [f"new{i}" for i in range(5)]
    new_texts = [new_texts[i] for i in keep] + [f"added {i} about clouds" for i in range(5)]
    _write(corpus, new_ids, new_texts)
    second = run_embedded(_spec(corpus, out, tiny_qwen3))
    assert (second.rows_indexed, second.rows_embedded, second.rows_deleted) == (300, 15, 5)
    assert second.segments == 2 and second.segments_built == 1 and second.rows_rewritten == 0
    kept, added = read_info(indexfiles.current(out)).segments
    assert kept.id == segment_v1.id and kept.deleted == 15 and added.rows == 15
    # the version refers to the same segment files: no copy, no rewrite
    assert {p.name: p.stat().st_ino for p in kept.folder(out).iterdir()} == files_v1
    assert sorted(indexfiles.live_ids(out)) == sorted(new_ids)
    # searches see the new texts only: a changed row's old text is not found, its new one is
    reader = IndexReader(out)
    old, new = _vectors(tiny_qwen3, [texts[30], new_texts[new_ids.index("d30")]])
    hits = reader.search(np.stack([old, new]), k=5)
    assert all(h.text == new_texts[new_ids.index(h.id)] for q in hits for h in q)
    assert hits[1][0].id == "d30" and hits[1][0].score == pytest.approx(1.0, abs=1e-3)
    assert all(len({h.id for h in q}) == len(q) for q in hits)


def test_deleted_rows_are_skipped_inside_faiss_so_k_hits_still_come_back(tmp_path, tiny_qwen3, monkeypatch):
    ids, texts = [f"d{i}" for i in range(400)], _texts(400)
    corpus = _write(tmp_path / "c.parquet", ids, texts)
    out = tmp_path / "out"
    run_embedded(_spec(corpus, out, tiny_qwen3, segment_rows=400))
    survivors = list(range(0, 400, 10))  # 90% of the rows deleted; the policy would rewrite: make it keep them
    _write(corpus, [ids[i] for i in survivors], [texts[i] for i in survivors])
    from embedctl.pipeline import build

    monkeypatch.setattr(build, "policy_of", lambda plan: MergePolicy(segment_rows=plan.segment_rows, max_deleted=1.01))
    run_embedded(_spec(corpus, out, tiny_qwen3, segment_rows=400))
    [segment] = read_info(indexfiles.current(out)).segments
    assert segment.deleted == 360  # still the one segment, with its deletions
    reader = IndexReader(out)
    for k in (10, 20):
        hits = reader.search(_vectors(tiny_qwen3, [texts[5]]), k=k)[0]
        assert len(hits) == k and {h.id for h in hits} <= {ids[i] for i in survivors}


def test_an_incremental_version_holds_what_a_build_from_scratch_holds(tmp_path, tiny_qwen3):
    ids, texts = [f"d{i}" for i in range(500)], _texts(500)
    corpus = _write(tmp_path / "c.parquet", ids, texts)
    run_embedded(_spec(corpus, tmp_path / "inc", tiny_qwen3))
    changed = [t if i % 50 else f"revised {t}" for i, t in enumerate(texts)]
    _write(corpus, ids, changed)
    run_embedded(_spec(corpus, tmp_path / "inc", tiny_qwen3))
    shutil.copy(corpus, tmp_path / "fresh.parquet")
    run_embedded(_spec(tmp_path / "fresh.parquet", tmp_path / "fresh", tiny_qwen3))
    queries = _vectors(tiny_qwen3, changed[::7])
    results = {}
    for name in ("inc", "fresh"):
        reader = IndexReader(tmp_path / name)
        assert len(reader.segments) == (2 if name == "inc" else 1)
        scores, segments, positions = reader.search_positions(queries, k=10, exact=True)
        looked = [seg.lookup(positions[segments == n]) for n, seg in enumerate(reader.segments)]
        results[name] = [[looked[s][int(p)][0] for s, p in zip(qs, qp, strict=True)]
                         for qs, qp in zip(segments, positions, strict=True)]
    assert results["inc"] == results["fresh"]  # the same rows, the same vectors: the same exact top 10


def test_a_crash_during_the_segment_build_keeps_the_version_and_the_rerun_builds_only_what_is_missing(
        tmp_path, tiny_qwen3, monkeypatch):
    from embedctl.pipeline import build as build_module
    from embedctl.pipeline.compose import BUILD, PLAN

    ids, texts = [f"d{i}" for i in range(200)], _texts(200)
    corpus = _write(tmp_path / "c.parquet", ids, texts)
    out = tmp_path / "out"
    run_embedded(_spec(corpus, out, tiny_qwen3, segment_rows=100))
    v1 = indexfiles.current(out)
    _write(corpus, ids + [f"n{i}" for i in range(250)], texts + _texts(250, salt="new "))
    real, calls, armed = build_module.build_index_file, [], [True]

    def crash_on_the_second(*args, **kwargs):
        calls.append(args[0])
        if armed[0] and len(calls) == 2:
            armed[0] = False
            raise RuntimeError("the host died")
        return real(*args, **kwargs)

    monkeypatch.setattr(build_module, "build_index_file", crash_on_the_second)
    with pytest.raises(RuntimeError, match="the host died"):
        run_embedded(_spec(corpus, out, tiny_qwen3, segment_rows=100))
    assert indexfiles.current(out) == v1  # the published version stays, and is still searched
    assert len(IndexReader(out).search(_vectors(tiny_qwen3, texts[:1]), k=3)[0]) == 3
    calls.clear()
    report = run_embedded(_spec(corpus, out, tiny_qwen3, segment_rows=100))
    assert report.status == "published" and report.segments_built == 3  # 250 new rows in 3 segments of <= 100
    # one piece (a segment at one dim) was done before the crash: only the others are built
    assert len(calls) == report.segments_built * len(report.dims) - 1
    assert sorted(indexfiles.live_ids(out)) == sorted(ids + [f"n{i}" for i in range(250)])

    # a garbled build plan is not trusted: the next run plans the build again and builds every piece
    _write(corpus, ids + [f"m{i}" for i in range(150)], texts + _texts(150, salt="more "))
    calls.clear()
    armed[0] = True
    with pytest.raises(RuntimeError, match="the host died"):
        run_embedded(_spec(corpus, out, tiny_qwen3, segment_rows=100))
    [plan_file] = (out / "work").glob(f"*/{BUILD}/*/{PLAN}")
    plan_file.write_bytes(b"{not json" + plan_file.read_bytes()[9:])
    calls.clear()
    report = run_embedded(_spec(corpus, out, tiny_qwen3, segment_rows=100))
    assert report.status == "published" and len(calls) == report.segments_built * len(report.dims)
    assert sorted(indexfiles.live_ids(out)) == sorted(ids + [f"m{i}" for i in range(150)])


def test_the_merge_policy():
    policy = MergePolicy(segment_rows=10_000, max_deleted=0.2, per_tier=4, floor_rows=100)
    big = SegmentState("big", 10_000, 2_500)  # 25% deleted: rewritten
    assert policy.choose([big, SegmentState("ok", 5_000, 100)], 50) == ["big"]
    small = [SegmentState(f"s{i}", 60, 0) for i in range(4)]  # a fifth small one (the new rows) overflows tier 0
    assert sorted(policy.choose(small, 60)) == ["s0", "s1", "s2", "s3"]
    assert policy.choose(small[:3], 60) == []  # four in the tier: no merge
    bounded = MergePolicy(segment_rows=10_000, max_deleted=0.2, max_rewrite_rows=1_000)
    assert bounded.choose([big], 0) == []  # 7,500 live rows exceed the run's budget: it waits
    assert policy.choose([SegmentState("empty", 100, 100)], 0) == ["empty"]


def test_versions_share_segments_and_retention_removes_only_unused_ones(tmp_path, tiny_qwen3):
    ids, texts = [f"d{i}" for i in range(200)], _texts(200)
    corpus = _write(tmp_path / "c.parquet", ids, texts)
    out = tmp_path / "out"
    for n in range(4):
        _write(corpus, ids, texts[:-1] + [f"last text, version {n}"])
        assert run_embedded(_spec(corpus, out, tiny_qwen3, keep=2)).status == "published"
    kept = sorted(p.name for p in (out / "versions").iterdir())
    assert kept == ["v000003", "v000004"]
    used = {s.id for v in kept for s in read_info(out / "versions" / v).segments}
    assert {p.name for p in (out / "segments").iterdir()} == used  # the segments of v1 and v2 alone are gone
    first = read_info(out / "versions" / "v000003").segments[0]
    assert first.id == read_info(out / "versions" / "v000004").segments[0].id  # shared, not copied


def test_a_version_of_the_format_before_segments_is_read_and_replaced(tmp_path, tiny_qwen3):
    """Indexes written before segments (one flat folder, format 1) stay searchable; the next run builds anew."""
    ids, texts = [f"d{i}" for i in range(150)], _texts(150)
    corpus = _write(tmp_path / "c.parquet", ids, texts)
    out = tmp_path / "out"
    run_embedded(_spec(corpus, out, tiny_qwen3))
    version = indexfiles.current(out)
    data = json.loads((version / "info.json").read_text())
    [segment] = data.pop("segments")
    for name in segment["files"]:
        shutil.move(out / "segments" / segment["id"] / name, version / name)
    for key in ("segment_key", "segment_rows", "digest"):
        data.pop(key)
    data.update(format=1, rows_file="rows.parquet", files={str(d): f"index-{d}.faiss" for d in data["dims"]},
                checksums=segment["files"])
    (version / "info.json").write_text(json.dumps(data))
    shutil.rmtree(out / "segments")
    reader = IndexReader(out)
    hits = reader.search(_vectors(tiny_qwen3, [texts[3]]), k=1)[0]
    assert hits[0].id == "d3"
    _write(corpus, ids, texts[:-1] + ["a new last text"])
    again = run_embedded(_spec(corpus, out, tiny_qwen3))
    assert again.segments == again.segments_built == 1  # a flat version's files are not reused: built anew
    assert sorted(indexfiles.live_ids(out)) == sorted(ids)


@pytest.mark.slow
def test_thirty_runs_of_one_percent_changes_stay_bounded(tmp_path, tiny_qwen3):
    rng = np.random.default_rng(0)
    n = 2000
    ids, texts = [f"d{i}" for i in range(n)], _texts(n)
    corpus = _write(tmp_path / "c.parquet", ids, texts)
    out = tmp_path / "out"
    policy = MergePolicy()
    history = []
    for night in range(30):
        for i in rng.choice(n, n // 100, replace=False):
            texts[i] = f"night {night} text {i} " + " ".join(rng.choice(WORDS, 4))
        _write(corpus, ids, texts)
        report = run_embedded(_spec(corpus, out, tiny_qwen3, segment_rows=n))
        info = read_info(indexfiles.current(out))
        deleted = sum(s.deleted for s in info.segments) / sum(s.rows for s in info.segments)
        history.append((len(info.segments), deleted, report.rows_embedded))
        assert report.rows_indexed == n and (night == 0 or report.rows_embedded == n // 100)
    counts, shares, _ = zip(*history, strict=True)
    assert max(counts) <= 2 * policy.per_tier + 1, counts  # small segments are merged
    assert max(shares) < policy.max_deleted + 0.02, shares  # rewrites keep the deleted share bounded
    assert sorted(indexfiles.live_ids(out)) == sorted(ids)
    reader = IndexReader(out)
    queries = _vectors(tiny_qwen3, texts[::20])
    _, s1, p1 = reader.search_positions(queries, 10)
    _, s2, p2 = reader.search_positions(queries, 10, exact=True)
    recall = np.mean([len(set(zip(a, b, strict=True)) & set(zip(c, d, strict=True))) / 10
                      for a, b, c, d in zip(s1, p1, s2, p2, strict=True)])
    assert recall >= 0.98, recall
