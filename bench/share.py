"""One device copy of the weights per GPU (`EMBEDCTL_DEVICE_SHARE`): device memory and tokens/s of K processes on
one device, with the exporter's shared copy and with a copy each, and an exporter killed in the middle.

    python -m bench.gpu --parts share        (on a GPU: the 4B shape; K = 1, 2, 4)
    python -m bench.share --model minilm --device cpu --k 1,2   (the CPU transport: a smoke run of the same code)

Each of the K processes is a fresh Python that loads the encoder as a worker's pool child does (`load_encoder`
with the host segment published, EMBEDCTL_DEVICE_SHARE on or off), reports when loaded, embeds the same texts when
told, and stays alive until the memory is read. Device memory is the device-wide used memory (`mem_get_info`) with
all K loaded and after their batches, minus what was used before they started. In the kill round the exporter is
SIGKILLed once the children are embedding; each child that loses its weights maps the restarted exporter's copy and
embeds its texts again, and the round reports how many did and whether all finished.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, sys, time
from pathlib import Path
from embedctl.pipeline.encoder import load_encoder
from embedctl.pipeline.errors import WeightsLost
from embedctl.pipeline.models import resolve_model
flags, texts = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
me = sys.argv[3]
load = lambda: load_encoder(resolve_model(sys.argv[4]), device=sys.argv[5], dtype=sys.argv[6])
encoder = load()
(flags / f"loaded-{me}").write_text(encoder.source)
while not (flags / "go").exists():
    time.sleep(0.05)
lost, t0 = 0, time.perf_counter()
while True:
    try:
        out = encoder.encode(texts)
        break
    except WeightsLost:
        lost += 1
        encoder = load()
seconds = time.perf_counter() - t0
(flags / f"done-{me}").write_text(json.dumps({"tokens": out.tokens, "seconds": seconds, "lost": lost,
                                              "source": encoder.source}))
while not (flags / "exit").exists():
    time.sleep(0.05)
"""


def _used(device: str) -> int:
    """Device-wide used memory in bytes (CUDA), or the system's used memory on CPU."""
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return total - free
    import psutil

    return psutil.virtual_memory().used


def _wait(paths, timeout: float, procs, watch=None) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError("a child process failed; its error is above")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {[str(p) for p in paths if not p.exists()]}")
        if watch:
            watch()
        time.sleep(0.05)


def one_round(model: str, device: str, dtype: str, texts_file: Path, k: int, share: str, exporters=None,
              kill: bool = False, timeout: float = 600) -> dict:
    """K children on `device`: memory loaded and after embedding, aggregate tokens/s, losses in a kill round."""
    flags = Path(tempfile.mkdtemp(prefix="embedctl-share-"))
    env = dict(os.environ, EMBEDCTL_DEVICE_SHARE=share)
    base = _used(device)
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(flags), str(texts_file), str(i), model, device, dtype],
                              env=env) for i in range(k)]
    try:
        _wait([flags / f"loaded-{i}" for i in range(k)], timeout, procs)
        loaded = _used(device) - base
        (flags / "go").touch()
        t0 = time.perf_counter()
        if kill:
            time.sleep(0.5)
            os.kill(exporters.procs[device].pid, signal.SIGKILL)
        _wait([flags / f"done-{i}" for i in range(k)], timeout, procs, exporters.watch if exporters else None)
        wall = time.perf_counter() - t0
        after = _used(device) - base
        done = [json.loads((flags / f"done-{i}").read_text()) for i in range(k)]
    finally:
        (flags / "exit").touch()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    return {"k": k, "share": share, "memory_loaded_mib": round(loaded / 2**20), "memory_after_mib": round(after / 2**20),
            "tokens_per_s": round(sum(d["tokens"] for d in done) / wall, 1), "lost": sum(d["lost"] for d in done),
            "all_finished": len(done) == k, "sources": sorted({d["source"].split(":")[0] for d in done})}


def measure(model: str, device: str, dtype: str, texts: list[str], ks: tuple[int, ...]) -> dict:
    """Every round: share off and on at each K, then one kill round at the largest K."""
    import torch

    from embedctl.pipeline.loader import resolve_dtype
    from embedctl.pipeline.models import read_profile, resolve_model
    from embedctl.shm_loader.segment import publish
    from embedctl.shm_loader.supervise import Exporters

    folder = read_profile(resolve_model(model).path).transformer_path
    torch_dtype = resolve_dtype(dtype, torch.device(device))
    publish(folder, torch_dtype)
    texts_file = Path(tempfile.mkdtemp(prefix="embedctl-share-")) / "texts.json"
    texts_file.write_text(json.dumps(texts))
    rounds = [one_round(model, device, dtype, texts_file, k, "off") for k in ks]
    exporters = Exporters(folder, torch_dtype, [device])
    exporters.start()
    try:
        rounds += [one_round(model, device, dtype, texts_file, k, "on", exporters) for k in ks]
        kill = one_round(model, device, dtype, texts_file, max(ks), "on", exporters, kill=True)
    finally:
        exporters.stop()
    by = {(r["share"], r["k"]): r for r in rounds}
    low, high = min(ks), max(ks)
    return {"rounds": rounds, "kill_round": kill, "exporter_restarts": exporters.restarts,
            "shared_memory_growth_mib": by[("on", high)]["memory_after_mib"] - by[("on", low)]["memory_after_mib"],
            "copied_memory_growth_mib": by[("off", high)]["memory_after_mib"] - by[("off", low)]["memory_after_mib"],
            "goal": f"memory(K={high}) <= memory(K={low}) + {high - low} x 2 GiB with sharing"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--k", default="1,2,4")
    parser.add_argument("--texts", type=int, default=2000)
    args = parser.parse_args()
    import pyarrow.parquet as pq

    from bench.throughput import GLOSSES

    if GLOSSES.exists():
        texts = pq.read_table(GLOSSES, columns=["text"]).column("text").to_pylist()[:args.texts]
    else:
        texts = [f"text number {i} about rivers, dogs and the sea" for i in range(args.texts)]
    result = measure(args.model, args.device, args.dtype, texts, tuple(int(x) for x in args.k.split(",")))
    result["command"] = "python -m bench.share " + " ".join(sys.argv[1:])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
