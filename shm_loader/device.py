"""One device copy of a weight segment, and the handle other processes map it by.

The exporter (`shm_loader/exporter.py`) copies the data region of a host segment into one device buffer and
hands every process on that device a handle to it; their tensors are views of the exporter's buffer, at the
offsets of the segment's manifest. So K processes on one GPU hold one copy of the weights, not K.

Two transports, one protocol:
- `cuda`: a CUDA IPC memory handle of the buffer (`UntypedStorage._share_cuda_`, what `torch.multiprocessing`
  sends), opened with `_new_shared_cuda`; only processes of the same user receive it (see exporter.py).
- `cpu`: the buffer lives in a memfd whose descriptor is passed over the Unix socket (SCM_RIGHTS) and mapped
  read-only. It runs every step of the CUDA path but the two device calls, so the CPU tests exercise the
  protocol, the checks and the recovery; on CPU hosts the host segment is shared already, so `auto` uses it only
  on CUDA.

A checksum of the buffer's bytes (computed on the device, in tiles) is taken by the exporter and recomputed by
every importer over what it mapped: a wrong or stale handle is refused instead of embedding with wrong weights.
"""

from __future__ import annotations

import base64
import math
import mmap
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from embedctl.shm_loader.errors import SegmentError

if TYPE_CHECKING:
    import torch

    from embedctl.shm_loader.segment import Attached

ALIGN = 64
TILE_BYTES = 64 << 20
"""Bytes summed per step of the checksum (one device reduction each)."""


@dataclass
class DeviceCopy:
    """The exporter's copy of a segment's tensors on one device: one buffer, tensors as views of it."""

    device: str
    buffer: torch.Tensor  # uint8, the segment's data region
    checksum: str
    keep: list = field(default_factory=list, repr=False)  # the memfd mapping and descriptor (cpu transport)


def _host_data(attached: Attached) -> tuple[torch.Tensor, int]:
    """The data region of a mapped segment as one uint8 tensor (no copy), and its size rounded up to ALIGN."""
    import torch

    offset = attached.data_offset
    size = len(attached.mapping) - offset
    return torch.frombuffer(attached.mapping, dtype=torch.uint8, count=size, offset=offset), \
        (size + ALIGN - 1) // ALIGN * ALIGN


def checksum(buffer: torch.Tensor) -> str:
    """A checksum of a uint8 buffer (length a multiple of 4), computed where the buffer lives: the position-weighted
    sum of the int32 sums of its 64 MiB tiles."""
    import torch

    words = buffer.view(torch.int32)
    per_tile = TILE_BYTES // 4
    total = 0
    for i in range(math.ceil(words.numel() / per_tile)):
        tile = words[i * per_tile:(i + 1) * per_tile]
        total += (i + 1) * int(tile.sum(dtype=torch.int64))
    return f"{total & (2**64 - 1):016x}-{buffer.numel()}"


def make_copy(attached: Attached, device: str) -> DeviceCopy:
    """Copy a mapped segment's data region to `device` (`cuda:N`, or `cpu` for the memfd transport)."""
    import torch

    host, size = _host_data(attached)
    keep = []
    if device.startswith("cuda"):
        buffer = torch.zeros(size, dtype=torch.uint8, device=device)
        buffer[:host.numel()].copy_(host)
        torch.cuda.synchronize(device)
    elif device == "cpu":
        fd = os.memfd_create("embedctl-weights", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, size)
        buffer = torch.frombuffer(mapping, dtype=torch.uint8, count=size)
        buffer[:host.numel()].copy_(host)
        keep = [mapping, fd]
    else:
        raise SegmentError(f"cannot export weights to device {device!r}; use cuda:N (or cpu)")
    return DeviceCopy(device=device, buffer=buffer, checksum=checksum(buffer), keep=keep)


def export_handle(copy: DeviceCopy) -> tuple[dict, list[int]]:
    """What an importer needs to map `copy`: a JSON-able handle and the file descriptors to pass with it."""
    if copy.device == "cpu":
        return {"transport": "cpu", "bytes": copy.buffer.numel()}, [copy.keep[1]]
    (device, handle, size, offset, ref_handle, ref_offset, event_handle,
     event_sync) = copy.buffer.untyped_storage()._share_cuda_()
    b64 = lambda raw: base64.b64encode(raw).decode() if raw else None  # noqa: E731 - a local spelling
    return {"transport": "cuda", "bytes": copy.buffer.numel(), "device": device, "handle": b64(handle),
            "size": size, "offset": offset, "ref_handle": b64(ref_handle), "ref_offset": ref_offset,
            "event_handle": b64(event_handle), "event_sync": event_sync}, []


def import_handle(handle: dict, fds: list[int], device: str) -> tuple[torch.Tensor, object]:
    """Map an exporter's buffer: the uint8 tensor and what must stay alive with it (the caller closes `fds`)."""
    import torch

    if handle.get("transport") == "cpu":
        if device != "cpu" or len(fds) != 1:
            raise SegmentError(f"the exporter sent a cpu buffer for device {device}; restart the worker")
        mapping = mmap.mmap(fds[0], handle["bytes"], prot=mmap.PROT_READ)  # its own reference: the fd may close
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")  # read-only on purpose
            return torch.frombuffer(mapping, dtype=torch.uint8, count=handle["bytes"]), mapping
    if handle.get("transport") != "cuda" or not device.startswith("cuda"):
        raise SegmentError(f"the exporter's handle ({handle.get('transport')}) does not fit device {device}")
    raw = lambda text: base64.b64decode(text) if text else b""  # noqa: E731
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(handle["device"], raw(handle["handle"]), handle["size"],
                                                    handle["offset"], raw(handle["ref_handle"]),
                                                    handle["ref_offset"], raw(handle["event_handle"]),
                                                    handle["event_sync"])
    buffer = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
    return buffer[:handle["bytes"]], storage


def tensor_views(buffer: torch.Tensor, manifest: dict) -> dict[str, torch.Tensor]:
    """The segment's tensors as views of a device buffer holding its data region."""
    import torch

    tensors = {}
    for name, meta in manifest["tensors"].items():
        dtype = getattr(torch, meta["dtype"])
        count = math.prod(meta["shape"])
        start = meta["offset"]
        piece = buffer[start:start + count * dtype.itemsize]
        tensors[name] = piece.view(dtype).view(meta["shape"]) if count else \
            torch.empty(meta["shape"], dtype=dtype, device=buffer.device)
    return tensors
