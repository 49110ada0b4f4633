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
from embedctl.settings import setting

LOG = logging.getLogger(__name__)

_WORKER: dict = {"concurrency": None, "device": None, "cuda_guard": None}
_MODELS: dict[tuple, object] = {}  # LoadedModel.key (folder, dtype, device) -> LoadedModel
_CACHES: dict[str, object] = {}  # plan id -> EmbeddingCache over the vectors it can reuse


def child_threads(cpus: int, concurrency: int | None, override: int | None = None) -> int:
    """Intra-op threads of one pool child: EMBEDCTL_THREADS, else cores / concurrency (at least 1)."""
    return override or max(1, cpus // max(1, concurrency or 1))


@worker_init.connect
def _parent_init(sender=None, **_kw) -> None:
    """In the worker parent, before forking: remember the concurrency, import the model's code (no torch op)."""
    _WORKER["concurrency"] = getattr(sender, "concurrency", None)
    model = setting("model")
    if model:
        from embedctl.pipeline.loader import import_model_code
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

    from embedctl.pipeline import s3
    from embedctl.pipeline.loader import load, process_device, shm_mode

    lift_cuda_guard()
    s3.ride_out_outages()  # the jobs it gets were planned against a store that answered: wait for it, do not fail
    index = getattr(current_process(), "index", 0) or 0
    torch.set_num_threads(child_threads(os.cpu_count() or 1, _WORKER["concurrency"], setting("threads")))
    chosen = setting("device")
    gpus = torch.cuda.device_count() if chosen != "cpu" else 0
    device = _WORKER["device"] = process_device(chosen, index, gpus)
    model = setting("model")
    mode = shm_mode()
    if not model or mode == "off":
        return
    from embedctl.pipeline.errors import ModelError
    from embedctl.pipeline.models import resolve_model
    from embedctl.shm_loader.share import share_mode

    try:  # the bootstrap started the exporters before this worker: they answer at once
        loaded = load(resolve_model(model), device, setting("dtype"), shm=mode, wait=2.0,
                      disk=False)
    except ModelError as exc:
        if share_mode() != "on":
            raise  # the host segment: broken, or required and missing
        LOG.warning("pool child %d: %s; its first task maps the weights", index, exc)  # its task fails if it must
        return
    if loaded is None:
        LOG.warning("no shared-memory segment for %s: this pool child loads it from disk on its first task "
                    "(publish it once per host with `embedctl shm publish --model %s`)", model, model)
        return
    _MODELS[loaded.key] = loaded
    if loaded.lease is not None:
        LOG.info("pool child %d mapped %s on %s from its exporter (pid %d)", index, model, device,
                 loaded.lease.exporter_pid)
    else:
        LOG.info("pool child %d attached %s on %s with %d threads", index, model, device, torch.get_num_threads())


def forget_lost_models() -> None:
    """Drop the cached models whose weights exporter is gone (the next task maps the restarted one's copy)."""
    for key, loaded in list(_MODELS.items()):
        if loaded.lost():
            del _MODELS[key]


def worker_encoder(plan):
    """The encoder for `plan` in this process: over the cached (attached) model, or one loaded now and cached."""
    from embedctl.pipeline.encoder import Encoder
    from embedctl.pipeline.loader import load, model_key, shm_mode
    from embedctl.pipeline.models import ModelRef

    forget_lost_models()  # an idle child's model whose exporter died meanwhile
    device = _WORKER["device"] or plan.device
    key = model_key(Path(plan.model_path), device, plan.dtype)
    loaded = _MODELS.get(key)
    if loaded is None:
        loaded = _MODELS[key] = load(ModelRef(plan.model, Path(plan.model_path)), device, plan.dtype,
                                     shm=shm_mode())
    return Encoder(loaded, max_length=plan.max_length, batch_tokens=plan.batch_tokens, compile=plan.compile)


def worker_cache(plan, fresh: bool = False):
    """The embedding cache of `plan` in this process (built once per plan: it reads the stored text hashes, and
    remembers which stored files it checked; `fresh`: built anew, checking them again)."""
    from embedctl.pipeline.cache import EmbeddingCache

    if fresh or plan.plan_id not in _CACHES:
        _CACHES.clear()  # one job at a time per child is the common case: keep memory flat
        _CACHES[plan.plan_id] = EmbeddingCache(plan.cache_sources())
    return _CACHES[plan.plan_id]
