"""When an encoder packs its batches and when it compiles its model: the two run-time policies, and the one place
that reads their environment variables (EMBEDCTL_PACKING, EMBEDCTL_COMPILE_AFTER).

Both are decided per process and per device, not per job: packing follows what this torch build can run on the
device, compiling follows the eager forward time a process has spent on a model (`LoadedModel.eager_seconds`).
"""

from __future__ import annotations

import torch

from embedctl.pipeline import packing
from embedctl.settings import setting

PACKING_MODES = ("off", "on", "auto")
"""EMBEDCTL_PACKING: `off` (the default until `python -m bench.gpu --parts packing` has measured packed batches on a
GPU), `on`, or `auto` (on CUDA where this torch has variable-length attention; CPU batches stay padded, where
`bench.attention` measured the short-sequence kernels they use)."""


def packing_available() -> bool:
    """Whether this torch build has variable-length attention (what packed batches run on CUDA)."""
    return packing._varlen_attn() is not None


def packing_mode(device: torch.device) -> bool:
    """Whether an encoder on `device` runs packed batches (EMBEDCTL_PACKING, every process reads it)."""
    mode = setting("packing")
    if mode == "auto":
        return device.type == "cuda" and packing_available()
    return mode == "on"


COMPILE_AFTER_SECONDS = 175.0
"""Eager forward seconds after which `--compile auto` compiles: the compile time measured for the 4B shape on an
H100 (174.6 s, bench-results/gpu-compile.json). Compiling then is the ski-rental rule: whatever the work left, the
process spends at most twice the time the better choice in hindsight would have (compiled it ran 1.54-1.68x eager's
speed, so a job of more than ~500 s of eager work gains from compiling at all)."""

COMPILE_BACKEND = "inductor"
"""The torch.compile backend (tests count graphs with a backend of their own)."""


def compile_after_seconds() -> float:
    """EMBEDCTL_COMPILE_AFTER (seconds of eager forward time before `--compile auto` compiles)."""
    value = setting("compile_after")
    return COMPILE_AFTER_SECONDS if value is None else value


def compile_due(mode: str, device: torch.device, eager_seconds: float, after: float) -> bool:
    """Whether an encoder compiles now: `on` always; `auto` on CUDA once `after` seconds of eager forward time
    have passed in this process (on CPU compiling was measured no faster); `off` never."""
    if mode == "on":
        return True
    return mode == "auto" and device.type == "cuda" and eager_seconds >= after


def compile_model(model: torch.nn.Module, static: bool = False) -> torch.nn.Module:
    """`torch.compile(model)` for embedding (made once per loaded model: `LoadedModel.compiled`).

    Compiling fuses the elementwise work between the matmuls (norms, rotary embeddings, activations). Padded
    batches vary in both dimensions with every batch, hence `dynamic=True`; packed batches (`static`) are padded to
    the token budget, so only the sequence count varies (marked dynamic by `packed_forward`) and the matmuls see one
    static shape. The first batches pay the compilation (minutes for a 4B model): worth it on GPUs for long runs
    (`python -m bench.gpu`), not on CPU, where it was measured no faster.
    """
    return torch.compile(model, dynamic=None if static else True, backend=COMPILE_BACKEND)
