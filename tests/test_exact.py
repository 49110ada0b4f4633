"""Exact search in tiles (`pipeline.exact`): tiles merge to one search's result; the GPU code path of a segment,
run with the CPU backend in place of faiss-gpu's one call, finds what the CPU selector path finds; the device
setting, and `embedctl eval --exact-device`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from embedctl.cli import main
from embedctl.jobs.runner import run_embedded
from embedctl.jobs.spec import JobSpec
from embedctl.pipeline import exact
from embedctl.pipeline.errors import ConfigError
from embedctl.pipeline.exact import knn_tiled, resolve_exact_device
from embedctl.pipeline.index import IndexReader, slice_normalise
from embedctl.pipeline.merge import MergePolicy

EMBEDCTL = str(Path(sys.executable).parent / "embedctl")
WORDS = "dog cat house tree river stone light water fire city music paper glass cloud rain bird fish road".split()


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _one_call(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss.knn over the whole database, its missing results written as knn_tiled writes them (-1, -inf)."""
    scores, positions = faiss.knn(queries, database, k, metric=faiss.METRIC_INNER_PRODUCT)
    return np.where(positions >= 0, scores, -np.inf), positions


@pytest.mark.parametrize("k", [1, 5, 50, 57])
def test_tiles_merge_to_the_result_of_one_search(k):
    rng = np.random.default_rng(k)
    n = 50
    database, queries = _unit(rng, n, 24), _unit(rng, 30, 24)  # 30 queries: faiss takes its BLAS path
    want_scores, want_positions = _one_call(database, queries, k)
    for tile in (1, 7, n - 1, n, 2 * n):
        scores, positions = knn_tiled(database, queries, k, tile, exact.cpu_search)
        assert scores.shape == positions.shape == (30, k) and positions.dtype == np.int64
        np.testing.assert_array_equal(positions, want_positions, err_msg=f"tile {tile}")
        np.testing.assert_allclose(scores, want_scores, rtol=1e-6, err_msg=f"tile {tile}")
    assert k <= n or (positions[:, n:] == -1).all() and np.isneginf(scores[:, n:]).all()


def test_ties_go_to_the_lower_position_across_tiles():
    v, w = np.array([1.0, 0.0], np.float32), np.array([0.6, 0.8], np.float32)
    database = np.stack([w, v, v, w, v, w, v, v])  # scores against (1, 0): v 1.0, w 0.6
    queries = np.array([[1.0, 0.0]], np.float32)
    for tile in (1, 3, 8):
        scores, positions = knn_tiled(database, queries, 6, tile, exact.cpu_search)
        assert positions[0].tolist() == [1, 2, 4, 6, 7, 0], tile
        np.testing.assert_allclose(scores[0], [1, 1, 1, 1, 1, 0.6], rtol=1e-6)
    many = np.stack([w] * 10 + [v] + [w] * 10 + [v])  # the third best ties 20 ways: the search widens past k
    for tile in (1, 5, 22):
        assert knn_tiled(many, queries, 3, tile, exact.cpu_search)[1][0].tolist() == [10, 21, 0], tile
    scores, positions = knn_tiled(database[:0], queries, 3, 4, exact.cpu_search)
    assert positions.tolist() == [[-1, -1, -1]] and np.isneginf(scores).all()


def test_the_device_setting_and_the_tile_size(monkeypatch):
    monkeypatch.setattr(exact, "gpu_available", lambda: False)
    assert resolve_exact_device("auto") == "cpu" and resolve_exact_device("cpu") == "cpu"
    with pytest.raises(ConfigError) as refused:
        resolve_exact_device("gpu")
    message = str(refused.value)
    assert "\n" not in message and "--exact-device gpu" in message and "embedctl[gpu]" in message
    with pytest.raises(ConfigError, match="one of auto, cpu, gpu, got 'cuda'"):
        resolve_exact_device("cuda")
    monkeypatch.setattr(exact, "gpu_available", lambda: True)
    assert resolve_exact_device("auto") == resolve_exact_device("gpu") == "gpu"
    assert resolve_exact_device("cpu") == "cpu"

    monkeypatch.delenv(exact.TILE_ROWS_ENV, raising=False)
    assert exact.default_tile_rows(1024) == 65536  # 256 MiB of float32 vectors of 1024 dims
    monkeypatch.setenv(exact.TILE_ROWS_ENV, "7")
    assert exact.default_tile_rows(1024) == 7
    monkeypatch.setenv(exact.TILE_ROWS_ENV, "-3")
    with pytest.raises(ConfigError, match="EMBEDCTL_EXACT_TILE_ROWS must be a positive"):
        exact.default_tile_rows(1024)


def test_the_gpu_backend_calls_faiss_gpu_with_one_resource_per_process(monkeypatch):
    """Everything of the GPU backend but faiss-gpu itself: a stand-in knn_gpu with its signature checks the call."""
    made = []

    class Resources:
        def __init__(self):
            made.append(self)

    def knn_gpu(res, xq, xb, k, D=None, I=None, metric=faiss.METRIC_L2, device=-1):  # noqa: E741 (faiss's names)
        assert res is made[0] and metric == faiss.METRIC_INNER_PRODUCT
        return faiss.knn(xq, xb, k, metric=metric)

    monkeypatch.setattr(faiss, "StandardGpuResources", Resources, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "knn_gpu", knn_gpu, raising=False)
    monkeypatch.setattr(exact, "_GPU", [])
    assert exact.gpu_available() and resolve_exact_device("auto") == "gpu"
    rng = np.random.default_rng(0)
    database, queries = _unit(rng, 40, 16), _unit(rng, 3, 16)
    scores, positions = knn_tiled(database, queries, 5, 9, exact.backend("gpu"))
    want_scores, want_positions = _one_call(database, queries, 5)
    np.testing.assert_array_equal(positions, want_positions)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    assert len(made) == 1  # five tiles, one StandardGpuResources
    with pytest.raises(ConfigError, match="-k 2049 is more than the 2048"):
        exact.gpu_search(database, queries, 2049)
    with pytest.raises(ConfigError, match="cpu or gpu, got 'auto'"):
        exact.backend("auto")


def _texts(n: int, salt: str = "") -> list[str]:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 6)) + f" {salt}{i}" for i in range(n)]


@pytest.fixture(scope="module", params=["hnsw", "hnsw-sq8"])
def segmented(request, tmp_path_factory, tiny_qwen3):
    """A version of two segments: 300 rows with 40 of them deleted (kept by the merge policy), and 20 new rows."""
    from embedctl.pipeline import build

    tmp = tmp_path_factory.mktemp(request.param)
    corpus, out = tmp / "c.parquet", tmp / "out"
    ids, texts = [f"d{i}" for i in range(300)], _texts(300)

    def run(keep: list[int], extra: int = 0):
        pq.write_table(pa.table({"id": [ids[i] for i in keep] + [f"n{i}" for i in range(extra)],
                                 "text": [texts[i] for i in keep] + _texts(extra, salt="new ")}), corpus)
        return run_embedded(JobSpec(corpus=str(corpus), out=str(out), model=str(tiny_qwen3), dims=(32,),
                                    chunk_rows=100, hnsw_m=16, ef_construction=80, segment_rows=300,
                                    index_type=request.param))

    run(list(range(300)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "policy_of", lambda plan: MergePolicy(segment_rows=plan.segment_rows, max_deleted=1.01))
        run([i for i in range(300) if i % 7 != 3 or i > 280], extra=20)
    return out


def test_the_gpu_code_path_finds_what_the_cpu_selector_path_finds(segmented, monkeypatch):
    monkeypatch.setattr(exact, "backend", {"gpu": exact.cpu_search}.__getitem__)  # faiss.knn for faiss-gpu
    monkeypatch.setenv(exact.TILE_ROWS_ENV, "7")  # many tiles, most of them with deleted rows
    reader = IndexReader(segmented)
    old = reader.segments[0]
    assert [s.ref.rows for s in reader.segments] == [300, 20] and len(old.deleted) == 40
    queries = _unit(np.random.default_rng(1), 12, reader.info.dim)
    for dim in reader.dims:
        q = slice_normalise(queries, dim)
        for k in (1, 10, 500):
            cpu_scores, cpu_positions = old.search(q, k, dim, 64, exact=True, exact_device="cpu")
            scores, positions = old.search(q, k, dim, 64, exact=True, exact_device="gpu")
            shown = min(k, 300)
            assert positions.shape == (12, shown) and (positions[:, :260] >= 0).all()
            assert (positions[:, 260:] == -1).all() and np.isneginf(scores[:, 260:]).all()  # 260 live rows
            assert not np.isin(positions, old.deleted).any()
            top = min(k, 260) if k < 500 else 10  # beyond the top 10, near-equal scores may swap
            np.testing.assert_array_equal(positions[:, :top], cpu_positions[:, :top])
            np.testing.assert_allclose(scores[:, :260], cpu_scores[:, :min(k, 260)], rtol=1e-5, atol=1e-6)
            if k == 500:
                assert (np.sort(positions[:, :260]) == np.sort(cpu_positions[:, :260])).all()
        cpu = reader.search_positions(queries, 10, dim, exact=True)
        gpu = reader.search_positions(queries, 10, dim, exact=True, exact_device="gpu")
        np.testing.assert_array_equal(gpu[1], cpu[1])
        np.testing.assert_array_equal(gpu[2], cpu[2])
        np.testing.assert_allclose(gpu[0], cpu[0], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def eval_queries(segmented, tmp_path_factory):
    """Live rows' texts as queries whose relevant row is themselves."""
    reader = IndexReader(segmented)
    rows = [hit for seg in reader.segments for hit in seg.lookup(range(0, seg.ref.rows, 9)).values()]
    path = tmp_path_factory.mktemp("queries") / "q.parquet"
    pq.write_table(pa.table({"q": [text for _, text, _ in rows], "rel": [i for i, _, _ in rows]}), path)
    return path


def test_eval_exact_device(segmented, eval_queries, monkeypatch):
    args = ["eval", str(segmented), "--queries", str(eval_queries), "--query-column", "q", "--relevant-column", "rel",
            "--query-instruction", ""]  # queries embedded as the rows were: each finds itself
    monkeypatch.setattr(exact, "gpu_available", lambda: False)
    refused = CliRunner().invoke(main, args + ["--exact-device", "gpu"])
    assert refused.exit_code == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "--exact-device gpu: this FAISS has no GPU support" in refused.stderr
    monkeypatch.setenv("EMBEDCTL_EXACT_DEVICE", "gpu")
    assert CliRunner().invoke(main, args).exit_code == 1  # the environment variable sets it too
    human = CliRunner().invoke(main, args + ["--exact-device", "cpu"])
    assert human.exit_code == 0, human.output
    assert "exact search on cpu" in human.stdout.splitlines()
    monkeypatch.delenv("EMBEDCTL_EXACT_DEVICE")
    result = CliRunner().invoke(main, args + ["--json"])  # auto: the CPU here
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["exact_device"] == "cpu"
    assert all(m["exact_ms_per_query"] > 0 and m["exact"]["recall@1"] >= 0.9 for m in data["dims"].values())


@pytest.mark.skipif(exact.gpu_available(), reason="this FAISS sees a GPU: --exact-device gpu is not refused")
def test_installed_eval_refuses_gpu_in_one_line(segmented, eval_queries):
    refused = subprocess.run([EMBEDCTL, "eval", str(segmented), "--queries", str(eval_queries),
                              "--exact-device", "gpu"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "pip install 'embedctl[gpu]'" in refused.stderr
