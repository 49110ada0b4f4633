"""Distributed vs embedded embedding throughput on the same machine, same corpus, same model.

    python -m bench.distributed [--rows 20000] [--chunk-rows 1000] [--model minilm] [--json]

Embedded: `embedctl index` in one process with 2 intra-op threads. Distributed: a real redis-server and one
prefork Celery worker with 2 pool children of 1 thread each, attached to the shared-memory weights, driven by
`embedctl index --broker`. Throughput is texts/s of the embedding stage (submit or start, to the last chunk
written; models already loaded in both: the worker's children attach at start, the embedded run's load is
outside its embed timer). Needs ../shared/corpora/wordnet_glosses.parquet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
GLOSSES = ROOT.parent / "shared" / "corpora" / "wordnet_glosses.parquet"
EMBEDCTL = str(Path(sys.executable).parent / "embedctl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--chunk-rows", type=int, default=1000)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not GLOSSES.exists():
        sys.exit(f"{GLOSSES} is absent: this benchmark needs the WordNet corpus in ../shared/corpora")
    from tests.services import RedisServer, Worker

    work = Path(tempfile.mkdtemp(prefix="embedctl-bench-dist-"))
    shm = Path("/dev/shm") / f"embedctl-bench-{uuid.uuid4().hex[:8]}"
    shm.mkdir(mode=0o700)
    corpus = work / "glosses.parquet"
    pq.write_table(pq.read_table(GLOSSES).slice(0, args.rows), corpus)
    redis = RedisServer(work / "redis").start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDCTL_")}
    env.update(EMBEDCTL_SHM_DIR=str(shm), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    common = ["--model", args.model, "--chunk-rows", str(args.chunk_rows), "--quiet", "--json"]
    worker = None
    try:
        embedded = json.loads(subprocess.run(
            [EMBEDCTL, "index", str(corpus), "--out", str(work / "embedded"), "--threads", "2", "--shm", "off",
             *common], env=env, capture_output=True, text=True, check=True).stdout)
        subprocess.run([EMBEDCTL, "shm", "publish", "--model", args.model], env=env, check=True,
                       capture_output=True)
        worker = Worker({**env, "EMBEDCTL_BROKER_URL": redis.url, "EMBEDCTL_MODEL": args.model,
                         "EMBEDCTL_THREADS": "1"}, work / "worker.log", concurrency=2).start()
        distributed = json.loads(subprocess.run(
            [EMBEDCTL, "index", str(corpus), "--out", str(work / "distributed"), "--broker", redis.url, *common],
            env=env, capture_output=True, text=True, check=True).stdout)
    finally:
        if worker:
            worker.stop()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    e_rate = embedded["rows_embedded"] / embedded["embed_seconds"]
    d_rate = distributed["rows_embedded"] / distributed["embed_seconds"]
    result = {"command": "python -m bench.distributed " + " ".join(sys.argv[1:]), "rows": args.rows,
              "chunk_rows": args.chunk_rows, "model": args.model, "cpus": os.cpu_count(),
              "embedded_texts_per_s": round(e_rate, 1), "distributed_texts_per_s": round(d_rate, 1),
              "ratio": round(d_rate / e_rate, 3), "embedded_total_s": embedded["seconds"],
              "distributed_total_s": distributed["seconds"]}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"# distributed vs embedded ({result['command']})")
    print(f"{args.rows} WordNet glosses, {args.model}, chunks of {args.chunk_rows}, {result['cpus']} CPUs")
    print("| run | texts/s (embedding stage) | whole command (s) |")
    print("|---|---|---|")
    print(f"| embedded, 1 process x 2 threads | {result['embedded_texts_per_s']} | {result['embedded_total_s']} |")
    print(f"| distributed, 2 pool children x 1 thread | {result['distributed_texts_per_s']} | "
          f"{result['distributed_total_s']} |")
    print(f"ratio distributed / embedded: {result['ratio']}")


if __name__ == "__main__":
    main()
