"""`embedctl serve` against its peers, and shared weights against per-worker loading.

    python -m bench.serve [--seconds 5] [--rounds 3] [--levels 1,8,32] [--threads 2] [--peers embedctl,infinity,st]
                          [--layers 2] [--workers 4] [--skip-memory] [--plots DIR] [--json]

Throughput: each server embeds the same local all-MiniLM-L6-v2 folder with the same number of threads; a load
generator in this process keeps C requests in flight (C threads, one keep-alive connection each), every request
one text never sent before (WordNet glosses, so no cache answers), and counts answers per second and latency
percentiles over `--seconds` after a warm-up. All peers run at once and are measured in turns, round after
round (medians over `--rounds`; the ratios are medians of each round's ratio, range in brackets). Peers, each in a virtual environment this benchmark makes (once,
under ~/.cache/embedctl-bench; pip reads the package index configured on this machine):
- `embedctl serve` (this checkout's .venv);
- infinity-emb (`infinity_emb v2`, torch engine on CPU; it pins numpy<2 and sentence-transformers<4);
- a plain FastAPI + sentence-transformers server (`bench/peers/st_server.py`: `model.encode` per request).

Memory and start-up: a random Qwen3 at the width of Qwen3-Embedding-4B with `--layers` layers, saved in bf16
(as `bench.shm_memory` builds it); `embedctl serve --workers 4 --dtype fp32` with the weights attached from
shared memory vs loaded by each worker (`--shm off`: a private fp32 copy each). Total PSS of the worker
processes once all are ready, and the time from starting the command to the first answered /v1/embeddings.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np

from tests.services import free_port, stop_group

ROOT = Path(__file__).resolve().parent.parent
VENVS = Path(os.environ.get("EMBEDCTL_BENCH_VENVS", Path.home() / ".cache" / "embedctl-bench"))
TORCH = "torch==2.13.0"  # the CPU build (installed first, so that no peer pulls a CUDA build)
PEER_REQUIREMENTS = {
    "infinity": ["infinity-emb[server]==0.0.78", "sentence-transformers<4", "numpy<2"],
    "st": ["fastapi>=0.110", "uvicorn>=0.30", "sentence-transformers>=3"],
}


def peer_venv(name: str) -> Path:
    """The virtual environment of a peer (made once, reused while its requirements stay the same)."""
    requirements = [TORCH, *PEER_REQUIREMENTS[name]]
    folder = VENVS / f"{name}-{hashlib.sha256(' '.join(requirements).encode()).hexdigest()[:8]}"
    python = folder / "bin" / "python"
    if (folder / ".complete").exists():
        return python
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, *PEER_REQUIREMENTS[name]], check=True)
    (folder / ".complete").write_text("\n".join(requirements))
    return python


class Process:
    """A server process in its own group, logging to a file."""

    def __init__(self, argv: list[str], env: dict, log: Path, scratch: Path | None = None):
        self.log, self.scratch = log, scratch  # scratch: a folder removed once the process stopped
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(argv, env=env, cwd=log.parent, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        stop_group(self.proc)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _post(port: int, path: str, body: dict, timeout: float = 30) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_answer(port: int, path: str, body: dict, proc: Process, timeout: float = 300) -> float:
    """Poll until the server answers `body` with 200; returns the time it took."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"{proc.log} exited {proc.proc.returncode}: {proc.text()[-2000:]}")
        try:
            status, _ = _post(port, path, body, timeout=10)
            if status == 200:
                return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{proc.log}: no answer in {timeout} s: {proc.text()[-2000:]}")


def start_peer(name: str, model: Path, threads: int, work: Path) -> tuple[Process, int, str, str]:
    """(process, port, path, model name) of a peer serving `model`, once it answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDCTL_")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if name == "embedctl":
        shm = Path("/dev/shm") / f"embedctl-bench-{uuid.uuid4().hex[:8]}"
        shm.mkdir(mode=0o700)
        env["EMBEDCTL_SHM_DIR"] = str(shm)
        argv = [str(Path(sys.executable).parent / "embedctl"), "serve", "--model", str(model), "--port", str(port),
                "--workers", "1", "--threads", str(threads)]
        served, path = str(model), "/v1/embeddings"
    elif name == "infinity":
        python = peer_venv("infinity")
        argv = [str(python.parent / "infinity_emb"), "v2", "--model-id", str(model), "--port", str(port),
                "--engine", "torch", "--device", "cpu", "--no-bettertransformer", "--batch-size", "32",
                "--served-model-name", "minilm"]
        served, path = "minilm", "/embeddings"
    else:
        python = peer_venv("st")
        argv = [str(python), str(ROOT / "bench" / "peers" / "st_server.py"), str(model), str(port), str(threads)]
        served, path = "minilm", "/v1/embeddings"
    process = Process(argv, env, work / f"{name}.log", Path(env["EMBEDCTL_SHM_DIR"]) if name == "embedctl" else None)
    wait_answer(port, path, {"model": served, "input": ["warm up"]}, process)
    return process, port, path, served


def load(port: int, path: str, model: str, texts: list[str], concurrency: int, seconds: float,
         warmup: float = 1.0) -> dict:
    """C threads with a keep-alive connection each, a new text per request; answers/s and latency percentiles."""
    cursor, lock = iter(texts), threading.Lock()
    stop_at = time.perf_counter() + warmup + seconds
    measure_from = time.perf_counter() + warmup
    latencies, errors = [], []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                text = next(cursor, None)
            now = time.perf_counter()
            if text is None or now >= stop_at:
                break
            body = json.dumps({"model": model, "input": [text], "encoding_format": "float"})
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException) as exc:
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                errors.append(repr(exc))
            t1 = time.perf_counter()
            if t0 >= measure_from:
                with lock:
                    (latencies.append(t1 - t0) if ok else errors.append("status"))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(lat), "errors": len(errors),
            "qps": round(len(lat) / seconds, 1) if len(lat) else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None}


def throughput(args, texts: list[str], work: Path) -> dict:
    """Every peer started at once, then measured in turns: each round runs every level on every peer (the peers'
    order rotating), so that the drift of a shared VM's speed falls on all of them alike; medians over rounds."""
    from embedctl.pipeline.models import resolve_model

    model = resolve_model("minilm").path
    levels = [int(x) for x in args.levels.split(",")]
    peers, failed = {}, []
    try:
        for peer in args.peers.split(","):
            try:
                peers[peer] = start_peer(peer, model, args.threads, work)
            except (RuntimeError, subprocess.CalledProcessError) as exc:
                failed.append({"peer": peer, "error": str(exc).splitlines()[0][:300]})
        runs, offset, order = [], 0, list(peers)
        for round_ in range(args.rounds):
            for c in levels:
                for peer in order:
                    _process, port, path, served = peers[peer]
                    need = int(1500 * args.seconds) + 1000
                    chunk = [texts[(offset + i) % len(texts)] + f" #{offset + i}" for i in range(need)]
                    offset += need
                    runs.append({"peer": peer, "round": round_, **load(port, path, served, chunk, c, args.seconds)})
                    print(f"  {runs[-1]}", file=sys.stderr, flush=True)
            order = order[1:] + order[:1]
    finally:
        for process, *_ in peers.values():
            process.stop()
    rows = []
    for peer in peers:
        for c in levels:
            mine = [r for r in runs if r["peer"] == peer and r["concurrency"] == c]
            rows.append({"peer": peer, "concurrency": c, "rounds": len(mine),
                         "qps": round(float(np.median([r["qps"] for r in mine])), 1),
                         "p50_ms": round(float(np.median([r["p50_ms"] for r in mine])), 2),
                         "p99_ms": round(float(np.median([r["p99_ms"] for r in mine])), 2),
                         "errors": sum(r["errors"] for r in mine)})
    top, ratios = max(levels), {}
    for peer in ("infinity", "st"):
        if "embedctl" in peers and peer in peers:
            pairs = [(a, b) for a in runs for b in runs if a["round"] == b["round"] and a["concurrency"] == top
                     == b["concurrency"] and a["peer"] == "embedctl" and b["peer"] == peer]
            qps = sorted(a["qps"] / max(b["qps"], 1e-9) for a, b in pairs)
            p99 = sorted(a["p99_ms"] / b["p99_ms"] for a, b in pairs)
            ratios[peer] = {"qps_ratio": round(float(np.median(qps)), 3), "qps_ratio_range": [round(qps[0], 3),
                                                                                             round(qps[-1], 3)],
                            "p99_ratio": round(float(np.median(p99)), 3), "p99_ratio_range": [round(p99[0], 3),
                                                                                             round(p99[-1], 3)]}
    return {"levels": levels, "threads": args.threads, "seconds": args.seconds, "rounds": args.rounds,
            "rows": rows + failed, "runs": runs, f"at_concurrency_{top}": ratios}


def _pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def _workers_of(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=True)
            if "spawn_main" in " ".join(c.cmdline())]  # uvicorn's workers (not the resource tracker)


def memory(args, work: Path) -> dict:
    """Attached vs loading: total PSS of the workers, and time from the command to the first answer."""
    import torch

    from embedctl.shm_loader.segment import publish, release
    from tests.factory import save_tiny_qwen3

    folder = save_tiny_qwen3(work / "qwen3-wide", hidden_size=2560, layers=args.layers, heads=32, kv_heads=8,
                             head_dim=128, intermediate_size=9728, vocab_size=151_669)
    shm = Path("/dev/shm") / f"embedctl-bench-{uuid.uuid4().hex[:8]}"
    shm.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDCTL_")}
    env.update(EMBEDCTL_SHM_DIR=str(shm), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    result = {"layers": args.layers, "workers": args.workers,
              "checkpoint_bf16_mib": round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20)}
    try:
        segment = publish(folder, torch.float32, shm_dir=shm)  # once per host, before the server (not timed)
        result["segment_fp32_mib"] = round(segment["bytes"] / 2**20)
        for mode in ("attached", "loaded"):
            port = free_port()
            argv = [str(Path(sys.executable).parent / "embedctl"), "serve", "--model", str(folder), "--port",
                    str(port), "--workers", str(args.workers), "--threads", "1", "--dtype", "fp32",
                    "--shm", "require" if mode == "attached" else "off"]
            t0 = time.perf_counter()
            process = Process(argv, env, work / f"memory-{mode}.log")
            try:
                first = wait_answer(port, "/v1/embeddings", {"model": str(folder), "input": ["first"]}, process,
                                    timeout=900)
                deadline = time.perf_counter() + 900
                while process.text().count(" ready in ") < args.workers and time.perf_counter() < deadline:
                    time.sleep(0.2)
                all_ready = time.perf_counter() - t0
                workers = _workers_of(process.proc.pid)
                ready = [line for line in process.text().splitlines() if " ready in " in line]
                model_s = [float(line.split(" tokenizer and weights ")[1].split("s")[0]) for line in ready]
                imports_s = [float(line.split("(imports ")[1].split("s")[0]) for line in ready]
                result[mode] = {"first_answer_s": round(first, 2), "all_ready_s": round(all_ready, 2),
                                "worker_load_s": round(sum(model_s) / max(len(model_s), 1), 2),
                                "worker_imports_s": round(sum(imports_s) / max(len(imports_s), 1), 2),
                                "pss_mib": round(sum(_pss_kib(p) for p in workers) / 1024),
                                "worker_processes": len(workers)}
            finally:
                process.stop()
            print(f"  {mode}: {result[mode]}", file=sys.stderr, flush=True)
        a, b = result["attached"], result["loaded"]
        result["pss_ratio"] = round(a["pss_mib"] / max(b["pss_mib"], 1), 3)
        result["first_answer_ratio"] = round(a["first_answer_s"] / b["first_answer_s"], 3)
        result["worker_load_ratio"] = round(a["worker_load_s"] / max(b["worker_load_s"], 1e-9), 3)
        release(None, force=True, shm_dir=shm)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    return result


def _texts() -> list[str]:
    import pyarrow.parquet as pq

    shared = ROOT.parent / "shared" / "corpora" / "wordnet_glosses.parquet"
    path = shared if shared.exists() else ROOT / "examples" / "wordnet" / "glosses.parquet"
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def plots(result: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["throughput"]["rows"] if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for peer in dict.fromkeys(r["peer"] for r in rows):
        mine = [r for r in rows if r["peer"] == peer]
        axes[0].plot([r["concurrency"] for r in mine], [r["qps"] for r in mine], "o-", label=peer)
        axes[1].plot([r["concurrency"] for r in mine], [r["p99_ms"] for r in mine], "o-", label=peer)
    for ax, label in zip(axes, ("requests / s", "p99 latency (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("one short text a request, all-MiniLM-L6-v2 on CPU")
    fig.tight_layout()
    fig.savefig(folder / "serve.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--peers", default="embedctl,infinity,st")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--plots", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.seconds <= 0 or min(args.threads, args.layers, args.workers, args.rounds) < 1:
        parser.error("--seconds, --rounds, --threads, --layers and --workers must be positive")
    work = Path(tempfile.mkdtemp(prefix="embedctl-bench-serve-"))
    try:
        result = {"command": "python -m bench.serve " + " ".join(a for a in sys.argv[1:] if a != "--json"),
                  "cpus": os.cpu_count()}
        if not args.skip_throughput:
            result["throughput"] = throughput(args, _texts(), work)
        if not args.skip_memory:
            result["memory"] = memory(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.plots and "throughput" in result:
        plots(result, Path(args.plots))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(render(result))


def render(result: dict) -> str:
    lines = []
    t = result.get("throughput")
    if t:
        lines += _render_throughput(t, result)
    m = result.get("memory")
    if m:
        lines += _render_memory(m)
    return "\n".join(lines)


def _render_throughput(t: dict, result: dict) -> list[str]:
    lines = [f"# embedctl serve vs peers (`{result['command']}`, {result['cpus']} CPUs, {t['threads']} threads "
             f"each, {t['seconds']} s a level, medians of {t['rounds']} rounds)", "",
             "| peer | concurrency | requests/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
    for r in t["rows"]:
        if "error" in r:
            lines.append(f"| {r['peer']} | - | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {r['peer']} | {r['concurrency']} | {r['qps']} | {r['p50_ms']} | {r['p99_ms']} | "
                         f"{r['errors']} |")
    top = max(t["levels"])
    for peer, r in t[f"at_concurrency_{top}"].items():
        lines.append(f"- at concurrency {top}: embedctl / {peer} requests/s **{r['qps_ratio']}x** {r['qps_ratio_range']}, "
                     f"p99 ratio {r['p99_ratio']} {r['p99_ratio_range']}")
    return lines


def _render_memory(m: dict) -> list[str]:
    return ["", f"Qwen3-Embedding-4B width, {m['layers']} layers ({m['checkpoint_bf16_mib']} MiB bf16, "
                      f"{m.get('segment_fp32_mib')} MiB fp32 segment), {m['workers']} workers computing in fp32:",
                  f"- PSS of the workers: attached {m['attached']['pss_mib']} MiB vs loaded {m['loaded']['pss_mib']} "
                  f"MiB: **{m['pss_ratio']}**",
                  f"- start of `embedctl serve` to the first answer: attached {m['attached']['first_answer_s']} s vs "
                  f"loaded {m['loaded']['first_answer_s']} s: **{m['first_answer_ratio']}**; a worker's tokenizer and "
                  f"weights (after its imports of torch, transformers and the model's code, "
                  f"{m['attached']['worker_imports_s']} s): "
                  f"{m['attached']['worker_load_s']} vs {m['loaded']['worker_load_s']} s, **{m['worker_load_ratio']}**"]


if __name__ == "__main__":
    main()
