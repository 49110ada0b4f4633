"""Embedding on a CUDA GPU at the reference model's shape: embedctl vs sentence-transformers, budget, ceiling.

    python -m bench.gpu [--glosses PATH] [--rows 30000] [--long 2000] [--layers 36] [--stage-rows 40000] [--json]

The model is a Qwen3 at Qwen3-Embedding-4B's shape (hidden 2560, 36 layers, 32 query heads of 128, 8 KV heads,
MLP 9728, vocab 151,669) with random bf16 weights, since no hub is reachable from the GPU machines; it is saved
like the real checkpoint (safetensors, the sentence-transformers files of Qwen3-Embedding: last-token pooling,
normalise) with a byte-level BPE tokenizer of 32,000 tokens trained on the glosses (it appends <|endoftext|> like
the Qwen3-Embedding tokenizer), and loaded by `load_encoder` and by `SentenceTransformer` from that folder.
Random weights run the real model's kernels, so the speed and memory figures hold; the vectors mean nothing.

Measured, all in bf16 on the same GPU, same texts: `SentenceTransformer.encode` at its default batch size (32)
and at 64/128/256; `Encoder.encode` at token budgets 4k..64k (texts/s, peak GPU memory); the GPU's bf16 GEMM rate
at the model's shapes and the model's FLOPs per token (the ceiling); and the embedding stage of a real embedded
run (`run_embedded`: Parquet chunks read, embedded, written) as forward time over stage wall time.
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
import pyarrow.parquet as pq

from bench.throughput import (
    GLOSSES,
    gemm_rate,
    long_texts,
    model_flops_per_token,
    sweep_sentence_transformers,
)

SHAPE_SMOKE = {"hidden_size": 64, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate_size": 128,
               "vocab_size": 32_000}
"""`--smoke`: a tiny shape that runs every part's code on the CPU (the GPU runs are rare: a crash there wastes them)."""
SHAPE_4B = {"hidden_size": 2560, "layers": 36, "heads": 32, "kv_heads": 8, "head_dim": 128,
            "intermediate_size": 9728, "vocab_size": 151_669}
"""Qwen3-Embedding-4B's config.json."""
BUDGETS = (4096, 8192, 16384, 32768, 65536)
ST_BATCHES = (32, 64, 128, 256)


def build_model(folder: Path, glosses: list[str], layers: int, smoke: bool = False) -> Path:
    """Save the random Qwen3-Embedding-4B-shaped model (made on the GPU) and its tokenizer to `folder`."""
    from tests.factory import build_tokenizer, save_tiny_qwen3

    tokenizer = build_tokenizer(append_eos=True, texts=glosses, vocab_size=32_000, model_max_length=512)
    shape = SHAPE_SMOKE if smoke else {**SHAPE_4B, "layers": layers}
    return save_tiny_qwen3(folder, hidden_size=shape["hidden_size"], layers=shape["layers"], heads=shape["heads"],
                           kv_heads=shape["kv_heads"], intermediate_size=shape["intermediate_size"],
                           head_dim=shape["head_dim"], vocab_size=shape["vocab_size"], dtype="bfloat16",
                           tokenizer=tokenizer, device="cpu" if smoke else "cuda", sentence_transformers=True)


def sentence_transformer(folder: Path):
    """sentence-transformers on the same folder, in bf16, left padding (as the Qwen3-Embedding model card)."""
    import torch
    from sentence_transformers import SentenceTransformer

    for key in ("dtype", "torch_dtype"):  # transformers 5 calls it dtype; older sentence-transformers pass torch_dtype
        try:
            return SentenceTransformer(str(folder), device="cuda", model_kwargs={key: torch.bfloat16},
                                       tokenizer_kwargs={"padding_side": "left"})
        except TypeError:
            continue
    raise RuntimeError("sentence-transformers did not accept a dtype")


def timed(fn) -> tuple[object, float]:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def end_to_end(encoder, folder: Path, corpora: dict[str, list[str]], tmp: Path, ceiling_flops: float) -> dict:
    """The embedding stage of real embedded runs (`run_embedded`: Parquet chunks read, tokenised, embedded,
    written), per corpus, eager padded (today's default) vs packed and compiled (static shapes): tokens/s, their
    fraction of the ceiling (GEMM FLOP/s / model FLOPs per token), compile seconds and the graphs compiled after
    the warm-up (the goal is none). A warm-up run on other texts of the corpus compiles first."""
    import pyarrow as pa
    from torch._dynamo.utils import counters

    from bench.throughput import model_flops_per_token
    from embedctl.jobs.runner import run_embedded
    from embedctl.jobs.spec import JobSpec
    from embedctl.pipeline.encoder import Encoder

    modes = {"eager padded": dict(packed=False, compile="off"), "packed compiled": dict(packed=True, compile="on")}
    out: dict = {}
    for name, texts in corpora.items():
        lengths = [len(x) for x in encoder.tokenize(texts)[0]]
        flops = model_flops_per_token(encoder.model, float(np.mean(lengths)))
        row = {"texts": len(texts), "mean_tokens": round(float(np.mean(lengths)), 1)}
        for label, kwargs in modes.items():
            runner = Encoder(encoder.loaded, max_length=encoder.max_length, batch_tokens=encoder.batch_tokens,
                             **kwargs)
            half = len(texts) // 2
            runs = {}
            for run, part in (("warm-up", texts[half:]), ("measured", texts[:half])):
                corpus = tmp / f"e2e-{name}-{run}.parquet"
                pq.write_table(pa.table({"id": list(range(len(part))), "text": part}), corpus)
                graphs = counters["stats"]["unique_graphs"]
                spec = JobSpec(corpus=str(corpus), out=str(tmp / f"e2e-{name}-{label}-{run}".replace(" ", "-")),
                               model=str(folder), id_column="id", dims=(), shm="off", hnsw_m=8, ef_construction=16)
                report, wall = timed(lambda spec=spec, runner=runner: run_embedded(spec, encoder=runner).to_dict())
                runs[run] = {"embed_seconds": report["embed_seconds"], "wall": wall,
                             "tokens": int(sum(lengths[half:]) if run == "warm-up" else sum(lengths[:half])),
                             "graphs": counters["stats"]["unique_graphs"] - graphs}
            measured = runs["measured"]
            rate = measured["tokens"] / measured["embed_seconds"]
            row[label] = {"tokens_per_s": round(rate, 1), "fraction_of_ceiling": round(rate * flops / ceiling_flops, 3),
                          "warm_up_embed_seconds": round(runs["warm-up"]["embed_seconds"], 1),
                          "graphs_compiled_in_warm_up": runs["warm-up"]["graphs"],
                          "graphs_compiled_after_warm_up": measured["graphs"]}
        row["packed_compiled_over_eager_padded"] = round(row["packed compiled"]["tokens_per_s"]
                                                         / row["eager padded"]["tokens_per_s"], 3)
        out[name] = row  # the compiled model is kept on the model: the next corpus reuses its graphs
    out["goal"] = "fraction_of_ceiling >= 0.6 (long) and >= 0.5 (glosses), packed compiled; 0 graphs after warm-up"
    return out


def stage(encoder, folder: Path, glosses_path: Path, rows: int, tmp: Path) -> dict:
    """The embedding stage of real embedded runs on the first `rows` glosses, with and without the I/O overlap:
    forward (GPU) time over the stage's wall time. A first run warms up (its figures are kept apart), then the
    two modes alternate twice, since the first run on a fresh process was measured slower whatever its mode."""
    from embedctl.jobs.runner import run_embedded
    from embedctl.jobs.spec import JobSpec

    corpus = tmp / "stage.parquet"
    pq.write_table(pq.read_table(glosses_path).slice(0, rows), corpus)
    out: dict = {"rows": rows, "runs": []}
    for i, overlap in enumerate((False, True, False, True, False)):
        spec = JobSpec(corpus=str(corpus), out=str(tmp / f"stage-{i}"), model=str(folder), id_column="id",
                       dims=(), shm="off", hnsw_m=8, ef_construction=16)  # a small graph: the build is not measured
        forward0 = encoder.forward_seconds
        report = run_embedded(spec, encoder=encoder, overlap=overlap).to_dict()
        forward = encoder.forward_seconds - forward0
        out["runs"].append({"mode": "warm-up" if i == 0 else "overlap" if overlap else "serial",
                            "embed_seconds": report["embed_seconds"], "rows_per_second": report["rows_per_second"],
                            "forward_seconds": round(forward, 3),
                            "forward_over_stage": round(forward / report["embed_seconds"], 3)})
        out["chunks"] = report["chunks_total"]
    for mode in ("overlap", "serial"):
        runs = [r for r in out["runs"] if r["mode"] == mode]
        out[mode] = {k: round(float(np.mean([r[k] for r in runs])), 3)
                     for k in ("embed_seconds", "rows_per_second", "forward_over_stage")}
    out["overlap_speedup"] = round(out["serial"]["embed_seconds"] / out["overlap"]["embed_seconds"], 3)
    return out


def compare_compiled(encoder, corpora: dict[str, list[str]]) -> dict:
    """The same weights through `torch.compile` (Encoder(compile=True)) vs eager: texts/s, compile time, cosine."""
    from embedctl.pipeline.encoder import Encoder

    compiled = Encoder(encoder.loaded, max_length=encoder.max_length, batch_tokens=encoder.batch_tokens,
                       compile=True)
    warm_texts = corpora["glosses"][-2000:] + corpora["long"][-200:]
    _, warm_s = timed(lambda: compiled.encode(warm_texts))
    out = {"batch_tokens": encoder.batch_tokens, "first_call_s": round(warm_s, 1)}
    for name, texts in corpora.items():
        eager_vectors, eager_s = timed(lambda texts=texts: encoder.encode(texts).vectors)
        compiled_vectors, compiled_s = timed(lambda texts=texts: compiled.encode(texts).vectors)
        out[name] = {"eager_texts_per_s": round(len(texts) / eager_s, 1),
                     "compiled_texts_per_s": round(len(texts) / compiled_s, 1),
                     "speedup": round(eager_s / compiled_s, 3),
                     "cos_min_vs_eager": round(float((eager_vectors * compiled_vectors).sum(1).min()), 5)}
    return out


def compare_packing(encoder, corpora: dict[str, list[str]], folder: Path) -> dict:
    """Packed batches (no padding, variable-length attention) vs padded ones on the same texts and budget:
    texts/s, padding, cosine between the two, and the bf16 packed vectors against an fp32 padded reference on 200
    texts of each corpus."""
    import torch

    from embedctl.pipeline.encoder import load_encoder
    from embedctl.pipeline.models import ModelRef

    out, vectors = {}, {}
    for name, texts in corpora.items():
        row = {}
        for packed in (False, True):
            encoder.packed = packed
            encoder.encode(texts[:256])  # warm-up of this path's kernels
            encoder.padded_tokens = 0
            result, wall = timed(lambda texts=texts: encoder.encode(texts))
            key = "packed" if packed else "padded"
            row[f"{key}_texts_per_s"] = round(len(texts) / wall, 1)
            row[f"{key}_tokens_run"] = encoder.padded_tokens
            vectors[(name, key)] = result.vectors
        row["packed_over_padded"] = round(row["packed_texts_per_s"] / row["padded_texts_per_s"], 3)
        row["cos_packed_vs_padded_min"] = round(float((vectors[(name, "packed")] * vectors[(name, "padded")]).sum(1)
                                                      .min()), 5)
        out[name] = row
    encoder.packed = True
    reference = load_encoder(ModelRef("fp32", folder), device="cuda", dtype="fp32", shm="off", packed=False)
    for name, texts in corpora.items():
        ref = reference.encode(texts[:200]).vectors
        ours = encoder.encode(texts[:200]).vectors
        out[name]["cos_bf16_packed_vs_fp32_min"] = round(float((ref * ours).sum(1).min()), 5)
    del reference
    torch.cuda.empty_cache()
    return out


def smoke(args) -> None:
    """The parts that run on a CPU (e2e, packing, share) at SHAPE_SMOKE on a few hundred texts: the code of the
    GPU script, checked where there is no GPU. Prints what ran; its figures mean nothing."""
    from embedctl.pipeline.encoder import load_encoder
    from embedctl.pipeline.models import ModelRef

    glosses = pq.read_table(args.glosses, columns=["text"]).column("text").to_pylist()[:2000] \
        if args.glosses.exists() else [f"text {i} about a river, a dog and the sea" for i in range(2000)]
    tmp = Path(tempfile.mkdtemp(prefix="embedctl-bench-gpu-smoke-"))
    folder = build_model(tmp / "smoke", glosses, 2, smoke=True)
    encoder = load_encoder(ModelRef("smoke", folder), device="cpu", dtype="bf16", shm="off", batch_tokens=512)
    corpora = {"glosses": glosses[:300], "long": long_texts(glosses, encoder.tokenizer, 40)}
    parts = set(args.parts.split(","))
    result = {"smoke": True}
    if "e2e" in parts:
        result["e2e"] = end_to_end(encoder, folder, corpora, tmp, ceiling_flops=1e12)
    if "share" in parts:
        from bench.share import measure

        os.environ["EMBEDCTL_SHM_DIR"] = str(tmp / "shm")
        (tmp / "shm").mkdir()
        os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="ec-"))
        result["share"] = measure(str(folder), "cpu", "bf16", corpora["glosses"], (1, 2))
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glosses", type=Path, default=GLOSSES)
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--long", type=int, default=2000)
    parser.add_argument("--layers", type=int, default=SHAPE_4B["layers"])
    parser.add_argument("--stage-rows", type=int, default=40_000)
    parser.add_argument("--parts", default="sweep,stage,compile,packing",
                        help="comma-separated: sweep (vs sentence-transformers, budgets), stage, compile, packing "
                             "(packed vs padded batches), share (K = 1, 2, 4 processes on one GPU: memory and "
                             "tokens/s with one shared copy vs a copy each, and an exporter killed; bench/share.py), "
                             "e2e (the embedding stage of embedded runs: eager padded vs packed compiled, fraction "
                             "of the ceiling, graphs compiled after warm-up)")
    parser.add_argument("--smoke", action="store_true",
                        help="run the parts' code on the CPU at a tiny shape (a check of the script, no figures)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    if args.smoke:
        return smoke(args)
    if not torch.cuda.is_available():
        sys.exit("bench.gpu needs a CUDA device (or --smoke)")
    if not args.glosses.exists():
        sys.exit(f"{args.glosses} is absent: pass --glosses PATH (the WordNet glosses Parquet)")
    from embedctl.pipeline.defaults import DEFAULT_BATCH_TOKENS_CUDA
    from embedctl.pipeline.encoder import load_encoder
    from embedctl.pipeline.models import ModelRef

    glosses = pq.read_table(args.glosses, columns=["text"]).column("text").to_pylist()
    tmp = Path(tempfile.mkdtemp(prefix="embedctl-bench-gpu-"))
    t0 = time.perf_counter()
    folder = build_model(tmp / "qwen3-4b-shape", glosses, args.layers)
    built_s = time.perf_counter() - t0
    encoder = load_encoder(ModelRef("qwen3-4b-shape", folder), device="cuda", shm="off")
    parts = set(args.parts.split(","))
    corpora = {"glosses": glosses[:args.rows], "long": long_texts(glosses, encoder.tokenizer, args.long)}
    encoder.encode(glosses[-500:])  # warm up (cuBLAS handles, kernels) on texts outside the measured ones
    if "sweep" in parts:
        st = sentence_transformer(folder)
        st.encode(glosses[-500:])
    rows, ratios, ceiling, memory = [], {}, {}, {}
    for name, texts in corpora.items() if "sweep" in parts else ():
        lengths = [len(x) for x in encoder.tokenize(texts)[0]]
        st_rates, reference = sweep_sentence_transformers(st, name, texts, ST_BATCHES, rows, timed)
        ours = {}
        for budget in BUDGETS:
            encoder.batch_tokens = budget
            encoder.forward_seconds, encoder.padded_tokens = 0.0, 0
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out, wall = timed(lambda texts=texts: encoder.encode(texts))
            label = f"batch_tokens={budget}" + (" (default)" if budget == DEFAULT_BATCH_TOKENS_CUDA else "")
            ours[budget] = {"rate": len(texts) / wall, "forward_share": encoder.forward_seconds / wall,
                            "padded": encoder.padded_tokens, "wall": wall,
                            "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
                            "cos_vs_st_min": float((out.vectors * reference).sum(1).min())}
            rows.append({"corpus": name, "method": "embedctl", "setting": label,
                         "texts_per_s": round(ours[budget]["rate"], 1),
                         "activation_peak_mib": round(ours[budget]["peak_mib"]),
                         "cos_vs_st_min": round(ours[budget]["cos_vs_st_min"], 5)})
        best = max(ours, key=lambda b: ours[b]["rate"])
        default = ours[DEFAULT_BATCH_TOKENS_CUDA]
        ratios[name] = {"vs_st_default": round(default["rate"] / st_rates[32], 3),
                        "vs_st_best": round(default["rate"] / max(st_rates.values()), 3),
                        "best_budget": best, "best_vs_default": round(ours[best]["rate"] / default["rate"], 3)}
        cfg = encoder.model.config
        flops = model_flops_per_token(encoder.model, float(np.mean(lengths)))
        gemm = max(gemm_rate(cfg.hidden_size, cfg.intermediate_size, tokens=16384, device="cuda", dtype=torch.bfloat16),
                   gemm_rate(cfg.intermediate_size, cfg.hidden_size, tokens=16384, device="cuda", dtype=torch.bfloat16))
        ceiling[name] = {"gemm_tflops": round(gemm / 1e12, 1), "model_gflops_per_token": round(flops / 1e9, 2),
                         "mean_tokens": round(float(np.mean(lengths)), 1)}
        for budget, r in ours.items():
            ceiling[name][f"fraction_at_{budget}"] = round(sum(lengths) * flops / r["wall"] / gemm, 3)
            ceiling[name][f"forward_share_at_{budget}"] = round(r["forward_share"], 3)
            ceiling[name][f"padding_at_{budget}"] = round(r["padded"] / sum(lengths) - 1, 3)
        memory[name] = {b: round(r["peak_mib"]) for b, r in ours.items()}
    encoder.batch_tokens = DEFAULT_BATCH_TOKENS_CUDA
    stage_result = stage(encoder, folder, args.glosses, min(args.stage_rows, len(glosses)), tmp) \
        if "stage" in parts else {}
    compiled = compare_compiled(encoder, corpora) if "compile" in parts else {}
    packing = compare_packing(encoder, corpora, folder) if "packing" in parts else {}
    e2e = {}
    if "e2e" in parts:
        cfg = encoder.model.config
        gemm = max(gemm_rate(cfg.hidden_size, cfg.intermediate_size, tokens=16384, device="cuda", dtype=torch.bfloat16),
                   gemm_rate(cfg.intermediate_size, cfg.hidden_size, tokens=16384, device="cuda", dtype=torch.bfloat16))
        e2e = {"gemm_tflops": round(gemm / 1e12, 1), **end_to_end(encoder, folder, corpora, tmp, gemm)}
    shared = {}
    if "share" in parts:
        from bench.share import measure

        del encoder  # the share rounds' processes load their own (or map the exporter's)
        torch.cuda.empty_cache()
        os.environ.setdefault("EMBEDCTL_SHM_DIR", str(tmp / "shm"))
        Path(os.environ["EMBEDCTL_SHM_DIR"]).mkdir(exist_ok=True)
        shared = measure(str(folder), "cuda:0", "bf16", corpora["glosses"][:5000], (1, 2, 4))
    result = {"command": "python -m bench.gpu " + " ".join(sys.argv[1:]), "device": torch.cuda.get_device_name(),
              "measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "torch": torch.__version__, "cpus": os.cpu_count(), "layers": args.layers,
              "model_build_s": round(built_s, 1), "rows": rows, "ratios": ratios, "ceiling": ceiling,
              "activation_peak_mib": memory, "stage": stage_result, "compile": compiled,
              "packing": packing, "share": shared, "e2e": e2e}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"# GPU throughput ({result['command']}) on {result['device']}")
    for r in rows:
        print(r)
    for key in ("ratios", "ceiling", "activation_peak_mib", "stage", "compile", "packing", "share", "e2e"):
        print(key, json.dumps(result[key]))


if __name__ == "__main__":
    main()
