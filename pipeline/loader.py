"""The one model loader: device, dtype and shared-memory mode resolved, weights found, one handle returned.

Every process that embeds loads through `load`: a one-shot command (`embedctl index`, `query`, `eval`), a server
worker, a Celery pool child (which attaches in `worker_process_init` with a short wait and no disk fallback, then
loads lazily in its first task). The weights come from, in this order:

1. the device copy of this bootstrap's exporter (EMBEDCTL_DEVICE_SHARE=on and its key; shm_loader/share.py):
   waiting `wait` s for an exporter being restarted, never falling back to the disk;
2. the published host segment (`embedctl shm publish`), copied to the device: no disk read, no deserialisation;
3. the checkpoint on disk (unless `shm="require"`, or `disk=False`).

What a process learns about a loaded model while it runs (the eager forward time `--compile auto` counts, the token
budget an out-of-memory error lowered it to, the compiled module) is kept on the handle, `LoadedModel`, which a
worker caches across tasks: the encoders it builds over the handle share it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedctl.pipeline.defaults import DEFAULT_BATCH_TOKENS_CPU, DEFAULT_BATCH_TOKENS_CUDA
from embedctl.pipeline.errors import ConfigError, EmbedctlError, ModelError, WeightsLost
from embedctl.pipeline.models import ModelProfile, ModelRef, read_profile
from embedctl.settings import setting

if TYPE_CHECKING:  # torch is imported where a model is loaded: the CLI reads `shm_mode` without it
    import torch

    from embedctl.shm_loader.segment import Attached
    from embedctl.shm_loader.share import Lease

LOG = logging.getLogger(__name__)

DTYPES = {
    "fp32": "float32", "float32": "float32",
    "fp16": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}
"""Names accepted by `--dtype` (besides `auto`), and the torch dtype each names."""

SHM_MODES = ("auto", "require", "off")
"""`auto`: attach to a published shared-memory segment when there is one, else load from disk;
`require`: fail without a segment (EMBEDCTL_REQUIRE_SHM=1); `off`: always load from disk."""

SHARE_WAIT_SECONDS = 120.0
"""How long a process waits for its device's weight exporter (one being restarted copies the weights again)."""


def resolve_device(device: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    import torch

    if device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r}: no CUDA device is available here; use --device cpu")
    return dev


def gpus_for(device: torch.device) -> int:
    """The GPUs the processes of a worker or server spread over: every visible one for `cuda`, the one named by
    `cuda:N`, none on the CPU (a worker or server starts one process per GPU by default)."""
    if device.type != "cuda":
        return 0
    if device.index is not None:
        return 1
    import torch

    return torch.cuda.device_count()


def process_device(setting: str, index: int, gpus: int) -> str:
    """The device of process `index` of a worker or server with `gpus` GPUs visible: process i uses GPU i mod n;
    the CPU when there is none or it is asked for; an explicit device (`cuda:1`) as given."""
    setting = (setting or "auto").strip()
    if setting == "cpu" or (setting == "auto" and gpus == 0):
        return "cpu"
    if setting in ("auto", "cuda"):
        if gpus == 0:
            raise EmbedctlError("EMBEDCTL_DEVICE=cuda but no CUDA device is visible to this worker")
        return f"cuda:{index % gpus}"
    return setting


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` computes in fp32 on CPU and in bf16 (fp16 where bf16 is unsupported) on CUDA."""
    import torch

    if dtype in ("", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return getattr(torch, DTYPES[dtype.lower()])
    except KeyError:
        raise ConfigError(f"--dtype {dtype!r} is not one of auto, {', '.join(sorted(DTYPES))}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a torch dtype (fp32, fp16, bf16; torch's name for any other)."""
    name = str(dtype).removeprefix("torch.")
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(name, name)


def default_batch_tokens(device: torch.device) -> int:
    """Token budget that suits the device: small on CPU (caches), large on GPUs."""
    return DEFAULT_BATCH_TOKENS_CUDA if device.type == "cuda" else DEFAULT_BATCH_TOKENS_CPU


def shm_mode(value: str | None = None) -> str:
    """The shared-memory mode (one of SHM_MODES): EMBEDCTL_REQUIRE_SHM=1 makes it `require`; else `value` (the
    `--shm` option), else EMBEDCTL_SHM, else `auto`."""
    if setting("require_shm"):
        return "require"
    return value or setting("shm")


def model_key(path: Path, device: str, dtype: str) -> tuple[str, str, str]:
    """What tells loaded models apart in a process's cache: (transformer folder, torch dtype, device); the key
    `LoadedModel.key` of the model `load(ModelRef(..., path), device, dtype)` returns."""
    dev = resolve_device(device)
    return str(read_profile(path).transformer_path), str(resolve_dtype(dtype, dev)), str(dev)


@dataclass(eq=False)
class LoadedModel:
    """A loaded model and what a process knows about it: one per model and process, shared by its encoders."""

    model: torch.nn.Module
    tokenizer: Any
    profile: ModelProfile
    device: torch.device
    dtype: torch.dtype | None = None
    source: str = "memory"  # where the weights came from: disk, shm:<segment>, exporter:<segment>, or handed in
    lease: Lease | None = None  # the connection to the exporter whose device copy the model maps
    segment: Attached | None = None  # the host segment the weights were attached from
    budget_that_fits: int | None = None  # the token budget an out-of-memory error lowered it to
    eager_seconds: float = 0.0  # forward seconds spent uncompiled in this process (`--compile auto`)
    _compiled: dict[bool, torch.nn.Module] = field(default_factory=dict, repr=False, init=False)

    @property
    def key(self) -> tuple[str, str, str]:
        """See `model_key`."""
        return str(self.profile.transformer_path), str(self.dtype), str(self.device)

    def compiled(self, static: bool = False) -> torch.nn.Module:
        """The compiled model (`policy.compile_model`), made once per model (a worker builds an Encoder per task)."""
        from embedctl.pipeline.policy import compile_model

        module = self._compiled.get(static)
        if module is None:
            module = self._compiled[static] = compile_model(self.model, static)
        return module

    def check(self) -> None:
        """Raise WeightsLost when the exporter of the device weights this model maps has exited."""
        if self.lease is None:
            return
        from embedctl.shm_loader.share import ExporterLost

        try:
            self.lease.check()
        except ExporterLost as exc:
            raise WeightsLost(str(exc)) from None

    def lost(self) -> bool:
        """Whether the weights are gone (their exporter exited); the lease is closed then."""
        try:
            self.check()
        except WeightsLost:
            self.lease.close()
            return True
        return False


def import_model_code(path: Path) -> None:
    """Import the transformers code of the model in `path` without reading weights.

    A prefork worker parent calls this once before forking, so that its pool children only attach the weights
    and load the tokenizer (transformers imports a model's code lazily, which costs seconds).
    """
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401 - imported for its side effect
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.from_pretrained(str(path))
    MODEL_MAPPING[type(config)]


def load_tokenizer(path: Path):
    """The model's tokenizer (fast, from its folder)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - one line for the user
        raise ModelError(f"cannot load the tokenizer of {path}: {type(exc).__name__}: {exc}") from None


def load_transformer(path: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Load the transformer weights from disk (the path taken when no shared-memory segment exists)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # embedctl shows its own progress; a per-load bar would break it up
    try:
        model = AutoModel.from_pretrained(str(path), dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - one line for the user
        raise ModelError(f"cannot load the model in {path}: {type(exc).__name__}: {exc}") from None
    return model.to(device).eval()


def load(ref: ModelRef, device: str | torch.device = "auto", dtype: str = "auto", shm: str = "auto",
         shm_dir: Path | None = None, wait: float = SHARE_WAIT_SECONDS, disk: bool = True) -> LoadedModel | None:
    """Load the model `ref` on `device` in `dtype`, from shared memory when published (see the module's doc).

    Args:
        shm: one of SHM_MODES.
        wait: seconds to wait for this bootstrap's weight exporter (a worker's `worker_process_init` waits 2).
        disk: load from disk when no shared copy exists; False returns None then (attach only).

    Raises:
        WeightsLost: the exporter is gone or being restarted: retry the work later.
        ModelError: a segment or exporter that cannot be used, a required segment missing, a load that failed.
    """
    import torch

    if shm not in SHM_MODES:
        raise ConfigError(f"shm must be one of {', '.join(SHM_MODES)}, got {shm!r}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    profile = read_profile(ref.path)
    folder = profile.transformer_path
    shared = _attach(folder, torch_dtype, dev, shm, shm_dir, wait) if shm != "off" else None
    if shared is None and not disk:
        return None
    tokenizer = load_tokenizer(folder)
    model, source, lease, segment = shared or (load_transformer(folder, torch_dtype, dev), "disk", None, None)
    LOG.info("loaded %s (%s, %s pooling, dim %d) on %s in %s from %s", ref.name, profile.model_type,
             profile.pooling, profile.dim, dev, dtype_name(torch_dtype), source)
    return LoadedModel(model, tokenizer, profile, dev, torch_dtype, source, lease=lease, segment=segment)


def _attach(folder: Path, dtype: torch.dtype, device: torch.device, shm: str, shm_dir: Path | None,
            wait: float) -> tuple[torch.nn.Module, str, Lease | None, Attached | None] | None:
    """(model, source, lease, segment) on shared weights (the exporter's device copy, else the host segment), or
    None (`auto`: none is published)."""
    from embedctl.shm_loader.errors import SegmentError
    from embedctl.shm_loader.model import attach_model, attach_shared_model
    from embedctl.shm_loader.share import ExporterLost, exporter_key

    try:
        key = exporter_key()
        if key is not None:
            model, lease = attach_shared_model(folder, dtype, str(device), key, wait=wait)
            return model, f"exporter:{lease.segment}", lease, None
        attached = attach_model(folder, dtype, shm_dir)
    except ExporterLost as exc:
        raise WeightsLost(str(exc)) from None  # the exporter is being restarted: retry the work later
    except SegmentError as exc:
        raise ModelError(str(exc)) from None
    if attached is not None:
        model, segment = attached
        return model.to(device), f"shm:{segment.name}", None, segment
    if shm == "require":
        from embedctl.shm_loader.segment import segment_name

        raise ModelError(f"no shared-memory segment {segment_name(folder, dtype)} for {folder} in "
                         f"{dtype_name(dtype)}, and shared weights are required; publish one with "
                         f"`embedctl shm publish --model {folder} --dtype {dtype_name(dtype)}`")
    LOG.info("no shared-memory segment for %s in %s: loading from disk", folder, dtype_name(dtype))
    return None
