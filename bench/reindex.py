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
    finally:
        shutil.rmtree(work, ignore_errors=True)
    full = runs["full"]["seconds"]
    result = {"command": "python -m bench.reindex " + " ".join(sys.argv[1:]), "rows": args.rows,
              "model": args.model, "cpus": os.cpu_count(), "runs": runs,
              "unchanged_over_full": round(runs["unchanged"]["seconds"] / full, 4),
              "changed_over_full": round(runs["changed"]["seconds"] / full, 4)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"# re-indexing cost ({result['command']})")
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


if __name__ == "__main__":
    main()
