"""The weight exporter: one process per device that holds a segment's weights there and hands them out.

    python -P -m embedctl.shm_loader.exporter --folder MODEL_DIR --dtype bfloat16 --device cuda:0 --key KEY
                                              [--parent PID]

It maps the host segment (published beforehand: `embedctl shm publish`, or `embedctl worker` / `embedctl serve`,
which start and watch the exporters), copies its data region to the device once, and answers every process that
connects to its socket (see share.py) with the handle of that copy, the segment's manifest, fingerprint and
checksum. It keeps each connection open (an importer learns of its death by EOF) and exits on SIGTERM, SIGINT or
when `--parent` exits. The socket appears (renamed into place) only once the copy is complete.
"""

from __future__ import annotations

import argparse
import logging
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

from embedctl.shm_loader.device import export_handle, make_copy
from embedctl.shm_loader.errors import SegmentError
from embedctl.shm_loader.segment import attach, human_bytes
from embedctl.shm_loader.share import peer_credentials, send_message, socket_path

LOG = logging.getLogger("embedctl.exporter")


def serve(folder: Path, dtype_name: str, device: str, key: str, parent: int | None = None) -> None:
    """Export the segment of `folder` in `dtype_name` on `device` for the processes of bootstrap `key`, until
    stopped."""
    import torch

    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    attached = attach(folder, dtype)
    if attached is None:
        raise SegmentError(f"no shared-memory segment of {folder} in {dtype_name}; publish it first "
                           f"(`embedctl shm publish --model {folder}`)")
    copy = make_copy(attached, device)
    manifest = attached.manifest
    header = {"segment": attached.name, "fingerprint": manifest["fingerprint"], "folder": manifest["folder"],
              "dtype": manifest["dtype"], "checksum": copy.checksum, "exporter_pid": os.getpid(),
              "tensors": manifest["tensors"]}
    path = socket_path(attached.name, device, key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(str(tmp))
    finally:
        os.umask(old_umask)
    os.chmod(tmp, 0o600)
    server.listen(64)
    os.replace(tmp, path)  # visible only now that the copy is complete
    inode = os.stat(path).st_ino
    LOG.info("exporting %s on %s (%s) at %s in %.1fs; ready", attached.name, device,
             human_bytes(copy.buffer.numel()), path, time.perf_counter() - t0)
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    clients: set[socket.socket] = set()
    try:
        while not stop:
            if parent and os.getppid() != parent:
                LOG.info("the process that started this exporter (%d) exited: stopping", parent)
                break
            for key, _ in selector.select(timeout=1.0):
                if key.fileobj is server:
                    _accept(server, header, copy, selector, clients)
                else:  # a client closed (or sent something it should not): drop it
                    conn = key.fileobj
                    selector.unregister(conn)
                    clients.discard(conn)
                    conn.close()
    finally:
        server.close()
        try:  # remove the socket unless a newer exporter has replaced it meanwhile
            if os.stat(path).st_ino == inode:
                path.unlink()
        except OSError:
            pass


def _accept(server: socket.socket, header: dict, copy, selector, clients: set) -> None:
    """Answer one connection: the handle (a fresh one: CUDA IPC counts its receivers) to a process of this user,
    a refusal to any other. A client that dies mid-answer costs its connection, never the exporter."""
    try:
        conn, _ = server.accept()
    except OSError as exc:
        LOG.warning("accept failed: %s", exc)
        return
    try:
        pid, uid, _gid = peer_credentials(conn)
        if uid != os.getuid():
            LOG.warning("refused a connection from pid %d of uid %d: weights go only to processes of uid %d", pid,
                        uid, os.getuid())
            send_message(conn, {"error": f"the weight exporter (pid {os.getpid()}) serves only uid {os.getuid()}"})
            conn.close()
            return
        handle, fds = export_handle(copy)
        send_message(conn, {**header, "handle": handle}, fds)
    except OSError as exc:
        LOG.warning("a client left before it had the weights: %s", exc)
        conn.close()
        return
    selector.register(conn, selectors.EVENT_READ)
    clients.add(conn)
    LOG.info("handed the weights to pid %d (%d processes attached)", pid, len(clients))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--key", required=True, help="the key of the bootstrap whose processes it serves")
    parser.add_argument("--parent", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[exporter {args.device} %(process)d] %(message)s",
                        stream=sys.stderr)
    try:
        serve(args.folder, args.dtype, args.device, args.key, args.parent)
    except SegmentError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
