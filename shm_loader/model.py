"""Build a transformers model whose weights are views of an attached segment (no copy, no disk read).

The model is constructed with its parameters on the meta device and its buffers real (so non-persistent
buffers such as rotary inverse frequencies and position ids are computed as in a normal load), then the
segment's tensors are assigned in place of the parameters with `load_state_dict(assign=True)`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from embedctl.shm_loader.errors import SegmentError
from embedctl.shm_loader.segment import Attached, attach

LOG = logging.getLogger(__name__)


@contextmanager
def params_on_meta():
    """Register every new module parameter on the meta device (buffers stay real): no weight memory is used."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            kwargs = dict(module._parameters[name].__dict__)
            kwargs["requires_grad"] = param.requires_grad
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def _state_for(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map checkpoint names to the model's names (a base model loaded from e.g. a `*ForCausalLM` checkpoint)."""
    prefixes = ["", f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else None, "model."]
    expected = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    state = {}
    for key in expected:
        for prefix in prefixes:
            if prefix is not None and prefix + key in tensors:
                state[key] = tensors[prefix + key]
                break
    return state


def build_model(folder: Path, attached: Attached, dtype: torch.dtype) -> torch.nn.Module:
    """A model of `folder`'s architecture whose parameters are the segment's tensors."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(folder))
    with params_on_meta():
        model = AutoModel.from_config(config, dtype=dtype)
    state = _state_for(model, attached.tensors)
    model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise SegmentError(f"segment {attached.name} lacks {len(left)} weights of {folder} (e.g. {left[0]}); "
                           "publish it again")
    model.requires_grad_(False)
    model.eval()
    model._embedctl_segment = attached  # the mapping lives as long as the model
    return model


def attach_model(folder: Path, dtype: torch.dtype, shm_dir: Path | None = None) -> torch.nn.Module | None:
    """The model of `folder` on the shared weights in `dtype`, or None when no segment is published."""
    attached = attach(folder, dtype, shm_dir)
    if attached is None:
        return None
    model = build_model(folder, attached, dtype)
    LOG.info("attached %s from %s", folder, attached.path)
    return model
