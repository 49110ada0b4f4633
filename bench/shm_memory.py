"""Shared-memory weights vs a normal load: total PSS of K worker processes and time to first embedding.

    python -m bench.shm_memory [--layers 2] [--ks 1,2,4] [--json]

The model is a random Qwen3 at the real Qwen3-Embedding-4B width (hidden 2560, 32 heads of 128, 8 KV heads,
MLP 9728, vocab 151,669) with a few layers, saved in bf16 like the real checkpoints; workers compute in fp32,
so a normal load converts (a private fp32 copy per process) while an attached worker maps the one fp32 copy
published in /dev/shm. Each worker is a fresh interpreter; all K run at once, and PSS (/proc/PID/smaps_rollup)
is read while all K are alive after their first embedding. The time to first embedding starts once the
interpreter has imported torch, transformers and the model's code (as a prefork pool child finds them
imported by its parent); that import time is the same for both and is printed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss for {pid}")


def worker(folder: str, mode: str) -> None:
    """One worker: load (shm=require or off), embed one text, report timings, wait for stdin to close."""
    t_start = time.perf_counter()
    from embedctl.pipeline.encoder import load_encoder
    from embedctl.pipeline.loader import import_model_code
    from embedctl.pipeline.models import ModelRef

    import_model_code(Path(folder))  # what a prefork parent does once before forking its children

    t_load = time.perf_counter()
    encoder = load_encoder(ModelRef("bench", Path(folder)), device="cpu", dtype="fp32", shm=mode)
    encoder.encode(["the first embedding of this worker"])
    t_done = time.perf_counter()
    print(json.dumps({"source": encoder.source, "load_to_first": t_done - t_load,
                      "imports": t_load - t_start}), flush=True)
    sys.stdin.read()


def run_group(folder: Path, mode: str, k: int, env: dict) -> dict:
    procs = [subprocess.Popen([sys.executable, "-m", "bench.shm_memory", "--worker", str(folder), mode], cwd=ROOT,
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(k)]
    try:
        reports = [json.loads(p.stdout.readline()) for p in procs]
        pss = sum(_pss_kib(p.pid) for p in procs)
    finally:
        for p in procs:
            p.communicate(input="", timeout=120)
    assert all(r["source"].startswith("shm:") == (mode == "require") for r in reports), reports
    return {"pss_mib": pss / 1024, "first_s": sum(r["load_to_first"] for r in reports) / k,
            "imports_s": sum(r["imports"] for r in reports) / k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ks", default="1,2,4")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    import torch

    from embedctl.shm_loader.segment import publish, release
    from tests.factory import save_tiny_qwen3

    work = Path(tempfile.mkdtemp(prefix="embedctl-bench-"))
    shm_dir = Path("/dev/shm") / f"embedctl-bench-{uuid.uuid4().hex[:8]}"
    shm_dir.mkdir(mode=0o700)
    env = dict(os.environ, EMBEDCTL_SHM_DIR=str(shm_dir), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    try:
        folder = save_tiny_qwen3(work / "qwen3-wide", hidden_size=2560, layers=args.layers, heads=32, kv_heads=8,
                                 head_dim=128, intermediate_size=9728, vocab_size=151_669)
        checkpoint_mib = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
        t0 = time.perf_counter()
        os.environ["EMBEDCTL_SHM_DIR"] = str(shm_dir)
        segment = publish(folder, torch.float32, shm_dir=shm_dir)
        publish_s = time.perf_counter() - t0
        rows = []
        for k in [int(x) for x in args.ks.split(",")]:
            loaded = run_group(folder, "off", k, env)
            attached = run_group(folder, "require", k, env)
            rows.append({"k": k, "pss_loaded_mib": round(loaded["pss_mib"]), "pss_attached_mib":
                         round(attached["pss_mib"]), "pss_ratio": round(attached["pss_mib"] / loaded["pss_mib"], 3),
                         "first_loaded_s": round(loaded["first_s"], 3), "first_attached_s":
                         round(attached["first_s"], 3), "time_ratio": round(attached["first_s"] / loaded["first_s"], 3),
                         "imports_s": round((loaded["imports_s"] + attached["imports_s"]) / 2, 2)})
        release(None, force=True, shm_dir=shm_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm_dir, ignore_errors=True)
    result = {"command": "python -m bench.shm_memory " + " ".join(sys.argv[1:]), "layers": args.layers,
              "checkpoint_bf16_mib": round(checkpoint_mib), "segment_fp32_mib": round(segment["bytes"] / 2**20),
              "publish_s": round(publish_s, 2), "cpus": os.cpu_count(), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"# shared-memory weights vs normal load ({result['command']})")
    print(f"random Qwen3, Qwen3-Embedding-4B width, {args.layers} layers: checkpoint {result['checkpoint_bf16_mib']} "
          f"MiB bf16, segment {result['segment_fp32_mib']} MiB fp32, published in {result['publish_s']} s; "
          f"{result['cpus']} CPUs")
    print("| K | PSS loaded (MiB) | PSS attached (MiB) | PSS ratio | first embedding loaded (s) | attached (s) | "
          "time ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['pss_loaded_mib']} | {r['pss_attached_mib']} | {r['pss_ratio']} | "
              f"{r['first_loaded_s']} | {r['first_attached_s']} | {r['time_ratio']} |")
    print(f"(time from the start of loading to the first embedding; interpreter + imports, the same in both, "
          f"took {rows[-1]['imports_s']} s more)")


if __name__ == "__main__":
    main()
