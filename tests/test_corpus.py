"""Corpus discovery, validation before any embedding, and chunked reading."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedctl.pipeline.corpus import discover_files, iter_chunks, plan_corpus, read_chunk
from embedctl.pipeline.errors import CorpusError


def _texts(n, start=0):
    return [f"text number {i}" for i in range(start, start + n)]


def test_file_directory_and_glob(tmp_path, write_corpus):
    write_corpus({"id": ["a", "b"], "text": _texts(2)}, "d/part-0.parquet")
    write_corpus({"id": ["c"], "text": _texts(1, 2)}, "d/sub/part-1.parquet")
    (tmp_path / "d" / "notes.txt").write_text("not parquet")
    assert [p.name for p in discover_files(str(tmp_path / "d"))] == ["part-0.parquet", "part-1.parquet"]
    assert len(discover_files(str(tmp_path / "d" / "*.parquet"))) == 1
    assert len(discover_files(str(tmp_path / "d" / "**" / "*.parquet"))) == 2
    plan = plan_corpus(str(tmp_path / "d"), "text", "id", chunk_rows=2)
    assert plan.rows == 3 and [(c.start, c.stop) for c in plan.chunks] == [(0, 2), (2, 3)]


def test_chunks_span_files_and_streaming_equals_random_access(write_corpus, tmp_path):
    write_corpus({"id": list(range(0, 7)), "text": _texts(7)}, "c/a.parquet", row_group_size=3)
    write_corpus({"id": list(range(7, 12)), "text": _texts(5, 7)}, "c/b.parquet", row_group_size=2)
    plan = plan_corpus(str(tmp_path / "c"), "text", "id", chunk_rows=5)
    assert len(plan.chunks) == 3
    streamed = {c.number: rows for c, rows in iter_chunks(plan)}
    for chunk in plan.chunks:
        alone = read_chunk(plan, chunk)
        assert alone.ids == streamed[chunk.number].ids == list(range(chunk.start, chunk.stop))
        assert alone.texts == _texts(chunk.rows, chunk.start)
    some = [c.number for c, _ in iter_chunks(plan, {0, 2})]
    assert some == [0, 2]


def test_without_an_id_column_the_row_number_is_the_id(write_corpus):
    path = write_corpus({"text": _texts(4)})
    plan = plan_corpus(str(path), "text", "id", chunk_rows=3)
    assert plan.id_column is None
    assert read_chunk(plan, plan.chunks[1]).ids == [3]


def test_explicit_id_column_must_exist(write_corpus):
    path = write_corpus({"text": _texts(2)})
    with pytest.raises(CorpusError, match="id column 'doc_id' is not in"):
        plan_corpus(str(path), "text", "doc_id", chunk_rows=3, id_column_required=True)


@pytest.mark.parametrize("columns, text_column, message", [
    ({"id": [1, 2], "body": ["a", "b"]}, "text", "column 'text' is not in .* \\(columns: id, body\\)"),
    ({"id": [1, 2], "text": [1, 2]}, "text", "holds int64, not strings"),
    ({"id": ["a", "a", "b"], "text": ["x", "y", "z"]}, "text", "1 duplicate ids .* 'a' appears 2 times"),
    ({"id": ["a", None], "text": ["x", "y"]}, "text", "1 null ids"),
    ({"id": [1.5, 2.5], "text": ["x", "y"]}, "text", "ids must be strings or integers"),
])
def test_bad_corpora_are_refused_before_embedding(write_corpus, columns, text_column, message):
    path = write_corpus(columns)
    with pytest.raises(CorpusError, match=message) as info:
        plan_corpus(str(path), text_column, "id", chunk_rows=10)
    assert "\n" not in str(info.value)


def test_duplicate_ids_across_files_are_refused(tmp_path, write_corpus):
    write_corpus({"id": ["a", "b"], "text": ["x", "y"]}, "c/1.parquet")
    write_corpus({"id": ["b"], "text": ["z"]}, "c/2.parquet")
    with pytest.raises(CorpusError, match="duplicate ids"):
        plan_corpus(str(tmp_path / "c"), "text", "id", chunk_rows=10)


def test_missing_and_unreadable_corpora(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        plan_corpus(str(tmp_path / "nope.parquet"), "text", "id", 10)
    with pytest.raises(CorpusError, match="no files match"):
        plan_corpus(str(tmp_path / "*.parquet"), "text", "id", 10)
    bad = tmp_path / "bad.parquet"
    bad.write_text("this is not parquet")
    with pytest.raises(CorpusError, match="cannot read .* as Parquet"):
        plan_corpus(str(bad), "text", "id", 10)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="no \\*.parquet files"):
        plan_corpus(str(empty), "text", "id", 10)


def test_null_and_empty_texts_are_read_not_refused(write_corpus):
    path = write_corpus({"id": ["a", "b", "c"], "text": ["x", None, "  "]})
    plan = plan_corpus(str(path), "text", "id", chunk_rows=10)
    assert read_chunk(plan, plan.chunks[0]).texts == ["x", None, "  "]


def test_fingerprint_follows_content(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), path)
    first = plan_corpus(str(path), "text", "id", 10).fingerprint
    assert plan_corpus(str(path), "text", "id", 10).fingerprint == first
    pq.write_table(pa.table({"id": ["a"], "text": ["y"]}), path)
    assert plan_corpus(str(path), "text", "id", 10).fingerprint != first
