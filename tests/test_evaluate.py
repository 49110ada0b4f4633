"""`embedctl eval` (recall@k and MRR per dim, exact vs HNSW) and the quantised index types."""

from __future__ import annotations

import json

import faiss
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from embedctl.cli import main
from tests import indexfiles


@pytest.fixture(scope="module")
def self_queries(tmp_path_factory, sample_slice):
    """Each of 60 corpus texts as a query whose relevant row is itself."""
    rows = pq.read_table(sample_slice).slice(0, 60)
    path = tmp_path_factory.mktemp("q") / "queries.parquet"
    pq.write_table(pa.table({"q": rows.column("text"), "rel": rows.column("id")}), path)
    return path


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, sample_slice):
    out = {}
    for kind in ("hnsw", "hnsw-sqfp16", "hnsw-sq8"):
        path = tmp_path_factory.mktemp(kind) / "idx"
        result = CliRunner().invoke(main, ["index", str(sample_slice), "--out", str(path), "--model", "minilm",
                                           "--dims", "128", "--index-type", kind, "--quiet"])
        assert result.exit_code == 0, result.output
        out[kind] = path
    return out


def test_eval_reports_recall_and_mrr_per_dim(indexes, self_queries):
    result = CliRunner().invoke(main, ["eval", str(indexes["hnsw"]), "--queries", str(self_queries),
                                       "--query-column", "q", "--relevant-column", "rel", "-k", "1,5", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["queries"] == 60 and set(data["dims"]) == {"384", "128"}
    full = data["dims"]["384"]
    assert full["exact"]["recall@1"] == 1.0 and full["exact"]["mrr@5"] == 1.0  # a text finds itself first
    assert full["hnsw"]["recall@5"] >= 0.98 and full["hnsw_recall@5_vs_exact"] >= 0.95
    human = CliRunner().invoke(main, ["eval", str(indexes["hnsw"]), "--queries", str(self_queries),
                                      "--query-column", "q", "--relevant-column", "rel"])
    assert "R@10" in human.stdout and "exact" in human.stdout


def test_eval_bad_input_is_one_line(indexes, self_queries, tmp_path):
    result = CliRunner().invoke(main, ["eval", str(indexes["hnsw"]), "--queries", str(self_queries)])
    assert result.exit_code == 1 and "column 'query' is not in" in result.stderr
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"query": ["x"], "relevant_id": ["not-an-id"]}), other)
    result = CliRunner().invoke(main, ["eval", str(indexes["hnsw"]), "--queries", str(other)])
    assert result.exit_code == 1 and "none of the relevant ids" in result.stderr


def test_quantised_indexes_are_smaller_plain_faiss_and_still_find_rows(indexes, sample_slice):
    sizes = {}
    row = pq.read_table(sample_slice).slice(9, 1).to_pylist()[0]
    for kind, path in indexes.items():
        [file] = indexfiles.segment_files(path, "index-384.faiss")
        index = faiss.read_index(str(file))
        assert index.ntotal == 600
        assert type(faiss.downcast_index(index)).__name__ == ("IndexHNSWFlat" if kind == "hnsw" else "IndexHNSWSQ")
        sizes[kind] = file.stat().st_size
        hits = json.loads(CliRunner().invoke(main, ["query", str(path), row["text"], "-k", "1", "--json"]).stdout)
        assert hits[0]["id"] == row["id"]
        assert json.loads(CliRunner().invoke(main, ["info", str(path), "--json"]).stdout)["index_type"] == kind
    assert sizes["hnsw-sq8"] < sizes["hnsw-sqfp16"] < sizes["hnsw"]
