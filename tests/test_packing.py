"""Packed batches (issue 15, the CPU side): the sequences of a batch concatenated with no padding, attention per
sequence, pooling from the offsets. The CPU form of packed attention is the oracle of the CUDA one; here it must
give the padded path's vectors within fp32 cosine 0.99999, on a tiny random Qwen3 (causal, last-token pooling,
grouped-query heads) and on MiniLM (bidirectional, mean pooling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedctl.pipeline.encoder import load_encoder
from embedctl.pipeline.models import ModelRef
from embedctl.pipeline.packing import pack, pack_by_tokens, per_sequence_attention, pool_packed

TEXTS = ["a", "dog", "the river flows to the sea past the old stone bridge", "light", "a small bird sings",
         "fire " * 40, "music and paper, glass and cloud, rain and a bird over the road", "x y"]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("model", ["tiny_qwen3", "minilm_path"])
def test_packed_batches_give_the_padded_vectors(model, request):
    ref = ModelRef("m", request.getfixturevalue(model))
    padded = load_encoder(ref, device="cpu", shm="off", batch_tokens=256)
    packed = load_encoder(ref, device="cpu", shm="off", batch_tokens=256)
    assert not padded.packed  # CPU keeps padded batches by default
    packed.packed = True
    texts = TEXTS * 3 + [f"text {i} about rivers and dogs" for i in range(40)]
    a, b = padded.encode(texts).vectors, packed.encode(texts).vectors
    assert a.shape == b.shape and (_cos(a, b) >= 0.99999).all(), _cos(a, b).min()
    assert packed.padded_tokens == sum(len(s) for s in packed.tokenize(list(dict.fromkeys(texts)))[0])


def test_packing_is_per_sequence_whatever_the_neighbours(tiny_qwen3):
    encoder = load_encoder(ModelRef("m", tiny_qwen3), device="cpu", shm="off")
    encoder.packed = True
    alone = encoder.encode(["the river flows"]).vectors
    among = encoder.encode(["fire " * 30, "the river flows", "a"]).vectors[1:2]
    assert _cos(alone, among)[0] >= 0.99999


def test_pack_offsets_positions_and_pooling():
    sequences = [[5], [1, 2, 3], list(range(10, 18)), [7, 7]]  # lengths 1, 3, 8 (the budget below), 2
    packed = pack(sequences)
    assert packed.cu_seqlens.tolist() == [0, 1, 4, 12, 14] and packed.max_length == 8
    assert packed.input_ids[0].tolist() == [t for s in sequences for t in s]
    assert packed.position_ids[0].tolist() == [0, 0, 1, 2, *range(8), 0, 1]
    hidden = torch.arange(14 * 3, dtype=torch.float32).reshape(14, 3)
    assert pool_packed(hidden, packed.cu_seqlens, "last").tolist() == hidden[[0, 3, 11, 13]].tolist()
    assert pool_packed(hidden, packed.cu_seqlens, "cls").tolist() == hidden[[0, 1, 4, 12]].tolist()
    means = pool_packed(hidden.unsqueeze(0), packed.cu_seqlens, "mean")
    expected = torch.stack([hidden[0:1].mean(0), hidden[1:4].mean(0), hidden[4:12].mean(0), hidden[12:14].mean(0)])
    assert torch.allclose(means, expected)
    assert pack_by_tokens([8, 3, 2, 1, 1], 8) == [(0, 1), (1, 5)]
    assert pack_by_tokens([20, 3], 8) == [(0, 1), (1, 2)]  # a sequence over the budget goes alone
    with pytest.raises(ValueError):
        pack([[1], []])


@pytest.mark.parametrize("causal", [True, False])
def test_per_sequence_attention_is_block_diagonal_attention(causal):
    torch.manual_seed(0)
    cu = torch.tensor([0, 1, 5, 12], dtype=torch.int32)
    q = torch.randn(1, 4, 12, 8)
    k, v = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)  # grouped-query: 2 key/value heads for 4
    out = per_sequence_attention(q, k, v, cu, 8 ** -0.5, causal)
    segment = torch.repeat_interleave(torch.arange(3), (cu[1:] - cu[:-1]).long())
    mask = segment[:, None] == segment[None, :]
    if causal:
        mask &= torch.ones(12, 12, dtype=torch.bool).tril()
    full = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            attn_mask=mask, scale=8 ** -0.5)
    assert out.shape == (1, 12, 4, 8) and torch.allclose(out, full.transpose(1, 2), atol=1e-5)


def test_embedctl_packing_chooses_the_batches(monkeypatch):
    from embedctl.pipeline.errors import ConfigError
    from embedctl.pipeline.policy import packing_mode

    cpu = torch.device("cpu")
    assert packing_mode(cpu) is False  # off until measured on a GPU
    monkeypatch.setenv("EMBEDCTL_PACKING", "on")
    assert packing_mode(cpu) is True
    monkeypatch.setenv("EMBEDCTL_PACKING", "auto")
    assert packing_mode(cpu) is False  # auto packs on CUDA only
    monkeypatch.setenv("EMBEDCTL_PACKING", "sometimes")
    with pytest.raises(ConfigError, match="EMBEDCTL_PACKING must be one of off, on, auto"):
        packing_mode(cpu)


def test_static_pack_fills_the_budget_with_a_filler_that_is_never_pooled():
    sequences = [[5], [1, 2, 3], [7, 7]]
    packed = pack(sequences, total=16, pad_id=0)
    assert packed.input_ids.shape == (1, 16) and packed.count == 3
    assert packed.cu_seqlens.tolist() == [0, 1, 4, 6, 16] and packed.real_cu_seqlens.tolist() == [0, 1, 4, 6]
    assert packed.position_ids[0, 6:].tolist() == list(range(10))  # the filler is a sequence of its own
    assert packed.max_length == 16 and packed.lengths.tolist() == [1, 3, 2]  # longest (10) up to a power of 2
    assert pack([[1, 2, 3]], total=3).cu_seqlens.tolist() == [0, 3]  # full: no filler
    hidden = torch.randn(16, 4)
    assert pool_packed(hidden, packed.real_cu_seqlens, "last").shape == (3, 4)


class _CountingBackend:
    """A torch.compile backend that runs the captured graphs eagerly and counts them (one per compilation)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("model", ["tiny_qwen3", "minilm_path"])
def test_compiled_packed_batches_keep_one_shape_and_stop_compiling_after_warm_up(model, request, monkeypatch):
    """`--compile on` with packed batches: every batch is the budget's tokens, the sequence count is dynamic, the
    longest length comes in powers of two: after a warm-up on varied texts, other mixes compile nothing new; and
    the vectors are the eager ones."""
    import torch._dynamo

    from embedctl.pipeline import packing, policy

    torch._dynamo.reset()
    backend = _CountingBackend()
    monkeypatch.setattr(policy, "COMPILE_BACKEND", backend)
    shapes = []

    def recording_pack(sequences, *args, **kwargs):
        out = pack(sequences, *args, **kwargs)
        if kwargs.get("total"):  # a batch of the compiled encoder
            shapes.append((out.input_ids.shape[1], len(sequences), max(map(len, sequences))))
        return out

    monkeypatch.setattr(packing, "pack", recording_pack)
    ref = ModelRef("m", request.getfixturevalue(model))
    eager = load_encoder(ref, device="cpu", shm="off", batch_tokens=128, packed=True)
    fast = load_encoder(ref, device="cpu", shm="off", batch_tokens=128, packed=True, compile="on")
    assert fast.is_compiled and not eager.is_compiled
    warm = TEXTS * 2 + [f"text {i} about rivers" for i in range(30)] + ["word " * n for n in (3, 9, 20, 60, 100)]
    fast.encode(warm)
    after_warm_up = backend.graphs
    assert after_warm_up > 0
    for texts in (TEXTS, [f"the dog {i}" for i in range(50)], ["long " * 70, "b"], ["sea " * 30] * 3 + ["a"]):
        a, b = eager.encode(texts).vectors, fast.encode(texts).vectors
        assert (_cos(a, b) >= 0.99999).all(), _cos(a, b).min()
    assert backend.graphs == after_warm_up, f"{backend.graphs - after_warm_up} recompiles after warm-up"
    assert shapes and all(width == 128 or (n == 1 and longest > 128) for width, n, longest in shapes), shapes
    torch._dynamo.reset()


def test_compile_modes_and_the_auto_rule(monkeypatch):
    from embedctl.pipeline.defaults import compile_mode
    from embedctl.pipeline.errors import ConfigError
    from embedctl.pipeline.policy import COMPILE_AFTER_SECONDS, compile_after_seconds, compile_due

    assert [compile_mode(v) for v in (True, False, "AUTO", None, "on", "0")] == ["on", "off", "auto", "auto", "on",
                                                                                "off"]
    with pytest.raises(ConfigError, match="auto, on, off"):
        compile_mode("sometimes")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert compile_due("on", cpu, 0, 175) and not compile_due("off", cuda, 1e9, 175)
    assert not compile_due("auto", cpu, 1e9, 175)  # measured no faster on CPU
    assert not compile_due("auto", cuda, 174.9, 175) and compile_due("auto", cuda, 175, 175)
    monkeypatch.delenv("EMBEDCTL_COMPILE_AFTER", raising=False)
    assert compile_after_seconds() == COMPILE_AFTER_SECONDS
    monkeypatch.setenv("EMBEDCTL_COMPILE_AFTER", "30")
    assert compile_after_seconds() == 30
    monkeypatch.setenv("EMBEDCTL_COMPILE_AFTER", "soon")
    with pytest.raises(ConfigError, match="EMBEDCTL_COMPILE_AFTER"):
        compile_after_seconds()


def test_auto_compiles_once_the_eager_time_is_spent(tiny_qwen3, monkeypatch):
    """The switch itself, on CPU with the rule forced to say yes after 0 s (CUDA-only in real use)."""
    from embedctl.pipeline import policy

    monkeypatch.setattr(policy, "COMPILE_BACKEND", _CountingBackend())
    calls = []

    def due(mode, device, eager, after):
        calls.append(eager)
        return mode == "auto" and eager > 0

    monkeypatch.setattr(policy, "compile_due", due)
    encoder = load_encoder(ModelRef("m", tiny_qwen3), device="cpu", shm="off", packed=True, compile="auto")
    assert not encoder.is_compiled  # nothing run yet
    encoder.encode(TEXTS)
    assert not encoder.is_compiled
    encoder.encode(TEXTS)  # the eager seconds of the first run are on the loaded model now
    assert encoder.is_compiled and calls[-1] > 0
    again = load_encoder(ModelRef("m", tiny_qwen3), device="cpu", shm="off", packed=True, compile="auto")
    assert not again.is_compiled  # another model object: its own eager time
    torch._dynamo.reset()


def test_one_model_switches_between_packed_and_padded_batches(tiny_qwen3):
    """Packed attention is switched on once and stays; a padded batch on the same model gets its attention back."""
    from embedctl.pipeline.packing import PACKED_ATTENTION

    encoder = load_encoder(ModelRef("m", tiny_qwen3), device="cpu", shm="off")
    before = encoder.model.config._attn_implementation
    padded = encoder.encode(TEXTS).vectors
    encoder.packed = True
    packed = encoder.encode(TEXTS).vectors
    assert encoder.model.config._attn_implementation == PACKED_ATTENTION  # kept between batches
    encoder.packed = False
    again = encoder.encode(TEXTS).vectors
    assert encoder.model.config._attn_implementation == before
    assert (_cos(padded, packed) >= 0.99999).all() and np.array_equal(padded, again)
