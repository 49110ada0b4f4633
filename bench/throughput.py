"""Embedding throughput vs sentence-transformers, and the share of the machine's ceiling the encoder reaches.

    python -m bench.throughput [--rows 10000] [--long 500] [--rounds 5] [--threads 2] [--json]

Same model (MiniLM), same texts, same threads. sentence-transformers: `SentenceTransformer.encode` at its
default batch size (32) and at 64 and 128. embedctl: `Encoder.encode` (length-sorted batches packed by a token
budget) at its default budget and a sweep, and in each paired round once more on PyTorch's linear layers
instead of oneDNN's (`pipeline/kernels.py`; before the pair in odd rounds, after it in even ones). Corpora:
WordNet glosses, and long texts made by concatenating consecutive glosses up to 50-400 tokens.

The ceiling: the machine's fp32 GEMM rate (torch matmul, the best of 20 calls at the model's largest shape) over
the model's FLOPs per token (the linear layers that run on every token, plus attention); the encoder's fraction of
it counts the real (unpadded) tokens. Beside it: the oneDNN rate at the same shape, and the sustained rate of
torch matmul replaying the run's own linear-layer GEMMs (every other batch, shapes recorded by hooks) timed as a
whole, the ceiling of an encoder that did nothing but its GEMMs. One profiled pass splits the encoder's CPU time
by operator group: where the rest of the time goes.

The speed of this 2-core machine drifts by 20-30% within minutes, so the headline ratios are paired: after the
sweep, `--rounds` rounds each time sentence-transformers at its default and at its best batch size, embedctl at
its default budget and the GEMM rate back to back; the ratios and the fraction of the ceiling are the medians of
the per-round figures (the spread is printed). Needs ../shared/corpora/wordnet_glosses.parquet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
GLOSSES = ROOT.parent / "shared" / "corpora" / "wordnet_glosses.parquet"
BUDGETS = (512, 1024, 2048)
ST_BATCHES = (32, 64, 128)


def long_texts(glosses: list[str], tokenizer, n: int, seed: int = 0) -> list[str]:
    """Concatenations of consecutive glosses, each grown to a random length of 50-400 tokens."""
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while len(out) < n:
        target, parts, length = int(rng.integers(50, 401)), [], 0
        while length < target:
            parts.append(glosses[i % len(glosses)])
            length += len(tokenizer(parts[-1], add_special_tokens=False)["input_ids"]) + 1
            i += 1
        out.append("; ".join(parts))
    return out


def wall_timed(fn) -> tuple[object, float]:
    """(fn(), seconds it took)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def sweep_sentence_transformers(st, corpus: str, texts: list[str], batch_sizes, rows: list[dict],
                                timed=wall_timed) -> tuple[dict[int, float], np.ndarray]:
    """texts/s of `SentenceTransformer.encode` at each batch size (appended to `rows`), and the vectors at the
    first (its default) as the reference."""
    rates, reference = {}, None
    for bs in batch_sizes:
        vectors, wall = timed(lambda bs=bs: st.encode(texts, batch_size=bs, normalize_embeddings=True,
                                                      convert_to_numpy=True))
        reference = vectors if reference is None else reference
        rates[bs] = len(texts) / wall
        rows.append({"corpus": corpus, "method": "sentence-transformers", "setting": f"batch_size={bs}",
                     "texts_per_s": round(rates[bs], 1)})
    return rates, reference


def median(rounds: list[dict], key: str) -> float:
    return round(float(np.median([r[key] for r in rounds])), 3)


def spread(rounds: list[dict], key: str) -> list[float]:
    return [round(min(r[key] for r in rounds), 3), round(max(r[key] for r in rounds), 3)]


def gemm_rate(hidden: int, inner: int, tokens: int = 1024, repeats: int = 20, device: str = "cpu",
              dtype=None, kernel: str = "matmul") -> float:
    """Best FLOP/s of a GEMM at the model's shapes (tokens x hidden @ hidden x inner), fp32 by default.

    `kernel`: `matmul` is torch matmul (MKL on CPU, cuBLAS on CUDA), the ceiling the issue defines; `onednn` is
    the oneDNN linear primitive the encoder runs on CPU (`pipeline/kernels.py`), reported beside it.
    """
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(tokens, hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, inner, device=device, dtype=dtype)
    if kernel == "onednn":
        weight = b.t().contiguous()

        def gemm():
            return torch.ops.mkldnn._linear_pointwise(a, weight, None, "none", [], "")
    else:
        def gemm():
            return a @ b
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gemm().sum()
    sync()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        gemm().sum()
        sync()
        best = max(best, 2 * tokens * hidden * inner / (time.perf_counter() - t0))
    return best


def recorded_gemms(encoder, texts: list[str]) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """The GEMMs the encoder runs on `texts`: per batch, (padded tokens, [(rows, in, out) of each nn.Linear call]).

    Recorded by forward hooks in one pass on PyTorch's linear layers (oneDNN's fused dense+GELU block does not call
    its `dense`, so its hook would not fire); the shapes are the same on either.
    """
    import torch

    from embedctl.pipeline.kernels import use_onednn_linear, use_pytorch_linear, uses_onednn_linear

    batches: list[tuple[int, list[tuple[int, int, int]]]] = []

    def on_batch(module, args, kwargs):
        batches.append((int(kwargs["input_ids"].numel()), []))

    def on_linear(module, args, output):
        x = args[0]
        batches[-1][1].append((x.numel() // x.shape[-1], module.in_features, module.out_features))

    model = encoder.model
    fused = uses_onednn_linear(model)
    use_pytorch_linear(model)
    hooks = [model.register_forward_pre_hook(on_batch, with_kwargs=True)]
    hooks += [m.register_forward_hook(on_linear) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        encoder.encode(texts)
    finally:
        for hook in hooks:
            hook.remove()
        if fused:
            use_onednn_linear(model)
    return batches


def replay_gemm_rate(batches: list[tuple[int, list[tuple[int, int, int]]]], every: int = 2) -> float:
    """Sustained FLOP/s of torch matmul replaying a run's own linear-layer GEMMs back to back (every `every`-th batch).

    The ceiling the encoder is held to: the same shapes in the same order, timed as a whole like the encoder's
    pass, with nothing but the GEMMs. A best single call (`gemm_rate`) ran 3-13% above what this 2-core machine
    sustains over seconds; both are reported.
    """
    import torch

    # A weight of its own for each call of a batch, as in the model: the weights of all layers together do not
    # stay in cache between batches, and one shared weight per shape would.
    layers = max(batches, key=lambda b: len(b[1]))[1]
    weights = [torch.randn(i, o) for _, i, o in layers]
    rows = max(r for _, calls in batches for r, _, _ in calls)
    inputs = {i: torch.randn(rows, i) for _, i, _ in layers}
    flops = 0
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _, calls in batches[::every]:
            for (r, i, o), weight in zip(calls, weights, strict=True):
                torch.matmul(inputs[i][:r], weight)
                flops += 2 * r * i * o
        return flops / (time.perf_counter() - t0)


OPERATOR_GROUPS = {
    "linear layers": ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::gelu"),
    "attention matmuls and softmax": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm",
                                      "aten::_softmax", "aten::exp_", "aten::amax", "aten::masked_fill_"),
    "layout copies": ("aten::copy_",),
    "layer norms": ("aten::native_layer_norm",),
    "residual adds": ("aten::add",),
}


def time_by_operator(encoder, texts: list[str]) -> dict[str, float]:
    """Shares of the CPU time of one profiled `encode` by operator group (`OPERATOR_GROUPS`, the rest "other")."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        encoder.encode(texts)
    groups = dict.fromkeys([*OPERATOR_GROUPS, "other"], 0.0)
    for event in prof.key_averages():
        group = next((g for g, names in OPERATOR_GROUPS.items() if event.key in names), "other")
        groups[group] += event.self_cpu_time_total
    total = sum(groups.values()) or 1.0
    return {g: round(v / total, 3) for g, v in groups.items()}


def per_token_linear_weights(batches: list[tuple[int, list[tuple[int, int, int]]]]) -> int:
    """Weights of the linear layers that ran on every position of the first recorded batch (`recorded_gemms`)."""
    tokens, calls = batches[0]
    return sum(i * o for rows, i, o in calls if rows == tokens)


def model_flops_per_token(model, mean_tokens: float, batches=None) -> float:
    """2 x the weights of the Linear layers that run on every token, plus attention scores and mixing at the mean
    length. With `batches` (`recorded_gemms`) a layer counts only if it ran on every position (a pooler on the
    first token does not); without, every nn.Linear counts."""
    import torch

    if batches:
        linear = per_token_linear_weights(batches)
    else:
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    attention = 4 * cfg.num_hidden_layers * mean_tokens * width
    return 2 * linear + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--long", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for flag in ("rows", "long", "rounds", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not GLOSSES.exists():
        sys.exit(f"{GLOSSES} is absent: this benchmark needs the WordNet corpus in ../shared/corpora")
    import torch
    from sentence_transformers import SentenceTransformer

    from embedctl.pipeline.encoder import load_encoder
    from embedctl.pipeline.kernels import use_onednn_linear, use_pytorch_linear
    from embedctl.pipeline.models import resolve_model

    torch.set_num_threads(args.threads)
    ref = resolve_model("minilm")
    encoder = load_encoder(ref, device="cpu", shm="off")
    fused = use_onednn_linear(encoder.model) > 0  # what the encoder runs here (pipeline/kernels.py)
    st = SentenceTransformer(str(ref.path), device="cpu")
    glosses = pq.read_table(GLOSSES, columns=["text"]).column("text").to_pylist()
    corpora = {"glosses": glosses[:args.rows], "long": long_texts(glosses, encoder.tokenizer, args.long)}
    encoder.encode(glosses[-300:])  # warm both up on texts outside the measured ones
    st.encode(glosses[-300:])
    rows, ratios, ceiling = [], {}, {}
    for name, texts in corpora.items():
        lengths = [len(x) for x in encoder.tokenize(texts)[0]]
        st_rates, reference = sweep_sentence_transformers(st, name, texts, ST_BATCHES, rows)
        ours = {}
        from embedctl.pipeline.defaults import DEFAULT_BATCH_TOKENS_CPU

        for budget in BUDGETS:
            encoder.batch_tokens = budget
            encoder.forward_seconds, encoder.padded_tokens = 0.0, 0
            t0 = time.perf_counter()
            vectors = encoder.encode(texts).vectors
            wall = time.perf_counter() - t0
            label = f"batch_tokens={budget}" + (" (default)" if budget == DEFAULT_BATCH_TOKENS_CPU else "")
            ours[label] = {"rate": len(texts) / wall, "forward_share": encoder.forward_seconds / wall,
                           "padded": encoder.padded_tokens, "wall": wall}
            rows.append({"corpus": name, "method": "embedctl", "setting": label,
                         "texts_per_s": round(ours[label]["rate"], 1)})
            cos = float((vectors * reference).sum(1).min())
            assert cos >= 0.9999, f"embedctl diverged from sentence-transformers on {name}: cos {cos}"
        default = ours[f"batch_tokens={DEFAULT_BATCH_TOKENS_CPU} (default)"]
        best_bs = max(st_rates, key=st_rates.get)
        cfg = encoder.model.config
        encoder.batch_tokens = DEFAULT_BATCH_TOKENS_CPU
        gemms = recorded_gemms(encoder, texts)
        flops = model_flops_per_token(encoder.model, float(np.mean(lengths)), gemms)
        linear_flops = 2 * per_token_linear_weights(gemms)
        by_operator = time_by_operator(encoder, texts)
        paired = []
        def on_pytorch_linear(texts=texts) -> float:
            """Wall time of the same run on PyTorch's linear layers: what the oneDNN kernels bring."""
            use_pytorch_linear(encoder.model)
            try:
                return wall_timed(lambda: encoder.encode(texts))[1]
            finally:
                use_onednn_linear(encoder.model)

        for round_no in range(args.rounds):
            # The PyTorch-linear run alternates between just before and just after the pair (ST, embedctl).
            pytorch_wall = on_pytorch_linear() if fused and round_no % 2 else None
            rates, _ = sweep_sentence_transformers(st, name, texts, sorted({32, best_bs}), [])
            encoder.forward_seconds = 0.0
            _, wall = wall_timed(lambda texts=texts: encoder.encode(texts))
            forward_over_stage = encoder.forward_seconds / wall
            if fused and pytorch_wall is None:
                pytorch_wall = on_pytorch_linear()
            gemm = gemm_rate(cfg.hidden_size, cfg.intermediate_size)
            onednn = gemm_rate(cfg.hidden_size, cfg.intermediate_size, kernel="onednn") if fused else 0.0
            sustained = replay_gemm_rate(gemms)
            achieved = sum(lengths) * flops / wall
            paired.append({"onednn_over_pytorch_linear": pytorch_wall / wall if fused else float("nan"),
                           "vs_st_default": len(texts) / wall / rates[32],
                           "vs_st_best": len(texts) / wall / rates[best_bs],
                           "fraction_of_ceiling": achieved / gemm,
                           "fraction_of_best_gemm": achieved / max(gemm, onednn),
                           "fraction_of_sustained": achieved / sustained, "sustained_gflops": sustained / 1e9,
                           "forward_over_stage": forward_over_stage, "gemm_gflops": gemm / 1e9,
                           "onednn_gflops": onednn / 1e9})

        ratios[name] = {"vs_st_default": median(paired, "vs_st_default"), "vs_st_best": median(paired, "vs_st_best"),
                        "vs_st_default_range": spread(paired, "vs_st_default"), "vs_st_best_range": spread(paired, "vs_st_best"),
                        "onednn_over_pytorch_linear": median(paired, "onednn_over_pytorch_linear"),
                        "onednn_range": spread(paired, "onednn_over_pytorch_linear"),
                        "st_best_batch_size": best_bs, "rounds": args.rounds,
                        "best_budget": max(ours, key=lambda k: ours[k]["rate"])}
        ceiling[name] = {"gemm_gflops": median(paired, "gemm_gflops"), "model_mflops_per_token": round(flops / 1e6, 2),
                         "fraction_of_ceiling": median(paired, "fraction_of_ceiling"),
                         "fraction_range": spread(paired, "fraction_of_ceiling"),
                         "onednn_gemm_gflops": median(paired, "onednn_gflops"),
                         "sustained_gemm_gflops": median(paired, "sustained_gflops"),
                         "fraction_of_sustained": median(paired, "fraction_of_sustained"),
                         "fraction_of_sustained_range": spread(paired, "fraction_of_sustained"),
                         "linear_share_of_flops": round(linear_flops / flops, 3),
                         "time_by_operator": by_operator,
                         "fraction_of_best_gemm": median(paired, "fraction_of_best_gemm"),
                         "padding_overhead": round(default["padded"] / sum(lengths) - 1, 3),
                         "forward_over_stage": median(paired, "forward_over_stage"),
                         "mean_tokens": round(float(np.mean(lengths)), 1)}
    result = {"command": "python -m bench.throughput " + " ".join(sys.argv[1:]), "threads": args.threads,
              "cpus": os.cpu_count(), "rows": rows, "ratios": ratios, "ceiling": ceiling}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"# throughput vs sentence-transformers ({result['command']}), {args.threads} threads")
    print("| corpus | method | setting | texts/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['corpus']} | {r['method']} | {r['setting']} | {r['texts_per_s']} |")
    for name in corpora:
        print(f"{name}: embedctl default / ST default {ratios[name]['vs_st_default']}, / ST best "
              f"{ratios[name]['vs_st_best']}; ceiling {json.dumps(ceiling[name])}")


if __name__ == "__main__":
    main()
