"""Weight segments in POSIX shared memory: publish once per host, attach zero-copy from any process.

A segment is one file in the shared-memory folder (`/dev/shm`, or `EMBEDCTL_SHM_DIR`), named after the model
folder and the compute dtype: `embedctl-<hash of folder path>-<dtype>`. Layout:

    bytes 0..8    magic b"EMBDSHM\\0"
    bytes 8..16   u64 length of the manifest (JSON, UTF-8)
    bytes 16..24  u64 offset of the tensor data (page aligned)
    bytes 24..    manifest: format version, model folder and fingerprint, dtype, config, tensors
                  (name -> dtype, shape, offset from the data start, bytes)
    data          every tensor, converted to the compute dtype, at 64-byte aligned offsets

The segment is written under a temporary dot-name and renamed when complete, so an attacher never sees a partial
one. It is created mode 0600 and outlives its publisher. Attachers map it read-only with `mmap` directly (not
`multiprocessing.shared_memory`, whose resource tracker would unlink the segment when an attacher exits): a write
into the weights faults instead of corrupting them for every process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import struct
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from embedctl.settings import setting
from embedctl.shm_loader.errors import SegmentError
from embedctl.shm_loader.fingerprint import folder_fingerprint

if TYPE_CHECKING:  # torch is imported by the functions that publish or attach: listing segments needs none
    import torch

LOG = logging.getLogger(__name__)

MAGIC = b"EMBDSHM\0"
FORMAT_VERSION = 1
PREFIX = "embedctl-"
ALIGN = 64
PAGE = 4096
_HEAD = struct.Struct("<8sQQ")

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
"""safetensors dtype codes -> torch dtype names."""


def default_shm_dir() -> Path:
    """The shared-memory folder: `EMBEDCTL_SHM_DIR`, else /dev/shm."""
    return setting("shm_dir")


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def segment_name(folder: Path, dtype: torch.dtype) -> str:
    """Name of the segment of `folder`'s weights in `dtype` (stable across processes and hosts' restarts)."""
    key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:12]
    return f"{PREFIX}{key}-{dtype_str(dtype)}"


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB' (for messages and status tables)."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


@dataclass
class Attached:
    """A segment mapped read-only: its manifest and its tensors (views of the mapping)."""

    path: Path
    manifest: dict
    tensors: dict[str, torch.Tensor] = field(repr=False)
    mapping: mmap.mmap = field(repr=False)
    data_offset: int = 0  # where the tensor data starts in the mapping

    @property
    def name(self) -> str:
        return self.path.name


def _shard_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise SegmentError(f"{folder} has no .safetensors weights; only safetensors checkpoints can be published "
                           "(convert the checkpoint with save_pretrained(safe_serialization=True))")
    return files


def _plan_tensors(folder: Path, dtype: torch.dtype) -> tuple[list[tuple[Path, str, torch.dtype, list[int]]], int]:
    """(file, name, stored dtype, shape) of every tensor, and the data size in the compute dtype."""
    import torch
    from safetensors import safe_open

    entries, size = [], 0
    for path in _shard_files(folder):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = fh.get_slice(name)
                stored_name = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                stored = getattr(torch, stored_name) if stored_name else None
                if stored is None:
                    raise SegmentError(f"tensor {name} of {path} has dtype {piece.get_dtype()}, which cannot be "
                                       "published")
                target = dtype if stored.is_floating_point else stored
                shape = list(piece.get_shape())
                entries.append((path, name, target, shape))
                size = _align(size, ALIGN) + math.prod(shape) * target.itemsize
    return entries, size


def _check_space(shm_dir: Path, need: int, folder: Path, dtype: torch.dtype) -> None:
    try:
        stat = os.statvfs(shm_dir)
    except FileNotFoundError:
        raise SegmentError(f"shared-memory folder {shm_dir} does not exist; mount a tmpfs there or set "
                           "EMBEDCTL_SHM_DIR") from None
    free = stat.f_bavail * stat.f_frsize
    if free < need:
        total = stat.f_blocks * stat.f_frsize
        suggest = math.ceil((total - free + need) * 1.05 / 2**30)
        raise SegmentError(
            f"{shm_dir} has {human_bytes(free)} free but the weights of {folder} in {dtype_str(dtype)} need "
            f"{human_bytes(need)}; enlarge it with `mount -o remount,size={suggest}G {shm_dir}` "
            f"(Docker: --shm-size={suggest}g)")


def publish(folder: Path, dtype: torch.dtype, shm_dir: Path | None = None, replace: bool = False) -> dict:
    """Place the weights of `folder`, converted to `dtype`, into one shared-memory segment; returns its manifest.

    Publishing again is a no-op while the segment matches the folder's fingerprint (unless `replace`); a stale
    segment (model files changed) is replaced. Processes attached to a replaced segment keep their mapping.
    """
    import torch
    from safetensors import safe_open

    folder = Path(folder).resolve()
    shm_dir = Path(shm_dir or default_shm_dir())
    name = segment_name(folder, dtype)
    final = shm_dir / name
    fingerprint = folder_fingerprint(folder)
    if final.exists() and not replace:
        try:
            existing = read_manifest(final)
            if existing.get("fingerprint") == fingerprint and existing.get("format") == FORMAT_VERSION:
                return {**existing, "published": False}
        except SegmentError:
            pass  # unreadable: replace it below
    t0 = time.perf_counter()
    entries, data_size = _plan_tensors(folder, dtype)
    tensors, offset = {}, 0
    for _path, tname, target, shape in entries:
        offset = _align(offset, ALIGN)
        nbytes = math.prod(shape) * target.itemsize
        tensors[tname] = {"dtype": dtype_str(target), "shape": shape, "offset": offset, "nbytes": nbytes}
        offset += nbytes
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    manifest = {
        "format": FORMAT_VERSION, "name": name, "folder": str(folder), "fingerprint": fingerprint,
        "dtype": dtype_str(dtype), "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "publisher_pid": os.getpid(), "config": config, "tensors": tensors,
    }
    blob = json.dumps(manifest).encode()
    data_offset = _align(_HEAD.size + len(blob), PAGE)
    total = data_offset + max(data_size, 1)
    _check_space(shm_dir, total, folder, dtype)
    tmp = shm_dir / f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, total)  # reserve now: a full tmpfs would otherwise SIGBUS a write below
        except OSError as exc:
            raise SegmentError(f"cannot reserve {human_bytes(total)} in {shm_dir} ({exc.strerror}); free shared memory "
                               f"or enlarge {shm_dir}") from None
        with mmap.mmap(fd, total) as mm:
            mm[:_HEAD.size] = _HEAD.pack(MAGIC, len(blob), data_offset)
            mm[_HEAD.size:_HEAD.size + len(blob)] = blob
            by_file: dict[Path, list[str]] = {}
            for path, tname, _target, _shape in entries:
                by_file.setdefault(path, []).append(tname)
            for path, names in by_file.items():
                with safe_open(str(path), framework="pt") as fh:
                    for tname in names:
                        meta = tensors[tname]
                        if meta["nbytes"] == 0:
                            continue
                        src = fh.get_tensor(tname).to(getattr(torch, meta["dtype"])).reshape(-1)
                        dst = torch.frombuffer(mm, dtype=src.dtype, count=src.numel(),
                                               offset=data_offset + meta["offset"])
                        dst.copy_(src)
                        del dst, src
            mm.flush()
        os.rename(tmp, final)  # complete: now visible to attachers
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    LOG.info("published %s (%s) in %.1fs", final, human_bytes(total), time.perf_counter() - t0)
    return {**manifest, "published": True, "bytes": total, "seconds": round(time.perf_counter() - t0, 3)}


def _parse_header(buf, path: Path) -> tuple[dict, int]:
    if len(buf) < _HEAD.size:
        raise SegmentError(f"{path} is not an embedctl weight segment (too short); release it")
    magic, length, data_offset = _HEAD.unpack(bytes(buf[:_HEAD.size]))
    if magic != MAGIC:
        raise SegmentError(f"{path} is not an embedctl weight segment; release it (embedctl shm release --all)")
    try:
        manifest = json.loads(bytes(buf[_HEAD.size:_HEAD.size + length]))
    except ValueError:
        raise SegmentError(f"{path} has a damaged manifest; release it and publish again") from None
    return manifest, data_offset


def read_manifest(path: Path) -> dict:
    """The manifest of a segment file, without mapping its data."""
    with open(path, "rb") as fh:
        head = fh.read(_HEAD.size)
        if len(head) < _HEAD.size:
            raise SegmentError(f"{path} is not an embedctl weight segment (too short); release it")
        _magic, length, _off = _HEAD.unpack(head)
        manifest, data_offset = _parse_header(head + fh.read(min(length, 1 << 30)), path)
    size = os.stat(path).st_size
    return {**manifest, "bytes": size, "data_offset": data_offset}


def attach(folder: Path, dtype: torch.dtype, shm_dir: Path | None = None) -> Attached | None:
    """Map the segment of `folder` in `dtype` read-only, or return None when none is published.

    Raises:
        SegmentError: the segment is of another format, another dtype, or older than the model files.
    """
    import torch

    folder = Path(folder).resolve()
    shm_dir = Path(shm_dir or default_shm_dir())
    path = shm_dir / segment_name(folder, dtype)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        mapping = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    manifest, data_offset = _parse_header(mapping, path)
    if manifest.get("format") != FORMAT_VERSION:
        raise SegmentError(f"segment {path.name} has format {manifest.get('format')}, this embedctl reads "
                           f"{FORMAT_VERSION}; run `embedctl shm release {path.name}` and publish again")
    if manifest.get("dtype") != dtype_str(dtype):
        raise SegmentError(f"segment {path.name} holds {manifest.get('dtype')} weights, {dtype_str(dtype)} were "
                           "asked for; publish with the matching --dtype")
    fingerprint = folder_fingerprint(folder)
    if manifest.get("fingerprint") != fingerprint or manifest.get("folder") != str(folder):
        raise SegmentError(f"segment {path.name} holds the weights of {folder} as published at "
                           f"{manifest.get('created')}, but the model files changed since; publish again "
                           f"(`embedctl shm publish`) or release it (`embedctl shm release {path.name}`)")
    tensors = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")  # read-only on purpose
        for tname, meta in manifest["tensors"].items():
            tdtype = getattr(torch, meta["dtype"])
            count = math.prod(meta["shape"])
            if count == 0:
                tensors[tname] = torch.empty(meta["shape"], dtype=tdtype)
                continue
            flat = torch.frombuffer(mapping, dtype=tdtype, count=count, offset=data_offset + meta["offset"])
            tensors[tname] = flat.view(meta["shape"])
    return Attached(path=path, manifest=manifest, tensors=tensors, mapping=mapping, data_offset=data_offset)


def mapping_pids(path: Path) -> list[int]:
    """PIDs of the processes that map `path` (from /proc/*/maps; processes of other users may be hidden)."""
    target = str(path)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            with open(entry / "maps") as fh:
                if any(line.rstrip().endswith(target) or f"{target} (deleted)" in line for line in fh):
                    pids.append(int(entry.name))
        except OSError:
            continue
    return sorted(pids)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_segments(shm_dir: Path | None = None) -> list[dict]:
    """Every embedctl segment in the shared-memory folder: name, model folder, dtype, size, created, mappers.

    Unfinished publishes (temporary files) are listed with state `incomplete` (or `abandoned` when their
    publisher is gone).
    """
    shm_dir = Path(shm_dir or default_shm_dir())
    found = []
    if not shm_dir.is_dir():
        return found
    for path in sorted(shm_dir.iterdir()):
        if not path.is_file():  # a folder (a test's private shm dir, say) is no segment
            continue
        if path.name.startswith(PREFIX):
            try:
                manifest = read_manifest(path)
                state = "ready"
                stale = folder_fingerprint(Path(manifest["folder"])) != manifest["fingerprint"] \
                    if Path(manifest["folder"]).is_dir() else True
            except (SegmentError, OSError, KeyError):
                manifest, state, stale = {"bytes": path.stat().st_size}, "unreadable", True
            pids = mapping_pids(path)
            found.append({"name": path.name, "state": "stale" if state == "ready" and stale else state,
                          "folder": manifest.get("folder"), "dtype": manifest.get("dtype"),
                          "bytes": manifest.get("bytes"), "created": manifest.get("created"),
                          "processes": len(pids), "pids": pids, "path": str(path)})
        elif path.name.startswith(f".{PREFIX}") and path.name.endswith(".tmp"):
            pid = int(path.name.rsplit(".", 2)[-2]) if path.name.rsplit(".", 2)[-2].isdigit() else -1
            found.append({"name": path.name, "state": "incomplete" if _pid_alive(pid) else "abandoned",
                          "folder": None, "dtype": None, "bytes": path.stat().st_size, "created": None,
                          "processes": 0, "pids": [], "path": str(path)})
    return found


def release(names: list[str] | None = None, force: bool = False, shm_dir: Path | None = None) -> list[str]:
    """Unlink segments (all embedctl segments when `names` is None); refuse mapped ones unless `force`.

    Processes that map a released segment keep their mapping; the memory is freed when the last one exits.
    """
    segments = {s["name"]: s for s in list_segments(shm_dir)}
    if names is None:
        chosen = [s for s in segments.values() if s["state"] != "incomplete"]
    else:
        unknown = [n for n in names if n not in segments]
        if unknown:
            listed = ", ".join(segments) or "none"
            raise SegmentError(f"no segment named {unknown[0]!r} (segments: {listed}); see `embedctl shm status`")
        chosen = [segments[n] for n in names]
    busy = [s for s in chosen if s["processes"]]
    if busy and not force:
        s = busy[0]
        raise SegmentError(f"segment {s['name']} is mapped by {s['processes']} processes (pids "
                           f"{', '.join(map(str, s['pids'][:5]))}); stop them first or use --force")
    removed = []
    for s in chosen:
        try:
            Path(s["path"]).unlink()
            removed.append(s["name"])
        except FileNotFoundError:
            continue
    return removed
