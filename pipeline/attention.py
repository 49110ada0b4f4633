"""The attention the encoder runs: plain matmul attention for short sequences on CPU, SDPA otherwise.

PyTorch's CPU kernel behind `scaled_dot_product_attention` (a flash-attention variant) works in blocks of 32 to
128 positions: on the short sequences of an embedding corpus (a WordNet gloss is 15 tokens) it pads every block
and costs several times a plain `softmax(Q K^T) V` of the same inputs. `bench/attention.py` measures the
crossover; below `SHORT_ATTENTION_MAX_KV` key positions the plain form is used, above it and on every other
device SDPA runs unchanged. Both compute the same function (the tests compare them within float rounding).

The function is registered with transformers' `AttentionInterface` under `ATTENTION_NAME`, with SDPA's mask
builder, so every architecture that dispatches through the interface (BERT, Qwen3, Llama, ...) gets it by
`model.set_attn_implementation(ATTENTION_NAME)`.
"""

from __future__ import annotations

import logging

import torch

LOG = logging.getLogger(__name__)

ATTENTION_NAME = "embedctl"
"""Name of the attention implementation registered with transformers."""

SHORT_ATTENTION_MAX_KV = 64
"""Longest key length (positions) run as plain matmul attention on CPU; measured by `python -m bench.attention`."""

NARROW_SOFTMAX_MAX = 15
"""Up to this many key positions the softmax is written out (max, exp, sum, divide over the whole tensor): PyTorch's
CPU softmax kernel vectorises along the last dimension and falls back to scalar code below 16 lanes, 4-5x slower
(`python -m bench.attention` prints both)."""


def written_out_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension as max, exp, sum and divide over the whole tensor, in place on `scores`."""
    scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    return scores.div_(scores.sum(dim=-1, keepdim=True))


def softmax_last(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension (in place on `scores` for narrow rows): the written-out form up to
    `NARROW_SOFTMAX_MAX` positions, PyTorch's kernel above."""
    if scores.shape[-1] > NARROW_SOFTMAX_MAX:
        return torch.softmax(scores, dim=-1)
    return written_out_softmax(scores)


def plain_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float, is_causal: bool) -> torch.Tensor:
    """softmax(Q K^T * scaling + mask) V over (batch, heads, positions, head_dim); returns (batch, q, heads, dim).

    `mask` is SDPA's: boolean (True = attend) or additive float, broadcast over heads; key/value heads are
    repeated for grouped-query attention.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)).mul_(scaling)
    if mask is None and is_causal:
        q_len, kv_len = query.shape[2], key.shape[2]
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril_(kv_len - q_len)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
        else:
            scores.add_(mask)
    probs = softmax_last(scores.float()).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def embedctl_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, is_causal: bool | None = None,
                               **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: plain attention for short CPU sequences, else transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    short = (query.device.type == "cpu" and key.shape[2] <= SHORT_ATTENTION_MAX_KV and dropout == 0.0
             and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
             and not kwargs.get("output_attentions", False))
    if not short:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = plain_attention(query, key, value, attention_mask, scale, bool(causal) and query.shape[2] > 1)
    return out, None


def register() -> str:
    """Register the attention function (and SDPA's mask builder) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, embedctl_attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def use_embedctl_attention(model: torch.nn.Module) -> bool:
    """Switch a model that runs SDPA to the embedctl attention; returns whether it was switched.

    Models on another implementation (eager, flash-attention, a custom one) keep it.
    """
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != "sdpa":
        return False
    try:
        model.set_attn_implementation(register())
    except (AttributeError, KeyError, ValueError) as exc:  # an architecture outside the AttentionInterface
        LOG.info("%s keeps SDPA attention: %s", type(model).__name__, exc)
        return False
    return True
