"""What verified state costs: hash speed, checksumming's share of an index run, `embedctl verify`, and the checks a
reader makes before it searches.

    python -m bench.verify [--rows 20000] [--model minilm] [--rounds 5] [--json]

- Hash throughput (GiB/s, best of 3 on 256 MiB in memory): XXH3-128 (what embedctl uses), BLAKE3 (one thread and
  all cores, when the `blake3` package is installed), SHA-256.
- `embedctl index` of the corpus in this process: the time spent in embedctl's checksum function (writing the
  chunk and index checksums, and checking every chunk before the build) as a share of the whole run.
- `embedctl verify` of the healthy index: in-process time and the command's wall time.
- Opening the index and loading every dim, as `embedctl query` does, with and without checking the files
  (`--no-verify`), and the whole `embedctl query` command both ways: medians of `--rounds` alternated rounds.
Needs ../shared/corpora/wordnet_glosses.parquet (else it uses the 3,000-row sample and says so).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
GLOSSES = ROOT.parent / "shared" / "corpora" / "wordnet_glosses.parquet"
SAMPLE = ROOT / "examples" / "wordnet" / "glosses.parquet"


def hash_speeds() -> dict:
    import xxhash

    data = np.random.default_rng(0).integers(0, 255, size=256 << 20, dtype=np.uint8).tobytes()

    def rate(fn) -> float:
        best = min(_timed(fn) for _ in range(3))
        return round(len(data) / best / 2**30, 2)

    speeds = {"xxh3_128": rate(lambda: xxhash.xxh3_128(data).hexdigest()),
              "sha256": rate(lambda: hashlib.sha256(data).hexdigest())}
    try:
        import blake3
    except ImportError:
        speeds["blake3"] = "not installed"
    else:
        speeds["blake3_1_thread"] = rate(lambda: blake3.blake3(data).hexdigest())
        speeds["blake3_all_cores"] = rate(lambda: blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest())
    return speeds


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _Clock:
    """Wraps embedctl's checksum function (where the modules that use it look it up) and adds up its time."""

    def __init__(self):
        import embedctl.pipeline.checksum as module
        import embedctl.pipeline.index as index

        self.seconds, self.bytes, self.calls = 0.0, 0, 0
        self._targets = [(module, module.checksum), (index, index.checksum)]
        original = module.checksum

        def timed(path):
            t0 = time.perf_counter()
            result = original(path)
            self.seconds += time.perf_counter() - t0
            self.bytes += result["bytes"]
            self.calls += 1
            return result

        for target, _ in self._targets:
            target.checksum = timed

    def restore(self) -> None:
        for target, original in self._targets:
            target.checksum = original


def index_run(corpus: Path, out: Path, model: str) -> dict:
    from embedctl.jobs.runner import run_embedded
    from embedctl.jobs.spec import JobSpec

    clock = _Clock()
    try:
        t0 = time.perf_counter()
        report = run_embedded(JobSpec(corpus=str(corpus), out=str(out), model=model, shm="off"))
        seconds = time.perf_counter() - t0
    finally:
        clock.restore()
    return {"rows": report.rows_indexed, "run_seconds": round(seconds, 3),
            "checksum_seconds": round(clock.seconds, 4), "checksum_calls": clock.calls,
            "checksum_mib": round(clock.bytes / 2**20, 1), "checksum_share_of_run": round(clock.seconds / seconds, 5)}


def verify_cost(out: Path) -> dict:
    from embedctl.jobs.verify import check

    found = check(out)
    assert found.ok, found.damaged
    t0 = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).parent / "embedctl"), "verify", str(out)], capture_output=True,
                            text=True)
    wall = time.perf_counter() - t0
    assert result.returncode == 0, result.stderr
    return {"files": found.files, "chunks": found.chunks, "mib": round(found.bytes / 2**20, 1),
            "check_seconds": found.seconds, "command_wall_seconds": round(wall, 3),
            "command": f"embedctl verify {out.name}"}


def reader_load(out: Path, rounds: int) -> dict:
    """Open the index and load every dim (what a query does before it searches), checked and not, alternated."""
    from embedctl.pipeline.index import IndexReader

    def load(verify: bool) -> float:
        t0 = time.perf_counter()
        reader = IndexReader(out, verify=verify)
        reader.load()  # every dim of every segment
        return time.perf_counter() - t0

    load(True)  # the page cache warm for both
    times = {True: [], False: []}
    for _ in range(rounds):
        for verify in (False, True):
            times[verify].append(load(verify))
    checked, unchecked = statistics.median(times[True]), statistics.median(times[False])
    return {"rounds": rounds, "load_seconds_checked": round(checked, 4), "load_seconds_unchecked": round(unchecked, 4),
            "check_seconds": round(checked - unchecked, 4),
            "index_mib": round(sum(p.stat().st_size for p in out.glob("current/*")) / 2**20, 1)}


def query_wall(out: Path, rounds: int) -> dict:
    """`embedctl query` from start to answer, checked and `--no-verify`, alternated (medians)."""
    cmd = [str(Path(sys.executable).parent / "embedctl"), "query", str(out), "a domestic animal that barks", "-k", "3"]
    times = {"checked": [], "no_verify": []}
    for _ in range(rounds):
        for name, extra in (("no_verify", ["--no-verify"]), ("checked", [])):
            t0 = time.perf_counter()
            result = subprocess.run(cmd + extra, capture_output=True, text=True)
            times[name].append(time.perf_counter() - t0)
            assert result.returncode == 0, result.stderr
    checked, unchecked = statistics.median(times["checked"]), statistics.median(times["no_verify"])
    return {"rounds": rounds, "wall_seconds_checked": round(checked, 3), "wall_seconds_no_verify": round(unchecked, 3),
            "ratio": round(checked / unchecked, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.rows < 1 or args.rounds < 1:
        parser.error("--rows and --rounds must be at least 1")
    source = GLOSSES if GLOSSES.exists() else SAMPLE
    work = Path(tempfile.mkdtemp(prefix="embedctl-bench-verify-"))
    try:
        corpus = work / "glosses.parquet"
        table = pq.read_table(source)
        pq.write_table(table.slice(0, min(args.rows, table.num_rows)), corpus)
        result = {"command": "python -m bench.verify " + " ".join(sys.argv[1:]), "cpus": os.cpu_count(),
                  "corpus": source.name, "hash_gib_per_s": hash_speeds(),
                  "index": index_run(corpus, work / "out", args.model)}
        result["verify"] = verify_cost(work / "out")
        result["reader"] = reader_load(work / "out", args.rounds)
        result["reader"]["check_share_of_load"] = round(
            result["reader"]["check_seconds"] / result["reader"]["load_seconds_checked"], 3)
        result["query"] = query_wall(work / "out", args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
