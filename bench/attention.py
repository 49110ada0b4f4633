"""CPU attention: PyTorch's SDPA kernel vs plain matmul attention, by sequence length (where the encoder switches).

    python -m bench.attention [--threads 2] [--heads 12] [--head-dim 32] [--tokens 1024] [--json]

At each key length T, a batch of tokens // T sequences (the encoder's CPU budget) with a padding mask, MiniLM's
heads by default; 21 calls of each, alternated, and the median of the per-pair ratios. `pipeline.attention.SHORT_ATTENTION_MAX_KV` is the
longest T run as plain attention. Then the softmax alone over (batch, heads, T, T) scores: PyTorch's kernel vs the
written-out form `pipeline.attention.softmax_last` uses up to `NARROW_SOFTMAX_MAX` positions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

LENGTHS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
SOFTMAX_WIDTHS = (4, 8, 12, 15, 16, 20, 24, 32, 64)


def paired_ms(fn_a, fn_b, repeats: int = 21) -> tuple[float, float, float]:
    """Median ms of `fn_a` and of `fn_b`, called alternately (this machine's speed drifts), and the median of the
    per-pair ratios b / a."""
    fn_a(), fn_b()
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, a), (fn_b, b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    ratios = sorted(y / x for x, y in zip(a, b, strict=True))
    return sorted(a)[repeats // 2] * 1e3, sorted(b)[repeats // 2] * 1e3, ratios[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F

    from embedctl.pipeline.attention import (
        NARROW_SOFTMAX_MAX,
        SHORT_ATTENTION_MAX_KV,
        plain_attention,
        written_out_softmax,
    )

    torch.set_num_threads(args.threads)
    rows = []
    for length in LENGTHS:
        batch = max(1, args.tokens // length)
        q, k, v = (torch.randn(batch, args.heads, length, args.head_dim) for _ in range(3))
        mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        mask[0, ..., : length // 3] = False
        scale = args.head_dim ** -0.5
        sdpa, plain, ratio = paired_ms(
            lambda q=q, k=k, v=v, mask=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            lambda q=q, k=k, v=v, mask=mask, s=scale: plain_attention(q, k, v, mask, s, False))
        rows.append({"kv_length": length, "batch": batch, "sdpa_ms": round(sdpa, 3), "plain_ms": round(plain, 3),
                     "plain_over_sdpa": round(ratio, 3),
                     "encoder_uses": "plain" if length <= SHORT_ATTENTION_MAX_KV else "sdpa"})
    softmax_rows = []
    for width in SOFTMAX_WIDTHS:
        scores = torch.randn(max(1, args.tokens // width), args.heads, width, width)
        kernel, written, ratio = paired_ms(  # both on a copy: softmax_last works in place
            lambda s=scores: torch.softmax(s.clone(), dim=-1),
            lambda s=scores: written_out_softmax(s.clone()))
        softmax_rows.append({"width": width, "torch_softmax_ms": round(kernel, 3), "written_out_ms": round(written, 3),
                             "written_over_torch": round(ratio, 3),
                             "encoder_uses": "written-out" if width <= NARROW_SOFTMAX_MAX else "torch"})
    result = {"command": "python -m bench.attention " + " ".join(sys.argv[1:]), "threads": args.threads,
              "short_attention_max_kv": SHORT_ATTENTION_MAX_KV, "rows": rows,
              "narrow_softmax_max": NARROW_SOFTMAX_MAX, "softmax_rows": softmax_rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"# {result['command']}")
    for r in rows + softmax_rows:
        print(r)


if __name__ == "__main__":
    main()
