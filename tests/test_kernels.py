"""oneDNN linear layers (pipeline/kernels.py): same vectors as PyTorch's layers, only where they apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedctl.pipeline import kernels
from embedctl.pipeline.encoder import load_encoder
from embedctl.pipeline.kernels import onednn_linear_works, use_onednn_linear, use_pytorch_linear
from embedctl.pipeline.models import ModelRef

pytestmark = pytest.mark.skipif(not onednn_linear_works(), reason="this torch build has no working oneDNN linear")

TEXTS = ["a domestic animal that barks", "the act of running quickly", "x", "a unit of length " * 40]


class ToyIntermediate(torch.nn.Module):
    """The shape of a BERT intermediate block: dense, then an activation."""

    def __init__(self, act: torch.nn.Module):
        super().__init__()
        self.dense = torch.nn.Linear(16, 24)
        self.intermediate_act_fn = act

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))


def _forwards(model: torch.nn.Module) -> dict[str, object]:
    return {name: m.__dict__["forward"].__func__ for name, m in model.named_modules() if "forward" in m.__dict__}


def test_encoder_runs_onednn_and_its_vectors_equal_pytorch_layers(minilm_path):
    encoder = load_encoder(ModelRef("minilm", minilm_path), device="cpu", shm="off")
    rebound = _forwards(encoder.model)
    assert sum(f is kernels._linear_gelu_forward for f in rebound.values()) == 6  # one GELU block per layer
    assert sum(isinstance(m, torch.nn.Linear) for m in encoder.model.modules()) <= len(rebound)
    fused = encoder.encode(TEXTS).vectors
    use_pytorch_linear(encoder.model)
    assert _forwards(encoder.model) == {}
    plain = encoder.encode(TEXTS).vectors
    assert np.abs(fused - plain).max() < 1e-5 and (fused * plain).sum(1).min() >= 0.99999
    assert use_onednn_linear(encoder.model) == len(rebound) == use_onednn_linear(encoder.model)  # idempotent


def test_gelu_is_fused_only_when_it_is_the_exact_one():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    for act, fused in ((torch.nn.GELU(), True), (torch.nn.GELU(approximate="tanh"), False), (torch.nn.ReLU(), False)):
        block = ToyIntermediate(act)
        with torch.inference_mode():
            expected = block(x)
            use_onednn_linear(block)
            got = block(x)
        assert (_forwards(block).get("") is kernels._linear_gelu_forward) == fused
        assert _forwards(block)["dense"] is kernels._linear_forward  # unfused, the matmul still runs on oneDNN
        assert torch.allclose(got, expected, atol=1e-5), act


class PreNormIntermediate(ToyIntermediate):
    """Same children as a BERT block plus a norm in front: fusing would drop the norm."""

    def __init__(self):
        super().__init__(torch.nn.GELU())
        self.LayerNorm = torch.nn.LayerNorm(16)

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(self.LayerNorm(x)))


class ScaledIntermediate(ToyIntermediate):
    """The same two children, but a forward that does something else: caught by the probe."""

    def __init__(self):
        super().__init__(torch.nn.GELU())

    def forward(self, x):
        return 2 * self.intermediate_act_fn(self.dense(x))


class TupleLinear(torch.nn.Linear):
    """A Linear subclass with a forward of its own (as routers in mixture-of-experts models have)."""

    def forward(self, x):
        return super().forward(x), x


@pytest.mark.parametrize("make", [PreNormIntermediate, ScaledIntermediate])
def test_blocks_that_are_not_dense_then_gelu_keep_their_forward(make):
    torch.manual_seed(0)
    block, x = make(), torch.randn(2, 5, 16)
    with torch.inference_mode():
        expected = block(x)
        use_onednn_linear(block)
        got = block(x)
    assert "" not in _forwards(block) and torch.allclose(got, expected, atol=1e-5)


def test_linear_subclasses_and_training_keep_pytorch():
    model = torch.nn.Sequential(TupleLinear(8, 8), torch.nn.Linear(8, 4))
    assert use_onednn_linear(model) == 1 and set(_forwards(model)) == {"1"}
    x = torch.randn(3, 8)
    model[1](x).sum().backward()  # outside inference mode, with weights that want gradients: autograd works
    assert model[1].weight.grad is not None and model[1].weight.grad.abs().sum() > 0


def test_a_model_cast_after_the_switch_goes_back_to_pytorch():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert use_onednn_linear(model) == 1
    model.double()
    assert use_onednn_linear(model) == 0 and _forwards(model) == {}
    assert model(torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float64


def test_left_alone_off_fp32_cpu_or_when_the_probe_fails(monkeypatch):
    bf16 = torch.nn.Sequential(torch.nn.Linear(8, 8)).to(torch.bfloat16)
    assert use_onednn_linear(bf16) == 0 and _forwards(bf16) == {}
    monkeypatch.setattr(kernels, "onednn_linear_works", lambda: False)
    fp32 = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert use_onednn_linear(fp32) == 0 and _forwards(fp32) == {}


def test_probe_compares_with_pytorch(monkeypatch):
    onednn_linear_works.cache_clear()
    real = torch.ops.mkldnn._linear_pointwise

    class Wrong:
        """A kernel that drops the bias: the probe must notice."""

        def __call__(self, x, w, b, *args):
            return real(x, w, None, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Wrong())
    try:
        assert not onednn_linear_works()
    finally:
        monkeypatch.undo()
        onednn_linear_works.cache_clear()
    assert onednn_linear_works()
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    assert torch.allclose(torch.ops.mkldnn._linear_pointwise(x, w, None, "gelu", [], "none"), F.gelu(x @ w.T),
                          atol=1e-5)
