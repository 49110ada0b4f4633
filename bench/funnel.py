"""Funnel benchmark: a Matryoshka shortlist re-ranked at the full dim, against exact and HNSW full-dim search.

    python -m bench.funnel [--rows 0] [--queries 5000] [--latency-queries 500] [--synthetic-rows 50000]
                           [--json] [--plots DIR]

WordNet (needs ../shared/corpora): `embedctl index` of the glosses with MiniLM (384 dims) and `--dims 256,128,64`,
run three times into one output folder, once per `--index-type` (hnsw, hnsw-sqfp16, hnsw-sq8: the second and
third runs rebuild the segments from the stored vectors and embed nothing), then each version is read with
`IndexReader`, the code `embedctl query` runs. For each shortlist index (type x dim) and shortlist size: recall@10
of the funnel against exact 384-dim search (float32, the usage-example queries), the shortlist index's bytes per
row (its files' bytes / rows: what it holds resident once every page is in) and the resident bytes the search
left mapped (/proc/self/smaps), p50/p99 single-query latency of the funnel, of the shortlist index alone (k=10 at
its stored efSearch) and of the 384-dim HNSW.

Reference shape (2560 dims), synthetic: no 2560-dim model runs here. Vectors with Matryoshka-like energy decay:
dim d has standard deviation (1 + d / 64) ** -0.5 (43% of the energy in the first 256 dims); rows are members of
clusters (a centre and the same-shaped noise at 0.6 x its scale, 50 rows a cluster on average), queries are new
members of random rows' clusters. A 256-dim SQ8 HNSW shortlist (built by `pipeline.index.build_hnsw`) re-ranked
with `pipeline.index.rerank` from a memory-mapped float16 vectors file, against a 2560-dim float32 HNSW.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
CORPORA = ROOT.parent / "shared" / "corpora"
EMBEDCTL = str(Path(sys.executable).with_name("embedctl"))
RUNS = (("hnsw", 32), ("hnsw-sqfp16", 32), ("hnsw-sq8", 32), ("hnsw-sq8", 16))
"""(index type, HNSW M) of each index run: M sets the graph's share of the bytes a row (2 x M neighbours of 4 bytes)."""
SHORTLIST_DIMS = (256, 128, 64)
SHORTLISTS = (50, 100, 200, 400, 800)
K = 10


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top k found (rows of keys; -1 never matches)."""
    return round(float(np.mean([len(set(a[a >= 0]) & set(b)) / len(b) for a, b in zip(found, truth, strict=True)])),
                 4)


def latency(fn, queries: np.ndarray, n: int) -> dict:
    """p50/p99 milliseconds of `fn` on one query at a time (the first 20 not counted: warm-up)."""
    for i in range(min(20, len(queries))):
        fn(queries[i:i + 1])
    times = []
    for i in range(min(n, len(queries))):
        t0 = time.perf_counter()
        fn(queries[i:i + 1])
        times.append(time.perf_counter() - t0)
    return {"p50_ms": round(1000 * float(np.percentile(times, 50)), 4),
            "p99_ms": round(1000 * float(np.percentile(times, 99)), 4)}


def resident(paths: list[Path]) -> int:
    """Bytes of `paths` this process has resident in its mappings (Rss in /proc/self/smaps)."""
    names = {str(p.resolve()) for p in paths}
    total, current = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5:
            current = parts[5] if len(parts) >= 6 else None
        elif parts and parts[0] == "Rss:" and current in names:
            total += int(parts[1]) * 1024
    return total


def keys(segments: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(segment, position) pairs as one int64 each (-1 for none)."""
    return np.where(positions >= 0, segments * (1 << 40) + positions, -1)


def index_corpus(corpus: Path, out: Path, index_type: str, m: int) -> dict:
    argv = [EMBEDCTL, "index", str(corpus), "--out", str(out), "--model", "minilm", "--dims", "256,128,64",
            "--index-type", index_type, "--hnsw-m", str(m), "--keep", str(len(RUNS)), "--quiet", "--json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDCTL_")}
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()[-2000:]}")
    report = json.loads(done.stdout[done.stdout.index("{"):])
    return {"index_type": index_type, "m": m, "seconds": round(time.perf_counter() - t0, 1),
            "rows_embedded": report.get("rows_embedded", report.get("embedded"))}


def wordnet(args, work: Path) -> dict:
    from embedctl.pipeline.index import IndexReader
    from embedctl.pipeline.segments import VECTORS_FILE, index_file

    glosses = pq.read_table(CORPORA / "wordnet_glosses.parquet", columns=["id", "text"])
    if args.rows:
        glosses = glosses.slice(0, args.rows)
    corpus = work / "glosses.parquet"
    pq.write_table(glosses, corpus)
    out = work / "wordnet"
    runs = []
    for kind, m in RUNS:
        runs.append(index_corpus(corpus, out, kind, m))
        print(f"  indexed {kind} M {m}: {runs[-1]}", file=sys.stderr, flush=True)
    versions = sorted((out / "versions").iterdir())[-len(RUNS):]
    queries = pq.read_table(CORPORA / "wordnet_queries.parquet")
    queries = queries.filter(pc.is_in(queries["relevant_id"], value_set=glosses["id"])).slice(0, args.queries)
    from bench.indexes import embeddings

    q = embeddings(queries.column("query").to_pylist(),
                   Path(args.cache) / f"funnel-queries-{len(glosses)}-{args.queries}-minilm.npy")
    lat_q = q[:args.latency_queries]
    readers = {label(kind, m): IndexReader(v) for (kind, m), v in zip(RUNS, versions, strict=True)}
    plain = readers[label(*RUNS[0])]
    rows = plain.info.rows
    full = plain.info.dim
    s, n, p = plain.search_positions(q, K, dim=full, exact=True)
    truth = keys(n, p)
    result = {"rows": rows, "queries": len(q), "latency_queries": len(lat_q), "full_dim": full, "index_runs": runs}

    def files(reader, name):
        return [seg.folder / name for seg in reader.segments]

    def file_bytes(reader, name):
        return sum(os.path.getsize(f) for f in files(reader, name))

    full_bytes = file_bytes(plain, index_file(full))
    plain.load(full)
    full_lat = latency(lambda x: plain.search_positions(x, K, dim=full), lat_q, args.latency_queries)
    _, n, p = plain.search_positions(q, K, dim=full)
    result["full_hnsw"] = {"dim": full, "type": "hnsw", "bytes_per_row": round(full_bytes / rows, 1),
                           "recall@10": recall(keys(n, p), truth), **full_lat}
    print(f"  full-dim HNSW: {result['full_hnsw']}", file=sys.stderr, flush=True)
    shortlists = []
    for kind, reader in readers.items():
        reader.load()
        for dim in SHORTLIST_DIMS:
            bytes_row = file_bytes(reader, index_file(dim)) / rows
            _, n, p = reader.search_positions(q, K, dim=dim)
            alone = latency(lambda x, r=reader, d=dim: r.search_positions(x, K, dim=d), lat_q, args.latency_queries)
            entry = {"type": kind, "dim": dim, "bytes_per_row": round(bytes_row, 1),
                     "bytes_vs_full_hnsw": round(bytes_row * rows / full_bytes, 4),
                     "alone_recall@10": recall(keys(n, p), truth), "alone": alone, "funnel": []}
            for size in SHORTLISTS:
                _, n, p = reader.funnel_positions(q, K, dim, size)
                lat = latency(lambda x, r=reader, d=dim, z=size: r.funnel_positions(x, K, d, z), lat_q,
                              args.latency_queries)
                same_ef = latency(lambda x, r=reader, d=dim, z=size: r.search_positions(x, z, dim=d, ef=z), lat_q,
                                  args.latency_queries)
                entry["funnel"].append({"shortlist": size, "recall@10": recall(keys(n, p), truth), **lat,
                                        "p50_vs_alone": round(lat["p50_ms"] / alone["p50_ms"], 3),
                                        "shortlist_alone_p50_ms": same_ef["p50_ms"],
                                        "p50_vs_shortlist_alone": round(lat["p50_ms"] / same_ef["p50_ms"], 3),
                                        "p50_vs_full_hnsw": round(lat["p50_ms"] / full_lat["p50_ms"], 3)})
            entry["resident_index_bytes_per_row"] = round(resident(files(reader, index_file(dim))) / rows, 1)
            entry["resident_vectors_bytes_per_row"] = round(resident(files(reader, VECTORS_FILE)) / rows, 1)
            shortlists.append(entry)
            print(f"  {kind} {dim}: {entry}", file=sys.stderr, flush=True)
    result["shortlists"] = shortlists
    result["goal"] = best(shortlists, result["full_hnsw"], 0.99, 0.25)
    result["fastest"] = best(shortlists, result["full_hnsw"], 0.99, 0.25, fastest=True)
    return result


def label(kind: str, m: int) -> str:
    return kind if m == RUNS[0][1] else f"{kind} M{m}"


def best(shortlists: list[dict], full: dict, min_recall: float, max_bytes: float,
         fastest: bool = False) -> dict | None:
    """The least resident shortlist (then the shortest list; `fastest`: the least p50) reaching `min_recall` within
    `max_bytes` of the full HNSW's bytes per row."""
    found = [((f["p50_ms"],) if fastest else (e["bytes_per_row"], f["shortlist"]), e, f)
             for e in shortlists for f in e["funnel"]
             if f["recall@10"] >= min_recall and e["bytes_vs_full_hnsw"] <= max_bytes]
    if not found:
        return None
    _, e, f = min(found, key=lambda t: t[0])
    return {"type": e["type"], "dim": e["dim"], "shortlist": f["shortlist"], "recall@10": f["recall@10"],
            "bytes_vs_full_hnsw": e["bytes_vs_full_hnsw"], "p50_ms": f["p50_ms"],
            "p50_vs_alone": f["p50_vs_alone"], "alone_p50_ms": e["alone"]["p50_ms"],
            "shortlist_alone_p50_ms": f["shortlist_alone_p50_ms"], "p50_vs_shortlist_alone": f["p50_vs_shortlist_alone"],
            "p50_vs_full_hnsw": f["p50_vs_full_hnsw"], "full_hnsw_p50_ms": full["p50_ms"]}


def synthetic_vectors(rows: int, queries: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered vectors with Matryoshka-like energy decay (see the module's docstring), normalised, float32."""
    rng = np.random.default_rng(seed)
    scale = ((1 + np.arange(dim) / 64) ** -0.5).astype(np.float32)
    centres = rng.standard_normal((max(rows // 50, 1), dim), dtype=np.float32) * scale
    member = rng.integers(0, len(centres), rows)
    x = centres[member] + 0.6 * rng.standard_normal((rows, dim), dtype=np.float32) * scale
    near = member[rng.integers(0, rows, queries)]
    q = centres[near] + 0.6 * rng.standard_normal((queries, dim), dtype=np.float32) * scale
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def synthetic(args, work: Path) -> dict:
    import faiss

    from embedctl.pipeline.index import build_hnsw, rerank, slice_normalise
    from embedctl.pipeline.segments import open_index

    full, small = 2560, 256
    x, q = synthetic_vectors(args.synthetic_rows, args.queries_synthetic, full)
    exact = faiss.IndexFlatIP(full)
    exact.add(x)
    _, truth = exact.search(q, K)
    del exact
    energy = float(np.mean(np.sum(x[:, :small] ** 2, axis=1)))
    vectors_path = work / "vectors.npy"
    np.save(vectors_path, x.astype(np.float16))
    result = {"rows": len(x), "queries": len(q), "full_dim": full, "shortlist_dim": small,
              "energy_in_shortlist_dims": round(energy, 3)}
    indexes = {}
    for name, dim, kind in (("full_hnsw", full, "hnsw"), ("shortlist", small, "hnsw-sq8")):
        t0 = time.perf_counter()
        index = build_hnsw(slice_normalise(x, dim), 32, 200, 64, index_type=kind)
        path = work / f"{name}.faiss"
        faiss.write_index(index, str(path))
        del index
        indexes[name] = open_index(path)
        result[name] = {"dim": dim, "type": kind, "build_s": round(time.perf_counter() - t0, 1),
                        "bytes_per_row": round(os.path.getsize(path) / len(x), 1)}
        print(f"  built {name}: {result[name]}", file=sys.stderr, flush=True)
    del x
    vectors = np.load(vectors_path, mmap_mode="r")
    _, found = indexes["full_hnsw"].search(q, K)
    result["full_hnsw"]["recall@10"] = recall(found, truth)
    result["full_hnsw"].update(latency(lambda y: indexes["full_hnsw"].search(y, K), q, args.latency_queries))
    qs = slice_normalise(q, small)
    result["funnel"] = []
    for size in SHORTLISTS:
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(64, size)

        def funnel(y, ys, z=size, pr=params):
            _, cand = indexes["shortlist"].search(ys, z, params=pr)
            return rerank(vectors, y, cand, K)

        _, found = funnel(q, qs)
        lat = latency(lambda y: funnel(y, slice_normalise(y, small)), q, args.latency_queries)
        result["funnel"].append({"shortlist": size, "recall@10": recall(found, truth), **lat,
                                 "bytes_vs_full_hnsw": round(result["shortlist"]["bytes_per_row"]
                                                             / result["full_hnsw"]["bytes_per_row"], 4)})
        print(f"  funnel {size}: {result['funnel'][-1]}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=0, help="WordNet glosses indexed (0: all 117,659).")
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--latency-queries", type=int, default=500)
    parser.add_argument("--synthetic-rows", type=int, default=50_000)
    parser.add_argument("--queries-synthetic", type=int, default=1000)
    parser.add_argument("--skip", default="", help="Comma-separated parts to skip: wordnet, synthetic.")
    parser.add_argument("--cache", default=str(ROOT / "bench-results" / "cache"))
    parser.add_argument("--plots", default=None, help="Write funnel.png here.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    result = {"command": "python -m bench.funnel " + " ".join(sys.argv[1:]), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="embedctl-funnel-") as tmp:
        if "wordnet" not in skip:
            if not (CORPORA / "wordnet_glosses.parquet").exists():
                sys.exit(f"{CORPORA} is absent: the WordNet part needs ../shared/corpora (--skip wordnet)")
            result["wordnet"] = wordnet(args, Path(tmp))
        if "synthetic" not in skip:
            (Path(tmp) / "synthetic").mkdir()
            result["synthetic"] = synthetic(args, Path(tmp) / "synthetic")
    if args.plots:
        plot(result, Path(args.plots))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(report(result))


def report(result: dict) -> str:
    """The result as the benchmark report's markdown."""
    lines = [f"`{result['command']}` ({result['cpus']} CPUs)", ""]
    if "wordnet" in result:
        w = result["wordnet"]
        f = w["full_hnsw"]
        lines += [f"WordNet: {w['rows']} glosses, MiniLM ({w['full_dim']} dims), {w['queries']} usage-example "
                  f"queries; recall@10 against exact {w['full_dim']}-dim search; latency over "
                  f"{w['latency_queries']} single queries. Index runs: "
                  + ", ".join(f"{label(r['index_type'], r['m'])} {r['seconds']} s ({r['rows_embedded']} rows embedded)"
                              for r in w["index_runs"]), "",
                  f"The {f['dim']}-dim HNSW (float32): {f['bytes_per_row']} bytes a row, recall@10 "
                  f"{f['recall@10']}, p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms.", "",
                  "| shortlist index | bytes/row (vs full HNSW) | resident after the runs: index / vectors.npy "
                  "bytes/row | alone: recall@10, p50 ms | funnel recall@10 at shortlist "
                  + " / ".join(map(str, SHORTLISTS)) + " | funnel p50 ms |", "|---|---|---|---|---|---|"]
        for e in w["shortlists"]:
            lines.append(f"| {e['type']} {e['dim']} | {e['bytes_per_row']} ({e['bytes_vs_full_hnsw']}) | "
                         f"{e['resident_index_bytes_per_row']} / {e['resident_vectors_bytes_per_row']} | "
                         f"{e['alone_recall@10']}, {e['alone']['p50_ms']} | "
                         + " / ".join(str(x["recall@10"]) for x in e["funnel"]) + " | "
                         + " / ".join(str(x["p50_ms"]) for x in e["funnel"]) + " |")
        for name, g in (("the least memory", w["goal"]), ("the fastest", w["fastest"])):
            lines += ["", f"Goal (recall@10 >= 0.99 at <= 0.25 of the full HNSW's bytes a row), {name}: "
                      + (f"**{g['type']} {g['dim']}, shortlist {g['shortlist']}**: recall@10 {g['recall@10']}, "
                         f"bytes {g['bytes_vs_full_hnsw']} of the full HNSW's, p50 {g['p50_ms']} ms = "
                         f"{g['p50_vs_shortlist_alone']}x the shortlist index alone searched for the shortlist "
                         f"({g['shortlist_alone_p50_ms']} ms), {g['p50_vs_alone']}x it searched for 10 at its "
                         f"stored efSearch ({g['alone_p50_ms']} ms), {g['p50_vs_full_hnsw']}x the full-dim HNSW "
                         f"({g['full_hnsw_p50_ms']} ms)" if g else "no shortlist reached it")]
        lines.append("")
    if "synthetic" in result:
        s = result["synthetic"]
        f, sl = s["full_hnsw"], s["shortlist"]
        lines += [f"Synthetic reference shape: {s['rows']} rows of {s['full_dim']} dims "
                  f"({s['energy_in_shortlist_dims']} of the energy in the first {s['shortlist_dim']}), "
                  f"{s['queries']} queries. {f['dim']}-dim HNSW: {f['bytes_per_row']} bytes a row, recall@10 "
                  f"{f['recall@10']}, p50 {f['p50_ms']} ms, built in {f['build_s']} s; {sl['type']} {sl['dim']} "
                  f"shortlist: {sl['bytes_per_row']} bytes a row "
                  f"({round(sl['bytes_per_row'] / f['bytes_per_row'], 4)} of it), built in {sl['build_s']} s.", "",
                  "| shortlist | recall@10 vs exact | p50 ms | p99 ms |", "|---|---|---|---|"]
        lines += [f"| {x['shortlist']} | {x['recall@10']} | {x['p50_ms']} | {x['p99_ms']} |" for x in s["funnel"]]
    return "\n".join(lines)


def plot(result: dict, folder: Path) -> None:
    """funnel.png: recall@10 against bytes a row resident, the funnel's shortlist indexes beside plain HNSW."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    w = result.get("wordnet")
    if w:
        for e in w["shortlists"]:
            ax.plot([e["bytes_per_row"]] * len(e["funnel"]), [x["recall@10"] for x in e["funnel"]], "o",
                    alpha=0.6, label=f"funnel {e['type']} {e['dim']} (shortlist {SHORTLISTS[0]}-{SHORTLISTS[-1]})")
            ax.plot([e["bytes_per_row"]], [e["alone_recall@10"]], "kx")
        f = w["full_hnsw"]
        ax.plot([f["bytes_per_row"]], [f["recall@10"]], "r*", markersize=12, label=f"HNSW {f['dim']} (float32)")
    ax.axhline(0.99, color="grey", linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("index bytes a row (resident when hot)")
    ax.set_ylabel("recall@10 vs exact full-dim search")
    ax.set_title("Funnel search on WordNet (x: the shortlist index alone)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(folder / "funnel.png", dpi=120)
    plt.close("all")


if __name__ == "__main__":
    main()
