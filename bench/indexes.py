"""Index benchmark: build time, size, recall vs exact and latency per dim and index type; retrieval quality.

    python -m bench.indexes [--rows 20000] [--queries 2000] [--json] [--plots DIR]

Vectors: MiniLM embeddings of WordNet glosses (cached under bench-results/cache). For each dim (full and the
Matryoshka slices) and index type (hnsw, hnsw-sqfp16, hnsw-sq8): build seconds per 10k vectors, file bytes,
recall@10 against exact search on the float32 vectors, p50/p99 single-query latency at efSearch 16/64/256; and
the retrieval quality on the WordNet usage examples (recall@1/@10 of the relevant gloss, exact vs HNSW at
efSearch 64), through `pipeline.evaluate`, the code `embedctl eval` runs. Needs ../shared/corpora.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
CORPORA = ROOT.parent / "shared" / "corpora"
EFS = (16, 64, 256)
TYPES = ("hnsw", "hnsw-sqfp16", "hnsw-sq8")


def embeddings(texts: list[str], cache: Path, prefix: str = "") -> np.ndarray:
    """MiniLM vectors of `texts`, cached on disk (the benchmark measures indexes, not the encoder)."""
    if cache.exists():
        return np.load(cache)
    from embedctl.pipeline.encoder import load_encoder
    from embedctl.pipeline.models import resolve_model

    vectors = load_encoder(resolve_model("minilm"), device="cpu", shm="off").encode(texts, prefix=prefix).vectors
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--cache", default=str(ROOT / "bench-results" / "cache"))
    parser.add_argument("--plots", default=None, help="Write quality_vs_dim.png and recall_vs_ef.png here.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not (CORPORA / "wordnet_glosses.parquet").exists():
        sys.exit(f"{CORPORA} is absent: this benchmark needs the WordNet corpora in ../shared/corpora")
    import faiss

    from embedctl.pipeline.evaluate import _metrics
    from embedctl.pipeline.index import build_hnsw, slice_normalise
    from embedctl.pipeline.plan import index_dims

    glosses = pq.read_table(CORPORA / "wordnet_glosses.parquet", columns=["id", "text"]).slice(0, args.rows)
    queries = pq.read_table(CORPORA / "wordnet_queries.parquet")
    queries = queries.filter(pc.is_in(queries["relevant_id"], value_set=glosses["id"])).slice(0, args.queries)
    cache = Path(args.cache)
    full = embeddings(glosses.column("text").to_pylist(), cache / f"glosses-{args.rows}-minilm.npy")
    qv = embeddings(queries.column("query").to_pylist(), cache / f"queries-{args.rows}-{args.queries}-minilm.npy")
    position = {i: n for n, i in enumerate(glosses.column("id").to_pylist())}
    relevant = np.array([position[r] for r in queries.column("relevant_id").to_pylist()])
    rows, quality = [], {}
    for dim in index_dims(full.shape[1], None, (1024, 512, 256, 128, 64)):
        x, q = slice_normalise(full, dim), slice_normalise(qv, dim)
        exact = faiss.IndexFlatIP(dim)
        exact.add(x)
        _, truth = exact.search(q, 10)
        quality[dim] = {"exact": _metrics(truth, relevant, (1, 10))}
        for kind in TYPES:
            t0 = time.perf_counter()
            index = build_hnsw(x, 32, 200, 64, index_type=kind)
            build = time.perf_counter() - t0
            with tempfile.NamedTemporaryFile(suffix=".faiss") as fh:
                faiss.write_index(index, fh.name)
                size = os.path.getsize(fh.name)
            row = {"dim": dim, "type": kind, "build_s_per_10k": round(build / len(x) * 10_000, 3), "bytes": size}
            for ef in EFS:
                index.hnsw.efSearch = ef
                _, found = index.search(q, 10)
                row[f"recall@10_ef{ef}"] = round(float(np.mean(
                    [len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])), 4)
                lat = []
                for i in range(min(500, len(q))):
                    t1 = time.perf_counter()
                    index.search(q[i:i + 1], 10)
                    lat.append(time.perf_counter() - t1)
                row[f"p50_ms_ef{ef}"] = round(1000 * float(np.percentile(lat, 50)), 4)
                row[f"p99_ms_ef{ef}"] = round(1000 * float(np.percentile(lat, 99)), 4)
                if ef == 64:
                    quality[dim][kind] = _metrics(found, relevant, (1, 10))
            rows.append(row)
    result = {"command": "python -m bench.indexes " + " ".join(sys.argv[1:]), "rows": len(full),
              "queries": len(q), "cpus": os.cpu_count(), "indexes": rows,
              "quality": {str(d): v for d, v in quality.items()}}
    if args.plots:
        plot(result, Path(args.plots))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"# indexes ({result['command']}): {result['rows']} vectors, {result['queries']} queries")
    keys = ["dim", "type", "build_s_per_10k", "bytes"] + [f"{m}_ef{ef}" for ef in EFS
                                                          for m in ("recall@10", "p50_ms", "p99_ms")]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    print("\n| dim | exact R@1 | exact R@10 | hnsw R@1 | hnsw R@10 | sq8 R@10 |")
    print("|---|---|---|---|---|---|")
    for d, v in quality.items():
        print(f"| {d} | {v['exact']['recall@1']} | {v['exact']['recall@10']} | {v['hnsw']['recall@1']} | "
              f"{v['hnsw']['recall@10']} | {v['hnsw-sq8']['recall@10']} |")


def plot(result: dict, folder: Path) -> None:
    """quality_vs_dim.png (the Matryoshka trade-off) and recall_vs_ef.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    dims = sorted(int(d) for d in result["quality"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("exact", "-o"), ("hnsw", "--s"), ("hnsw-sq8", ":^")):
        for k in (1, 10):
            ax.plot(dims, [result["quality"][str(d)][kind][f"recall@{k}"] for d in dims], style,
                    label=f"{kind} recall@{k}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set_xlabel("dims (Matryoshka slice)")
    ax.set_ylabel("WordNet usage example -> gloss")
    ax.set_title(f"Retrieval quality vs dim ({result['rows']} glosses, MiniLM)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "quality_vs_dim.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in result["indexes"]:
        if r["type"] != "hnsw":
            continue
        ax.plot([r[f"p50_ms_ef{ef}"] for ef in EFS], [r[f"recall@10_ef{ef}"] for ef in EFS], "-o",
                label=f"{r['dim']}d")
    ax.set_xlabel("p50 latency per query (ms), efSearch 16 / 64 / 256")
    ax.set_ylabel("recall@10 vs exact")
    ax.set_title("HNSW: recall vs latency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "recall_vs_ef.png", dpi=120)
    plt.close("all")


if __name__ == "__main__":
    main()
