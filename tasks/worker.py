"""Worker process set-up: the parent imports code only; each pool child sets its threads and device and attaches
the shared-memory weights; models are cached once per process.

The parent never runs a torch op or initialises CUDA before forking: a libgomp thread pool or a CUDA context
inherited through fork deadlocks or breaks the children. The parent only imports the model's code, so that a
child's `worker_process_init` (which Celery kills after 4 s) only maps the segment and loads the tokenizer; then
`guard_cuda` makes every CUDA entry point of torch raise in the parent (the children lift it).

On a GPU host started by `embedctl worker`, the children map the one device copy their GPU's exporter holds
(shm_loader/share.py); when it exits, the task in flight fails with WeightsLost and is re-queued, and the child maps
the restarted exporter's copy on its next task.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from celery.signals import worker_init, worker_process_init, worker_ready

from embedctl.pipeline.errors import EmbedctlError

LOG = logging.getLogger(__name__)

_WORKER: dict = {"concurrency": None, "device": None, "cuda_guard": None}
_MODELS: dict[tuple, tuple] = {}  # (folder, dtype, device) -> (model, tokenizer, profile, source)
_CACHES: dict[str, object] = {}  # plan id -> EmbeddingCache over the vectors it can reuse


def child_threads(cpus: int, concurrency: int | None, override: str | None = None) -> int:
    """Intra-op threads of one pool child: EMBEDCTL_THREADS, else cores / concurrency (at least 1)."""
    if override:
        try:
            value = int(override)
        except ValueError:
            raise EmbedctlError(f"EMBEDCTL_THREADS must be a positive integer, got {override!r}") from None
        if value <= 0:
            raise EmbedctlError(f"EMBEDCTL_THREADS must be a positive integer, got {override!r}")
        return value
    return max(1, cpus // max(1, concurrency or 1))


def child_device(setting: str, index: int, gpus: int) -> str:
    """The device of pool child `index`: child i uses GPU i mod n; CPU when there is none or it is asked for."""
    setting = (setting or "auto").strip()
    if setting == "cpu" or (setting == "auto" and gpus == 0):
        return "cpu"
    if setting in ("auto", "cuda"):
        if gpus == 0:
            raise EmbedctlError("EMBEDCTL_DEVICE=cuda but no CUDA device is visible to this worker")
        return f"cuda:{index % gpus}"
    return setting  # an explicit device, e.g. cuda:1


def shm_mode(environ=os.environ) -> str:
    if environ.get("EMBEDCTL_REQUIRE_SHM", "").strip().lower() in {"1", "true", "yes"}:
        return "require"
    return environ.get("EMBEDCTL_SHM") or "auto"


@worker_init.connect
def _parent_init(sender=None, **_kw) -> None:
    """In the worker parent, before forking: remember the concurrency, import the model's code (no torch op)."""
    _WORKER["concurrency"] = getattr(sender, "concurrency", None)
    model = os.environ.get("EMBEDCTL_MODEL")
    if model:
        from embedctl.pipeline.encoder import import_model_code
        from embedctl.pipeline.models import read_profile, resolve_model

        import_model_code(read_profile(resolve_model(model).path).transformer_path)
    if _forks_children(sender):
        guard_cuda()


def _forks_children(sender) -> bool:
    """Whether the worker's pool forks its children (prefork; not solo or threads, whose tasks run in this
    process and need CUDA here)."""
    pool = getattr(sender, "pool_cls", None)
    return "prefork" in f"{getattr(pool, '__module__', '')}.{getattr(pool, '__name__', pool)}"


_CUDA_ENTRY_POINTS = ("_lazy_init", "init", "is_available", "device_count", "current_device", "set_device",
                      "synchronize", "mem_get_info")


def guard_cuda() -> None:
    """Make torch's CUDA entry points raise in this process (the Celery parent, which forks the pool children:
    a CUDA context inherited through fork is unusable). No-op when torch is not imported."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or _WORKER["cuda_guard"] is not None:
        return
    if torch.cuda.is_initialized():
        raise EmbedctlError("CUDA was initialised in the Celery worker parent before it forked its pool children, "
                            "which cannot use it then; find the CUDA call at import time and move it into a task")

    def refuse(*_args, **_kwargs):
        raise EmbedctlError("the Celery worker parent touched CUDA; it must not (it forks the pool children): "
                            "move the CUDA call into a task or `worker_process_init`")

    _WORKER["cuda_guard"] = {name: getattr(torch.cuda, name) for name in _CUDA_ENTRY_POINTS}
    for name in _CUDA_ENTRY_POINTS:
        setattr(torch.cuda, name, refuse)


@worker_ready.connect
def _parent_ready(**_kw) -> None:
    """Say that the guard is on, once Celery's logging is set up (it is not yet at `worker_init`)."""
    if _WORKER["cuda_guard"] is not None:
        LOG.info("CUDA is off limits in this worker parent (pid %d): its pool children use it", os.getpid())


def lift_cuda_guard() -> None:
    """Give torch's CUDA entry points back (in a pool child, first thing)."""
    import torch

    for name, function in (_WORKER["cuda_guard"] or {}).items():
        setattr(torch.cuda, name, function)
    _WORKER["cuda_guard"] = None


@worker_process_init.connect
def _child_init(**_kw) -> None:
    """In each pool child: threads, device, and the shared weights of EMBEDCTL_MODEL (attach only: < 4 s)."""
    import torch
    from billiard.process import current_process

    lift_cuda_guard()
    index = getattr(current_process(), "index", 0) or 0
    torch.set_num_threads(child_threads(os.cpu_count() or 1, _WORKER["concurrency"], os.environ.get("EMBEDCTL_THREADS")))
    setting = os.environ.get("EMBEDCTL_DEVICE", "auto")
    gpus = torch.cuda.device_count() if setting != "cpu" else 0
    _WORKER["device"] = child_device(setting, index, gpus)
    model = os.environ.get("EMBEDCTL_MODEL")
    if not model:
        return
    from embedctl.pipeline.encoder import resolve_dtype
    from embedctl.pipeline.models import read_profile, resolve_model

    profile = read_profile(resolve_model(model).path)
    dtype = resolve_dtype(os.environ.get("EMBEDCTL_DTYPE", "auto"), torch.device(_WORKER["device"]))
    mode = shm_mode()
    if mode == "off":
        return
    from embedctl.shm_loader.errors import SegmentError
    from embedctl.shm_loader.model import attach_model, attach_shared_model
    from embedctl.shm_loader.share import exporter_key

    folder, device = profile.transformer_path, _WORKER["device"]
    try:
        key = exporter_key()
    except SegmentError as exc:
        raise EmbedctlError(str(exc)) from None
    if key is not None:
        try:  # the bootstrap started the exporters before this worker: they answer at once
            shared = attach_shared_model(folder, dtype, device, key, wait=2.0)
        except SegmentError as exc:
            LOG.warning("pool child %d: %s; its first task maps the weights", index, exc)
            return
        _cache_model(profile, dtype, device, shared, f"exporter:{shared._embedctl_lease.segment}")
        LOG.info("pool child %d mapped %s on %s from its exporter (pid %d)", index, model, device,
                 shared._embedctl_lease.exporter_pid)
        return

    try:
        attached = attach_model(profile.transformer_path, dtype)
    except SegmentError as exc:
        raise EmbedctlError(str(exc)) from None
    if attached is None:
        if mode == "require":
            raise EmbedctlError(f"no shared-memory segment for {model} in {dtype} and EMBEDCTL_REQUIRE_SHM=1; run "
                                f"`embedctl shm publish --model {model}` on this host first")
        LOG.warning("no shared-memory segment for %s: this pool child loads it from disk on its first task "
                    "(publish it once per host with `embedctl shm publish --model %s`)", model, model)
        return
    _cache_model(profile, dtype, _WORKER["device"], attached.to(_WORKER["device"]),
                 f"shm:{attached._embedctl_segment.name}")
    LOG.info("pool child %d attached %s on %s with %d threads", index, model, _WORKER["device"],
             torch.get_num_threads())


def _cache_model(profile, dtype, device: str, model, source: str) -> tuple:
    from embedctl.pipeline.encoder import load_tokenizer

    entry = (model, load_tokenizer(profile.transformer_path), profile, source)
    _MODELS[(str(profile.transformer_path), str(dtype), device)] = entry
    return entry


def forget_lost_models() -> None:
    """Drop the cached models whose weights exporter is gone (the next task maps the restarted one's copy)."""
    from embedctl.shm_loader.share import ExporterLost

    for key, (model, *_rest) in list(_MODELS.items()):
        lease = getattr(model, "_embedctl_lease", None)
        if lease is None:
            continue
        try:
            lease.check()
        except ExporterLost:
            lease.close()
            del _MODELS[key]


def worker_encoder(plan):
    """The encoder for `plan` in this process: the cached (attached) model, or one loaded now and cached."""
    import torch

    from embedctl.pipeline.encoder import Encoder, load_model, resolve_device, resolve_dtype
    from embedctl.pipeline.models import read_profile

    forget_lost_models()  # an idle child's model whose exporter died meanwhile
    device = _WORKER["device"] or str(resolve_device(plan.device))
    dev = torch.device(device)
    profile = read_profile(Path(plan.model_path))
    dtype = resolve_dtype(plan.dtype, dev)
    key = (str(profile.transformer_path), str(dtype), device)
    entry = _MODELS.get(key)
    if entry is None:
        model, source = load_model(profile.transformer_path, dtype, dev, shm=shm_mode())
        entry = _cache_model(profile, dtype, device, model, source)
    model, tokenizer, profile, source = entry
    encoder = Encoder(model, tokenizer, profile, dev, max_length=plan.max_length, batch_tokens=plan.batch_tokens,
                      compile=plan.compile)
    encoder.source = source
    return encoder


def worker_cache(plan):
    """The embedding cache of `plan` in this process (built once per plan: it reads the stored text hashes)."""
    from embedctl.pipeline.cache import EmbeddingCache

    if plan.plan_id not in _CACHES:
        _CACHES.clear()  # one job at a time per child is the common case: keep memory flat
        _CACHES[plan.plan_id] = EmbeddingCache(plan.cache_sources())
    return _CACHES[plan.plan_id]
