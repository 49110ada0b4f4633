"""The importer's side of device sharing: find the exporter of a segment on a device, check it, map its buffer.

Every exporter listens on a Unix socket named after the segment and the device, in a folder of this user's
(`$XDG_RUNTIME_DIR/embedctl`, else `/tmp/embedctl-<uid>`, mode 0700; the socket itself is 0600). Both ends check
the other's credentials (SO_PEERCRED): a handle goes only to a process of the same user, and a process maps only
what a process of its own user exports.

The connection stays open while the weights are in use: when the exporter dies, the importer's end reads EOF,
and `Lease.check()` (run before every batch and after the last) raises `ExporterLost`, so the work fails cleanly
and is retried on a restarted exporter; an importer never falls back to reading the checkpoint from disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from embedctl.settings import setting
from embedctl.shm_loader.errors import SegmentError

SHARE_MODES = ("auto", "on", "off")
"""EMBEDCTL_DEVICE_SHARE. For `embedctl worker` and `embedctl serve` (the bootstraps): `auto` starts one exporter
per GPU (none on CPU, where the host segment is shared already), `on` starts them on CPU too (a memfd copy: what
the tests run), `off` none. The bootstrap gives its workers `on` and its key (EMBEDCTL_EXPORTER_KEY): they map
their device's copy from its exporters, waiting for one being restarted, and never fall back to a copy of their
own. Any other process (a one-shot `embedctl index`, a plain `celery worker`) copies the host segment itself: an
exporter serves only the processes of the bootstrap that runs it, which restarts it and retries their work."""

KEY_ENV = "EMBEDCTL_EXPORTER_KEY"
"""The key of the bootstrap whose exporters a process maps (its pid): two bootstraps on one host never share or
replace each other's sockets."""

_LENGTH = struct.Struct("<I")
_CRED = struct.Struct("3i")  # pid, uid, gid


class ExporterLost(SegmentError):
    """The exporter of the weights a process computes with is gone: its work must be retried."""


class ExporterUnavailable(ExporterLost):
    """No exporter answered in time (being restarted, or failing to start): the work is retried later."""


def share_mode(value: str | None = None) -> str:
    mode = (value if value is not None else setting("device_share")).strip().lower() or "auto"
    if mode not in SHARE_MODES:
        raise SegmentError(f"EMBEDCTL_DEVICE_SHARE must be one of {', '.join(SHARE_MODES)}, got {mode!r}")
    return mode


def exports(mode: str, device: str) -> bool:
    """Whether a bootstrap starts an exporter for `device` under share mode `mode`."""
    return mode == "on" or (mode == "auto" and device.startswith("cuda"))


def exporter_key() -> str | None:
    """The key of the bootstrap whose exporters this process maps (None: it maps none)."""
    if share_mode() != "on":
        return None
    key = setting("exporter_key")
    if not key:
        raise SegmentError(f"EMBEDCTL_DEVICE_SHARE=on but {KEY_ENV} is not set: the weight exporters are run by "
                           "`embedctl worker` and `embedctl serve`, which set both for their workers")
    return key


def socket_dir() -> Path:
    """This user's folder of exporter sockets (created 0700; refused if another user owns it or can enter it)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "embedctl" if base else Path(f"/tmp/embedctl-{os.getuid()}")
    for folder in reversed([p for p in (path, *path.parents) if not p.exists()]):
        folder.mkdir(mode=0o700, exist_ok=True)  # parents too: mkdir(parents=True) makes them 0777 less the umask
    stat = path.stat()
    if stat.st_uid != os.getuid() or stat.st_mode & 0o077:
        raise SegmentError(f"{path} must belong to this user with mode 0700 (it holds weight-sharing sockets); "
                           f"remove it or run `chmod 700 {path}`")
    return path


def socket_path(segment: str, device: str, key: str) -> Path:
    """The socket of the exporter of `segment` (in this shared-memory folder) on `device`, run by bootstrap `key`."""
    from embedctl.shm_loader.segment import default_shm_dir

    key = f"{segment}\0{default_shm_dir().resolve()}\0{device}\0{key}"
    path = socket_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.sock"  # short: AF_UNIX takes 107 bytes
    if len(str(path).encode()) > 107:
        raise SegmentError(f"the socket folder {path.parent} is too deep for a Unix socket; set XDG_RUNTIME_DIR to a "
                           "shorter folder")
    return path


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


def send_message(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    blob = json.dumps(message).encode()
    data = _LENGTH.pack(len(blob)) + blob
    sent = socket.send_fds(sock, [data], list(fds)) if fds else 0
    sock.sendall(data[sent:])  # the descriptors went with the first bytes


def receive_message(sock: socket.socket, max_fds: int = 4) -> tuple[dict, list[int]]:
    """One length-prefixed JSON message and the descriptors that came with it."""
    data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, max_fds)
    if len(data) < _LENGTH.size:
        raise SegmentError("the weight exporter closed the connection without an answer")
    (length,) = _LENGTH.unpack(data[:_LENGTH.size])
    data = data[_LENGTH.size:]
    while len(data) < length:
        more = sock.recv(length - len(data))
        if not more:
            raise SegmentError("the weight exporter closed the connection in the middle of its answer")
        data += more
    return json.loads(data), fds


@dataclass
class Lease:
    """An importer's open connection to the exporter whose buffer it maps."""

    sock: socket.socket
    device: str
    exporter_pid: int
    segment: str

    def check(self) -> None:
        """Raise ExporterLost when the exporter is gone (its end of the connection closed or reset)."""
        try:
            alive = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            alive = True  # nothing to read: the exporter is there
        except OSError:
            alive = False
        if not alive:
            raise ExporterLost(f"the weight exporter of {self.segment} on {self.device} (pid {self.exporter_pid}) "
                               "exited; this work fails and is retried once the worker has restarted it")

    def close(self) -> None:
        self.sock.close()


def connect(segment: str, device: str, key: str, wait: float = 0.0) -> tuple[socket.socket, dict, list[int]]:
    """Connect to the exporter of `segment` on `device` run by bootstrap `key` (waiting up to `wait` s for it to
    come up) and receive its handle; the exporter must run as this user."""
    path = socket_path(segment, device, key)
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            break
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() >= deadline:
                raise ExporterUnavailable(f"no weight exporter of {segment} on {device} answered in {wait:.0f} s "
                                          f"({path}); its worker restarts it (see the worker's log), or set "
                                          "EMBEDCTL_DEVICE_SHARE=off") from None
            time.sleep(0.2)
    fds: list[int] = []
    try:
        _pid, uid, _gid = peer_credentials(sock)
        if uid != os.getuid():
            raise SegmentError(f"the weight exporter at {path} runs as uid {uid}, not as this user "
                               f"({os.getuid()}); refusing its handle")
        sock.settimeout(60)
        message, fds = receive_message(sock)
        sock.settimeout(None)
        if "error" in message:
            raise SegmentError(message["error"])
    except (OSError, ValueError, SegmentError) as exc:
        sock.close()
        close_fds(fds)
        if isinstance(exc, SegmentError):
            raise
        raise ExporterUnavailable(f"the weight exporter of {segment} on {device} did not answer properly "
                                  f"({type(exc).__name__}: {exc}); it is restarted by its worker") from None
    return sock, message, fds


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
