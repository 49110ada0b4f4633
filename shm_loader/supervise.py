"""Start and watch the weight exporters of a host (one per device): what `embedctl worker` and `embedctl serve`
run beside their workers. An exporter that exits is started again from the host segment; the processes that
mapped it fail their current work (see share.py) and map the new one on their next."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from embedctl.shm_loader.errors import SegmentError
from embedctl.shm_loader.segment import segment_name
from embedctl.shm_loader.share import socket_path

LOG = logging.getLogger(__name__)


class Exporters:
    """The exporters of one segment (model folder and dtype) on `devices`, children of this process."""

    def __init__(self, folder: Path, dtype, devices: list[str], log=None):
        self.folder = Path(folder).resolve()
        self.dtype = dtype
        self.devices = list(dict.fromkeys(devices))
        self.segment = segment_name(self.folder, dtype)
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts = 0
        self.log = log or LOG.info

    def _command(self, device: str) -> list[str]:
        return [sys.executable, "-P", "-m", "embedctl.shm_loader.exporter", "--folder", str(self.folder),
                "--dtype", str(self.dtype).removeprefix("torch."), "--device", device, "--parent", str(os.getpid())]

    def _start(self, device: str) -> subprocess.Popen:
        path = socket_path(self.segment, device)
        path.unlink(missing_ok=True)  # a socket left by an exporter that was killed
        return subprocess.Popen(self._command(device), stdin=subprocess.DEVNULL)

    def _wait_ready(self, device: str, timeout: float) -> None:
        path, proc = socket_path(self.segment, device), self.procs[device]
        deadline = time.monotonic() + timeout
        while not path.exists():
            if proc.poll() is not None:
                raise SegmentError(f"the weight exporter on {device} exited ({proc.returncode}) before it was ready; "
                                   "its error is above")
            if time.monotonic() > deadline:
                raise SegmentError(f"the weight exporter on {device} was not ready after {timeout:.0f} s")
            time.sleep(0.1)

    def start(self, timeout: float = 600.0) -> None:
        """Start one exporter per device and wait until each has its copy made and its socket up."""
        for device in self.devices:
            self.procs[device] = self._start(device)
        for device in self.devices:
            self._wait_ready(device, timeout)
        self.log(f"weights of {self.folder.name} shared on {', '.join(self.devices)} (one copy per device, "
                 f"exporter pids {', '.join(str(p.pid) for p in self.procs.values())})")

    def watch(self, timeout: float = 600.0) -> list[str]:
        """Start again every exporter that exited; returns the devices restarted."""
        restarted = []
        for device, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            self.log(f"the weight exporter on {device} (pid {proc.pid}) exited with {proc.returncode}: restarting "
                     "it from the host segment; work that was using it is retried")
            self.procs[device] = self._start(device)
            try:
                self._wait_ready(device, timeout)
            except SegmentError as exc:
                self.log(f"{exc}; trying again")
                continue
            self.restarts += 1
            restarted.append(device)
            self.log(f"the weight exporter on {device} is back (pid {self.procs[device].pid})")
        return restarted

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
