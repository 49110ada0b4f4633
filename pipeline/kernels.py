"""oneDNN linear layers for fp32 models on CPU: bias and GELU fused into the matmul.

PyTorch runs `nn.Linear` on CPU as MKL `addmm`: the bias is first copied into the output and the matmul adds to
it, and an activation after it is another full pass over the largest activation in the model (tokens x
intermediate). oneDNN's linear primitive (`torch.ops.mkldnn._linear_pointwise`, what inductor emits for CPU)
applies the bias and an exact-erf GELU as post-ops while the output tile is still in cache; it also ran 8-10%
faster than MKL at the shapes of a 384-wide encoder (`python -m bench.throughput` reports the end-to-end gain).

`use_onednn_linear` rebinds the `forward` of each `nn.Linear` of a CPU fp32 model, and fuses GELU into the
matmul of BERT-family "intermediate" blocks (`dense` followed by `intermediate_act_fn`). The weights are not
copied or re-laid-out, so weights attached from shared memory stay shared. A probe compares the kernel with
`F.linear` once per process; on a build where it is missing or disagrees, the model keeps PyTorch's layers.
"""

from __future__ import annotations

import functools
import logging
import types

import torch
import torch.nn.functional as F

LOG = logging.getLogger(__name__)

_MARK = "_embedctl_onednn"


@functools.cache
def onednn_linear_works() -> bool:
    """Whether oneDNN's fused linear runs here and matches `F.linear` (with and without GELU) on a probe."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen) for shape in ((3, 5, 64), (48, 64), (48,)))
    try:
        with torch.inference_mode():
            plain = op(x, w, b, "none", [], "")
            gelu = op(x, w, None, "gelu", [], "none")
    except (RuntimeError, NotImplementedError) as exc:
        LOG.info("oneDNN linear unavailable, PyTorch's linear layers stay: %s", exc)
        return False
    return bool(torch.allclose(plain, F.linear(x, w, b), atol=1e-4)
                and torch.allclose(gelu, F.gelu(F.linear(x, w)), atol=1e-4))


def _linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad and torch.is_grad_enabled():  # the oneDNN op has no backward
        return torch.nn.Linear.forward(self, x)
    return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _linear_gelu_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    dense = self.dense
    if dense.weight.requires_grad and torch.is_grad_enabled():
        return type(self).forward(self, x)
    return torch.ops.mkldnn._linear_pointwise(x, dense.weight, dense.bias, "gelu", [], "none")


def _is_exact_gelu(act: object) -> bool:
    """transformers' `GELUActivation` on `F.gelu` (erf), or `nn.GELU()` without the tanh approximation."""
    if isinstance(act, torch.nn.GELU):
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu


def _is_plain_linear(module: torch.nn.Module) -> bool:
    """An `nn.Linear` whose forward is nn.Linear's own (subclasses may return other things)."""
    return isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward


_GELU_BLOCK_CHECKED: dict[type, bool] = {}


def _is_gelu_block(module: torch.nn.Module) -> bool:
    """A BERT-family intermediate block whose forward is `intermediate_act_fn(dense(x))` with an exact GELU.

    The children must be exactly those two (a pre-norm or dropout variant has more), and the first block of each
    class is run both ways on a probe: a class whose forward does anything else keeps it.
    """
    children = dict(module.named_children())
    if not (type(module).__name__.endswith("Intermediate") and set(children) == {"dense", "intermediate_act_fn"}
            and _is_plain_linear(children["dense"]) and _is_exact_gelu(children["intermediate_act_fn"])):
        return False
    cls = type(module)
    if cls not in _GELU_BLOCK_CHECKED:
        dense = children["dense"]
        x = torch.randn(2, 3, dense.in_features, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            try:
                same = torch.allclose(_linear_gelu_forward(module, x), cls.forward(module, x), atol=1e-4)
            except Exception:  # noqa: BLE001 - any failure means: not the block we fuse
                same = False
        _GELU_BLOCK_CHECKED[cls] = bool(same)
    return _GELU_BLOCK_CHECKED[cls]


def use_onednn_linear(model: torch.nn.Module) -> int:
    """Run the linear layers of a CPU fp32 `model` on oneDNN; returns how many forwards were rebound (0: none).

    Idempotent (a worker builds an Encoder per task over the same model); `use_pytorch_linear` undoes it, and so
    does a call on a model that is no longer fp32 on CPU (moved to a GPU or cast after an earlier call).
    """
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    if not params or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        use_pytorch_linear(model)
        return 0
    if getattr(model, _MARK, 0):
        return getattr(model, _MARK)
    if not onednn_linear_works():
        return 0
    count = 0
    for module in model.modules():
        if _is_gelu_block(module):
            module.forward = types.MethodType(_linear_gelu_forward, module)
            count += 1
        elif _is_plain_linear(module):
            module.forward = types.MethodType(_linear_forward, module)
            count += 1
    object.__setattr__(model, _MARK, count)
    return count


def uses_onednn_linear(model: torch.nn.Module) -> bool:
    """Whether `use_onednn_linear` has rebound this model's linear layers."""
    return bool(getattr(model, _MARK, 0))


def use_pytorch_linear(model: torch.nn.Module) -> None:
    """Undo `use_onednn_linear` (the benchmarks compare both)."""
    if not isinstance(model, torch.nn.Module):
        return
    ours = (_linear_forward, _linear_gelu_forward)
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) in ours:
            del module.forward
    model.__dict__.pop(_MARK, None)
