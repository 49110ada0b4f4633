"""Start and watch the weight exporters of a host (one per device): what `embedctl worker` and `embedctl serve`
run beside their workers. An exporter that exits is started again from the host segment (after a growing pause
when it keeps failing); the processes that mapped it fail their current work (see share.py) and map the new one.
`Deaths` is the same policy for the Celery worker that `embedctl worker` runs beside them: started again after 1,
2, 4 ... s, given up after 5 deaths within 300 s.

The exporters run in a session of their own, so a terminal's Ctrl-C or a signal to the bootstrap's group stops the
workers first; the bootstrap stops the exporters last. The key of a bootstrap (its pid) is in its exporters'
socket names and in its workers' environment: two bootstraps on one host never touch each other's exporters.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from embedctl.shm_loader.errors import SegmentError
from embedctl.shm_loader.segment import dtype_str, segment_name
from embedctl.shm_loader.share import KEY_ENV, socket_path

LOG = logging.getLogger(__name__)

MAX_PAUSE = 60.0
"""The longest pause before starting again a process that keeps failing (1, 2, 4, ... seconds)."""

DEATH_LIMIT = 5
"""Deaths of a restarted process (the Celery worker of `embedctl worker`) within `DEATH_WINDOW` after which its
supervisor gives up (EMBEDCTL_WORKER_DEATHS)."""

DEATH_WINDOW = 300.0
"""Seconds over which deaths are counted (EMBEDCTL_WORKER_DEATH_WINDOW)."""


def backoff(failures: int) -> float:
    """Seconds to wait before starting again what failed `failures` times in a row: 1, 2, 4 ... MAX_PAUSE."""
    return min(MAX_PAUSE, 2.0 ** max(0, failures - 1))


def describe_exit(code: int) -> str:
    """How a child ended, from its return code: 'was killed by signal 9 (SIGKILL)', 'exited with code 1'."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"was killed by signal {-code} ({name})"
    return f"exited with code {code}"


class Deaths:
    """The deaths of a process that is started again when it dies: the pause before its next start (`backoff` of
    the deaths within the window), and when to give up (`limit` deaths within `window` seconds)."""

    def __init__(self, limit: int = DEATH_LIMIT, window: float = DEATH_WINDOW, clock=time.monotonic):
        if limit < 1 or window <= 0:
            raise ValueError(f"limit must be >= 1 and window > 0, got {limit!r} and {window!r}")
        self.limit = limit
        self.window = float(window)
        self.clock = clock
        self.times: list[float] = []

    def record(self) -> float | None:
        """Note a death now; returns the pause before the next start, or None: give up."""
        now = self.clock()
        self.times = [t for t in self.times if now - t <= self.window] + [now]
        return None if len(self.times) >= self.limit else backoff(len(self.times))


@dataclass
class _Exporter:
    proc: subprocess.Popen
    ready: bool = False
    failures: int = 0  # exits in a row before it was ready
    not_before: float = 0.0  # monotonic time of the next start, after a failure


class Exporters:
    """The exporters of one segment (model folder and dtype) on `devices`, children of this process."""

    def __init__(self, folder: Path, dtype, devices: list[str], log=None):
        self.folder = Path(folder).resolve()
        self.dtype = dtype
        self.devices = list(dict.fromkeys(devices))
        self.segment = segment_name(self.folder, dtype)
        self.key = str(os.getpid())
        self.exporters: dict[str, _Exporter] = {}
        self.restarts = 0
        self.log = log or LOG.info
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        return {device: e.proc for device, e in self.exporters.items()}

    def environment(self) -> dict[str, str]:
        """What the workers need to map these exporters' copies."""
        return {"EMBEDCTL_DEVICE_SHARE": "on", KEY_ENV: self.key}

    def _command(self, device: str) -> list[str]:
        return [sys.executable, "-P", "-m", "embedctl.shm_loader.exporter", "--folder", str(self.folder),
                "--dtype", dtype_str(self.dtype), "--device", device, "--key", self.key,
                "--parent", str(os.getpid())]

    def _spawn(self, device: str) -> subprocess.Popen:
        socket_path(self.segment, device, self.key).unlink(missing_ok=True)  # left by a killed exporter of ours
        return subprocess.Popen(self._command(device), stdin=subprocess.DEVNULL, start_new_session=True)

    def _is_ready(self, device: str) -> bool:
        return socket_path(self.segment, device, self.key).exists()

    def start(self, timeout: float = 600.0) -> None:
        """Start one exporter per device and wait until each has its copy made and its socket up."""
        with self._lock:
            for device in self.devices:
                self.exporters[device] = _Exporter(self._spawn(device))
        deadline = time.monotonic() + timeout
        for device, exporter in self.exporters.items():
            while not self._is_ready(device):
                if exporter.proc.poll() is not None:
                    self.stop()
                    raise SegmentError(f"the weight exporter on {device} exited ({exporter.proc.returncode}) before "
                                       "it was ready; its error is above")
                if time.monotonic() > deadline:
                    self.stop()
                    raise SegmentError(f"the weight exporter on {device} was not ready after {timeout:.0f} s")
                time.sleep(0.1)
            exporter.ready = True
        self.log(f"weights of segment {self.segment} shared on {', '.join(self.devices)} (one copy per device, "
                 f"exporter pids {', '.join(str(e.proc.pid) for e in self.exporters.values())})")

    def watch(self) -> list[str]:
        """One look at the exporters (never blocks): start again those that exited, note those back; returns the
        devices started again."""
        restarted = []
        with self._lock:
            if self._stopped:
                return restarted
            now = time.monotonic()
            for device, exporter in self.exporters.items():
                code = exporter.proc.poll()
                if code is None:
                    if not exporter.ready and self._is_ready(device):
                        exporter.ready, exporter.failures = True, 0
                        self.log(f"the weight exporter on {device} is back (pid {exporter.proc.pid})")
                    continue
                if exporter.not_before == 0.0:  # just noticed
                    if exporter.ready:
                        self.log(f"the weight exporter on {device} (pid {exporter.proc.pid}) exited with {code}: "
                                 "restarting it from the host segment; work that was using it is retried")
                    else:
                        exporter.failures += 1
                        pause = backoff(exporter.failures)
                        self.log(f"the weight exporter on {device} failed to start ({code}); trying again in "
                                 f"{pause:.0f} s")
                        exporter.not_before = now + pause
                if now < exporter.not_before:
                    continue
                failures = exporter.failures
                self.exporters[device] = _Exporter(self._spawn(device), failures=failures)
                self.restarts += 1
                restarted.append(device)
        return restarted

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for exporter in self.exporters.values():
                if exporter.proc.poll() is None:
                    exporter.proc.terminate()
            for exporter in self.exporters.values():
                try:
                    exporter.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    exporter.proc.kill()
