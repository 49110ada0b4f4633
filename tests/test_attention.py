"""The encoder's attention: plain matmul attention for short CPU sequences equals SDPA; models switch to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embedctl.pipeline.attention import (
    ATTENTION_NAME,
    SHORT_ATTENTION_MAX_KV,
    embedctl_attention_forward,
    plain_attention,
    softmax_last,
)
from embedctl.pipeline.encoder import load_encoder
from embedctl.pipeline.models import ModelRef


def _qkv(batch=3, heads=4, kv_heads=4, q_len=9, kv_len=9, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, q_len, dim, generator=g), torch.randn(batch, kv_heads, kv_len, dim, generator=g),
            torch.randn(batch, kv_heads, kv_len, dim, generator=g))


def _sdpa(q, k, v, mask=None, is_causal=False):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal).transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_plain_attention_equals_sdpa_with_a_padding_mask(kv_heads):
    q, k, v = _qkv(kv_heads=kv_heads)
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding of the first row
    mask[2, ..., 7:] = False  # right padding of the last
    ours = plain_attention(q, k, v, mask, 16 ** -0.5, is_causal=False)
    assert torch.allclose(ours, _sdpa(q, k, v, mask), atol=1e-5)
    additive = torch.zeros(3, 1, 1, 9).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert torch.allclose(plain_attention(q, k, v, additive, 16 ** -0.5, is_causal=False), ours, atol=1e-5)


@pytest.mark.parametrize("width", [1, 2, 7, 15, 16, 40])
def test_written_out_softmax_equals_torch_softmax(width):
    scores = torch.randn(5, 3, 4, width, generator=torch.Generator().manual_seed(width)) * 8
    scores[0, 0, 0, : max(1, width - 1)] = torch.finfo(torch.float32).min  # a row masked but for its last key
    expected = torch.softmax(scores, dim=-1)
    ours = softmax_last(scores.clone())
    assert torch.allclose(ours, expected, atol=1e-6) and torch.allclose(ours.sum(-1), torch.ones(5, 3, 4))


def test_plain_attention_is_causal_without_a_mask():
    q, k, v = _qkv(kv_heads=2)
    ours = plain_attention(q, k, v, None, 16 ** -0.5, is_causal=True)
    assert torch.allclose(ours, _sdpa(q, k, v, is_causal=True), atol=1e-5)
    assert not torch.allclose(ours, _sdpa(q, k, v), atol=1e-3)


def test_long_sequences_go_to_sdpa(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    calls = []
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *a, **kw: calls.append(a[2].shape[2]) or (None, None))
    module = torch.nn.Module()
    module.is_causal = False
    for length in (SHORT_ATTENTION_MAX_KV, SHORT_ATTENTION_MAX_KV + 1):
        q, k, v = _qkv(q_len=length, kv_len=length)
        out, _ = embedctl_attention_forward(module, q, k, v, None, scaling=0.25)
        assert (out is None) == (length > SHORT_ATTENTION_MAX_KV)
    assert calls == [SHORT_ATTENTION_MAX_KV + 1]


@pytest.mark.parametrize("fixture", ["minilm_path", "tiny_qwen3"])
def test_encoder_models_run_the_embedctl_attention(request, fixture):
    encoder = load_encoder(ModelRef(fixture, request.getfixturevalue(fixture)), device="cpu", shm="off")
    assert encoder.model.config._attn_implementation == ATTENTION_NAME
    short, long_ = encoder.encode(["a short text", " ".join(["word"] * 100)]).vectors
    assert abs(float(short @ short) - 1) < 1e-5 and abs(float(long_ @ long_) - 1) < 1e-5
