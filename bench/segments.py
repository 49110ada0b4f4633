"""Segmented indexes: what a segment costs to build and search, deleted rows, nightly re-indexing, build scaling.

    python -m bench.segments [--parts choose,deleted,nightly,scaling,memory] [--rows 20000] [--nights 30] [--json]
                             [--plots DIR]

- choose: 40,000 MiniLM vectors of WordNet glosses (cached under bench-results/cache), split into segments of
  2,500 to 40,000 rows: build seconds per 1,000 rows and single-query search p50 over all segments (the numbers
  the default `--segment-rows` is chosen by).
- deleted: `embedctl index` of `--rows` glosses into segments of rows/5, then 10% of the rows deleted from the
  corpus and re-indexed (5 segments with 10% deleted), against a single-segment build of the same rows:
  recall@10 vs exact per dim at the default efSearch, and search p50 (with the id and text lookup).
- nightly: `--nights` runs of `embedctl index`, each after changing 1% of the texts: seconds per run, segments,
  deleted share, rows rewritten by the merge policy, recall@10 vs exact at the end of each run.
- scaling: the build stage of the same job (chunks embedded beforehand) on Celery with one single-thread worker
  process vs two on the build queue (each stands for a host with one core), a real redis-server.
- memory: peak RSS growth of one build task (a segment of `--memory-rows` glosses, the full dim; random vectors
  written by the chunk store stand for embedded ones) against the documented bytes per row.
Needs ../shared/corpora/wordnet_glosses.parquet and wordnet_queries.parquet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
CORPORA = ROOT.parent / "shared" / "corpora"
EMBEDCTL = str(Path(sys.executable).parent / "embedctl")
PARTS = ("choose", "deleted", "nightly", "scaling", "memory")


def _queries(glosses: pa.Table, limit: int) -> pa.Table:
    queries = pq.read_table(CORPORA / "wordnet_queries.parquet")
    return queries.filter(pc.is_in(queries["relevant_id"], value_set=glosses["id"])).slice(0, limit)


def _embed(texts: list[str], cache: Path) -> np.ndarray:
    from bench.indexes import embeddings

    return embeddings(texts, cache)


def choose(cache: Path) -> dict:
    import faiss

    from embedctl.pipeline.index import build_hnsw

    glosses = pq.read_table(CORPORA / "wordnet_glosses.parquet", columns=["id", "text"]).slice(0, 40_000)
    x = _embed(glosses.column("text").to_pylist(), cache / "glosses-40000-minilm.npy")
    q = _embed(_queries(glosses, 500).column("query").to_pylist(), cache / "queries-40000-500-minilm.npy")
    rows = []
    for size in (2_500, 5_000, 10_000, 20_000, 40_000):
        t0 = time.perf_counter()
        indexes = [build_hnsw(x[s:s + size], 32, 200, 64) for s in range(0, len(x), size)]
        build = time.perf_counter() - t0
        times = []
        for i in range(len(q)):
            t0 = time.perf_counter()
            for index in indexes:
                index.search(q[i:i + 1], 10)
            times.append(time.perf_counter() - t0)
        rows.append({"segment_rows": size, "segments": len(indexes),
                     "build_s_per_1k_rows": round(1000 * build / len(x), 4),
                     "search_p50_ms": round(1000 * statistics.median(times), 4)})
        del indexes
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return {"vectors": len(x), "dim": x.shape[1], "rows": rows}


def _run(corpus: Path, out: Path, **kw):
    from embedctl.jobs.runner import run_embedded
    from embedctl.jobs.spec import JobSpec

    return run_embedded(JobSpec(corpus=str(corpus), out=str(out), model="minilm", shm="off", **kw))


def _recall_and_latency(out: Path, qvec: np.ndarray, rounds: int = 1) -> dict:
    from embedctl.pipeline.index import IndexReader

    reader = IndexReader(out)
    per_dim = {}
    for dim in reader.dims:
        reader.load(dim)
        _, s1, p1 = reader.search_positions(qvec, 10, dim)
        _, s2, p2 = reader.search_positions(qvec, 10, dim, exact=True)
        found = [set(zip(a, b, strict=True)) for a, b in zip(s1, p1, strict=True)]
        truth = [set(zip(a, b, strict=True)) for a, b in zip(s2, p2, strict=True)]
        recall = float(np.mean([len(f & t) / 10 for f, t in zip(found, truth, strict=True)]))
        search, lookup = [0.0], [0.0]
        for _ in range(rounds):
            for i in range(len(qvec)):
                t0 = time.perf_counter()
                reader.search_positions(qvec[i:i + 1], 10, dim)
                t1 = time.perf_counter()
                reader.search(qvec[i:i + 1], 10, dim)
                t2 = time.perf_counter()
                search.append(t1 - t0)
                lookup.append(t2 - t1)
        per_dim[str(dim)] = {"recall@10_vs_exact": round(recall, 4),
                             "search_p50_ms": round(1000 * statistics.median(search), 4),
                             "query_p50_ms": round(1000 * statistics.median(lookup), 4)}
    return {"segments": len(reader.segments), "deleted": sum(len(s.deleted) for s in reader.segments),
            "dims": per_dim}


def deleted(work: Path, rows: int, cache: Path) -> dict:
    glosses = pq.read_table(CORPORA / "wordnet_glosses.parquet", columns=["id", "text"]).slice(0, rows)
    qtable = _queries(glosses, 1000)
    qvec = _embed(qtable.column("query").to_pylist(), cache / f"queries-{rows}-1000-minilm.npy")
    corpus = work / "deleted.parquet"
    pq.write_table(glosses, corpus)
    _run(corpus, work / "five", segment_rows=rows // 5)
    keep = np.ones(rows, dtype=bool)
    keep[np.random.default_rng(0).choice(rows, rows // 10, replace=False)] = False
    pq.write_table(glosses.filter(pa.array(keep)), corpus)
    report = _run(corpus, work / "five", segment_rows=rows // 5)
    assert report.segments == 5 and report.segments_built == 0, report
    shutil.copy(corpus, work / "single.parquet")
    _run(work / "single.parquet", work / "single")
    five = _recall_and_latency(work / "five", qvec, rounds=3)
    single = _recall_and_latency(work / "single", qvec, rounds=3)
    ratios = {d: {"search_p50": round(five["dims"][d]["search_p50_ms"] / single["dims"][d]["search_p50_ms"], 3),
                  "query_p50": round(five["dims"][d]["query_p50_ms"] / single["dims"][d]["query_p50_ms"], 3)}
              for d in five["dims"]}
    return {"rows": rows, "queries": len(qvec), "five_segments": five, "single_segment": single,
            "p50_ratio_five_over_single": ratios}


def nightly(work: Path, rows: int, nights: int, cache: Path) -> dict:
    glosses = pq.read_table(CORPORA / "wordnet_glosses.parquet", columns=["id", "text"]).slice(0, rows)
    qvec = _embed(_queries(glosses, 500).column("query").to_pylist(), cache / f"queries-{rows}-500-minilm.npy")
    corpus = work / "nightly.parquet"
    texts = glosses.column("text").to_pylist()
    rng = np.random.default_rng(1)
    runs = []
    for night in range(nights + 1):
        if night:
            for i in rng.choice(rows, rows // 100, replace=False):
                texts[i] = f"{texts[i]} (revised {night})"
        pq.write_table(pa.table({"id": glosses.column("id"), "text": texts}), corpus)
        t0 = time.perf_counter()
        report = _run(corpus, work / "nightly")
        seconds = time.perf_counter() - t0
        quality = _recall_and_latency(work / "nightly", qvec, rounds=0)
        runs.append({"night": night, "seconds": round(seconds, 3), "segments": report.segments,
                     "segments_built": report.segments_built, "rows_embedded": report.rows_embedded,
                     "rows_rewritten": report.rows_rewritten,
                     "deleted_share": round(quality["deleted"] / (rows + quality["deleted"]), 4),
                     "recall@10": {d: v["recall@10_vs_exact"] for d, v in quality["dims"].items()}})
    full = runs[0]["seconds"]
    later = [r["seconds"] for r in runs[1:]]
    return {"rows": rows, "nights": nights, "runs": runs, "full_seconds": full,
            "median_night_over_full": round(statistics.median(later) / full, 4),
            "max_night_over_full": round(max(later) / full, 4),
            "max_segments": max(r["segments"] for r in runs),
            "max_deleted_share": max(r["deleted_share"] for r in runs),
            "min_recall@10": min(min(r["recall@10"].values()) for r in runs)}


def scaling(work: Path, rows: int) -> dict:
    from tests.services import RedisServer, Worker

    glosses = pq.read_table(CORPORA / "wordnet_glosses.parquet", columns=["id", "text"]).slice(0, rows)
    corpus = work / "scaling.parquet"
    pq.write_table(glosses, corpus)
    seed = work / "seed"
    _run(corpus, seed, segment_rows=rows // 4)  # the chunks, embedded once: the runs below only build
    redis = RedisServer(work / "redis").start()
    shm = Path("/dev/shm") / f"embedctl-bench-{uuid.uuid4().hex[:8]}"
    shm.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDCTL_")}
    env.update(EMBEDCTL_SHM_DIR=str(shm), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               EMBEDCTL_BROKER_URL=redis.url, EMBEDCTL_THREADS="1", OMP_NUM_THREADS="1")
    result = {}
    try:
        for processes in (1, 2, 1, 2):
            out = work / f"scale-{processes}-{uuid.uuid4().hex[:4]}"
            out.mkdir()
            shutil.copytree(seed / "work", out / "work")
            log = work / f"worker-{out.name}.log"
            worker = Worker(env, log, concurrency=processes).start()
            try:
                done = subprocess.run([EMBEDCTL, "index", str(corpus), "--out", str(out), "--model", "minilm",
                                       "--segment-rows", str(rows // 4), "--quiet", "--json", "--broker", redis.url],
                                      env=env, capture_output=True, text=True)
            finally:
                worker.stop()
            report = json.loads(done.stdout)
            assert done.returncode == 0 and report["segments_built"] == 4 and report["rows_embedded"] == 0, done
            # the build stage: from the build task's start (its plan written) to the version written
            started = min(p.stat().st_mtime for p in (out / "segments").glob("*/rows.parquet"))
            planned = _build_started(log)
            finished = (Path(report["path"]) / "info.json").stat().st_mtime
            result.setdefault(str(processes), []).append(round(finished - (planned or started), 3))
    finally:
        redis.stop()
        shutil.rmtree(shm, ignore_errors=True)
    one, two = statistics.median(result["1"]), statistics.median(result["2"])
    return {"rows": rows, "segments": 4, "pieces": 12, "build_seconds": result,
            "speedup_two_processes": round(one / two, 3)}


def _build_started(log: Path) -> float | None:
    """When the worker received the build task (its log line's time), as a Unix time."""
    import datetime as dt

    for line in log.read_text(errors="replace").splitlines():
        if "embedctl.build_index[" in line and "received" in line:
            stamp = line[1:line.index("]")].split(": ")[0]
            return dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def memory(work: Path, rows: int) -> dict:
    """Peak RSS growth of one build task (`build_piece` of the full dim) in a fresh process, for a segment of `rows`
    WordNet glosses. The job's chunks are written by the chunk store with random unit vectors (the build's memory
    does not depend on their values), so no model runs."""
    from embedctl.jobs.spec import JobSpec
    from embedctl.pipeline.build import plan_build
    from embedctl.pipeline.cache import text_hashes
    from embedctl.pipeline.corpus import iter_chunks
    from embedctl.pipeline.plan import plan_job
    from embedctl.pipeline.segments import build_bytes_per_row

    glosses = pq.read_table(CORPORA / "wordnet_glosses.parquet", columns=["id", "text"]).slice(0, rows)
    corpus = work / "memory.parquet"
    pq.write_table(glosses, corpus)
    plan = plan_job(JobSpec(corpus=str(corpus), out=str(work / "memory"), model="minilm", dims=(128,),
                            chunk_rows=10_000, segment_rows=rows))
    plan.save()
    rng = np.random.default_rng(0)
    for chunk, data in iter_chunks(plan.corpus):
        vectors = rng.normal(size=(len(data.rows), plan.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        plan.store.write(chunk.number, data.rows, data.ids, data.texts, vectors, {"chunk": chunk.number},
                         id_type=pa.string(), hashes=text_hashes(data.texts))
    build = plan_build(plan)
    [segment] = build.new
    code = f"""
import json
from pathlib import Path
from embedctl.pipeline.build import build_piece
from embedctl.pipeline.compose import load_build
from embedctl.pipeline.plan import load_plan
import embedctl.pipeline.index, embedctl.pipeline.segments, faiss, numpy, pyarrow.parquet
plan = load_plan(Path({str(plan.work_dir)!r}))
build = load_build(plan, {build.key!r})
def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
# the peak RSS of a process survives exec (Linux keeps the parent's at fork): reset it, then measure from here
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
build_piece(plan, build, {segment.id!r}, plan.dim)
after = status("VmHWM")
assert build.done({segment.id!r}, str(plan.dim)) is not None
print(json.dumps({{"baseline_bytes": before * 1024, "peak_growth_bytes": (after - before) * 1024}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    documented = build_bytes_per_row(plan.dim, plan.dim, plan.hnsw_m, plan.index_type)
    growth = measured["peak_growth_bytes"]
    return {"rows": segment.rows, "dim": plan.dim, "index_type": plan.index_type, **measured,
            "documented_bytes_per_row": documented, "measured_bytes_per_row": round(growth / segment.rows, 1),
            "measured_over_documented": round(growth / (documented * segment.rows), 3)}


def plots(result: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "nightly" in result:
        runs = result["nightly"]["runs"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        axes[0].bar([r["night"] for r in runs], [r["seconds"] for r in runs], color="#2a6fdb")
        axes[0].set(title="seconds per run (night 0: full index)", xlabel="night")
        for dim in runs[0]["recall@10"]:
            axes[1].plot([r["night"] for r in runs], [r["recall@10"][dim] for r in runs], label=f"{dim}d")
        axes[1].plot([r["night"] for r in runs], [r["segments"] / 100 + 0.9 for r in runs], "k:",
                     label="segments/100 + 0.9")
        axes[1].set(title="recall@10 vs exact", xlabel="night", ylim=(0.9, 1.0))
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "segments_nightly.png", dpi=120)
        plt.close(fig)
    if "deleted" in result:
        d = result["deleted"]
        dims = list(d["single_segment"]["dims"])
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for name, label in (("single_segment", "1 segment"), ("five_segments", "5 segments, 10% deleted")):
            ax.plot(dims, [d[name]["dims"][x]["recall@10_vs_exact"] for x in dims], "o-", label=label)
        ax.set(title="recall@10 vs exact by dim", xlabel="dim", ylim=(0.95, 1.0))
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "segments_recall.png", dpi=120)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--nights", type=int, default=30)
    parser.add_argument("--memory-rows", type=int, default=100_000)
    parser.add_argument("--cache", default=str(ROOT / "bench-results" / "cache"))
    parser.add_argument("--plots", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or args.rows < 100 or args.nights < 1:
        parser.error(f"--parts takes {', '.join(PARTS)}; --rows at least 100, --nights at least 1")
    if not (CORPORA / "wordnet_glosses.parquet").exists():
        sys.exit(f"{CORPORA} is absent: this benchmark needs the WordNet corpora in ../shared/corpora")
    cache = Path(args.cache)
    work = Path(tempfile.mkdtemp(prefix="embedctl-bench-segments-"))
    result = {"command": "python -m bench.segments " + " ".join(sys.argv[1:]), "cpus": os.cpu_count()}
    try:
        for part in parts:
            print(f"bench.segments: {part} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            if part == "choose":
                result[part] = choose(cache)
            elif part == "deleted":
                result[part] = deleted(work, args.rows, cache)
            elif part == "nightly":
                result[part] = nightly(work, args.rows, args.nights, cache)
            elif part == "scaling":
                result[part] = scaling(work, args.rows)
            else:
                result[part] = memory(work, args.memory_rows)
            result[part]["bench_seconds"] = round(time.perf_counter() - t0, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.plots:
        plots(result, Path(args.plots))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
