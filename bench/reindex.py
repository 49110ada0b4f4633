"""Re-indexing cost: an unchanged corpus and a 1%-changed one, against a full index of the same corpus.

    python -m bench.reindex [--rows 20000] [--changed 0.01] [--model minilm] [--json]

All three runs go through `jobs.runner.run_embedded` in this process, with the default dims and HNSW settings:
the full run embeds everything and builds every index; the unchanged run finds the published version up to
date; the 1% run changes that share of the texts, embeds only those (the rest come from the embedding cache)
and rebuilds every index. Times include loading the model where a run needs it. Needs
../shared/corpora/wordnet_glosses.parquet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
GLOSSES = ROOT.parent / "shared" / "corpora" / "wordnet_glosses.parquet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not GLOSSES.exists():
        sys.exit(f"{GLOSSES} is absent: this benchmark needs the WordNet corpus in ../shared/corpora")
    from embedctl.jobs.runner import run_embedded
    from embedctl.jobs.spec import JobSpec

    work = Path(tempfile.mkdtemp(prefix="embedctl-bench-reindex-"))
    table = pq.read_table(GLOSSES).slice(0, args.rows)
    try:
        runs = _three_runs(run_embedded, JobSpec, table, work / "job", args, shm="off")
        same = _against_a_fresh_build(run_embedded, JobSpec, work / "job", args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    full = runs["full"]["seconds"]
    result = {"command": "python -m bench.reindex " + " ".join(sys.argv[1:]), "rows": args.rows,
              "model": args.model, "cpus": os.cpu_count(), "runs": runs,
              "unchanged_over_full": round(runs["unchanged"]["seconds"] / full, 4),
              "changed_over_full": round(runs["changed"]["seconds"] / full, 4), "against_fresh_build": same}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"# re-indexing cost ({result['command']})")
    print(json.dumps(same))
    print(f"{args.rows} WordNet glosses, {args.model}, default dims and HNSW, {result['cpus']} CPUs")
    print("| run | seconds | rows embedded | rows reused | ratio to full |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['seconds']} | {r['rows_embedded']} | {r['rows_reused']} | "
              f"{round(r['seconds'] / full, 4)} |")


def _three_runs(run_embedded, JobSpec, table, work: Path, args, shm: str) -> dict:  # noqa: N803
    work.mkdir(parents=True)
    corpus = work / "glosses.parquet"
    pq.write_table(table, corpus)
    spec = JobSpec(corpus=str(corpus), out=str(work / "out"), model=args.model, shm=shm)
    runs = {}
    for name in ("full", "unchanged", "changed"):
        if name == "changed":
            n = int(args.rows * args.changed)
            texts = table.column("text").to_pylist()
            for i in range(0, args.rows, args.rows // n)[:n]:
                texts[i] = texts[i] + " (revised)"
            pq.write_table(table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts)), corpus)
        t0 = time.perf_counter()
        report = run_embedded(spec).to_dict()
        runs[name] = {"seconds": round(time.perf_counter() - t0, 3), "status": report["status"],
                      "rows_embedded": report["rows_embedded"], "rows_reused": report.get("rows_reused", 0)}
    assert runs["unchanged"]["rows_embedded"] == 0
    assert runs["changed"]["rows_embedded"] == int(args.rows * args.changed)
    return runs


def _against_a_fresh_build(run_embedded, JobSpec, job: Path, args) -> dict:  # noqa: N803
    """The incremental version against a build from scratch of the same corpus (from the same stored vectors: a
    copy of the job's work folder, so only the indexes are built): ids lost or duplicated, and how many queries
    get the same top 10 (HNSW at the default efSearch, and exact search)."""
    import numpy as np

    from embedctl.pipeline import versions
    from embedctl.pipeline.index import IndexReader

    fresh = job.parent / "fresh"
    fresh.mkdir()
    shutil.copytree(job / "out" / "work", fresh / "work")
    run_embedded(JobSpec(corpus=str(job / "glosses.parquet"), out=str(fresh), model=args.model, shm="off"))
    inc_ids, fresh_ids = (versions.live_ids(versions.current_version(p)).to_pylist() for p in (job / "out", fresh))
    queries = pq.read_table(GLOSSES.parent / "wordnet_queries.parquet").slice(0, 1000).column("query").to_pylist()
    from embedctl.pipeline.encoder import load_encoder
    from embedctl.pipeline.models import resolve_model

    qvec = load_encoder(resolve_model(args.model), device="cpu", shm="off").encode(queries).vectors
    same = {}
    for exact in (False, True):
        tops = []
        for path in (job / "out", fresh):
            reader = IndexReader(path)
            _, segments, positions = reader.search_positions(qvec, 10, exact=exact)
            looked = [seg.lookup(positions[segments == n]) for n, seg in enumerate(reader.segments)]
            tops.append([[looked[s][int(p)][0] for s, p in zip(qs, qp, strict=True) if p >= 0]
                         for qs, qp in zip(segments, positions, strict=True)])
        same["exact" if exact else "hnsw"] = round(float(np.mean([a == b for a, b in zip(*tops, strict=True)])), 4)
    return {"ids_incremental": len(inc_ids), "ids_fresh": len(fresh_ids),
            "lost": len(set(fresh_ids) - set(inc_ids)), "duplicated": len(inc_ids) - len(set(inc_ids)),
            "queries": len(queries), "same_top10_share": same}


if __name__ == "__main__":
    main()
