"""The server process: `python -P -m embedctl.serve`, started by `embedctl serve` with its settings in
EMBEDCTL_SERVE_CONFIG. With more than one worker this process is uvicorn's supervisor only: it holds the socket and
restarts workers that die, and imports neither torch nor the model (so it touches no CUDA). On a GPU host it also
runs one weight exporter per GPU (shm_loader/supervise.py) whose copy every worker on that GPU maps, and restarts
an exporter that exits (the workers map the new one and run their batch again)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import uvicorn

from embedctl.serve import connection
from embedctl.serve.config import ServeConfig
from embedctl.settings import setting


class _Terminated(BaseException):
    """SIGTERM arrived: unwind through the cleanup, then end of the signal."""


def _terminate(_signum: int, _frame) -> None:
    raise _Terminated


def main() -> int:
    config = ServeConfig.from_env()
    # the workers' metric files (prometheus_client opens them with the umask's mode) are private like the folder
    os.umask(os.umask(0o077) | 0o077)
    # every worker writes its metrics here (mkdtemp: 0700), and /metrics sums them (serve.metrics)
    folder = tempfile.mkdtemp(prefix="embedctl-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    # uvicorn handles SIGTERM while it serves, then puts this handler back and raises the signal again; the
    # default action would end the process there, before the `finally` below removes the folder
    signal.signal(signal.SIGTERM, _terminate)
    exporters = terminated = None
    try:
        try:
            exporters = _start_exporters(config)
        except Exception as exc:  # noqa: BLE001 - SegmentError and the like: one line, before any worker starts
            print(f"Error: {exc}", file=sys.stderr)
            return 1
        uvicorn.run("embedctl.serve.app:create_app", factory=True, host=config.host, port=config.port,
                    workers=config.workers, log_level=setting("log_level"),
                    access_log=False, timeout_graceful_shutdown=10, **connection.uvicorn_options(config))
    except _Terminated:
        terminated = signal.SIGTERM
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if exporters is not None:
            exporters.stop()
    if terminated is not None:  # end as SIGTERM's default action would have: its exit status says so
        signal.signal(terminated, signal.SIG_DFL)
        signal.raise_signal(terminated)
    return 0


def _start_exporters(config: ServeConfig):
    """Start the weight exporters of `config.share` and a thread that restarts them; sets EMBEDCTL_DEVICE_SHARE for
    the workers (`on`: map an exporter's copy, `off`: copy the host segment each)."""
    if not config.share:
        os.environ["EMBEDCTL_DEVICE_SHARE"] = "off"
        return None
    from embedctl.shm_loader.supervise import Exporters

    exporters = Exporters(config.share["folder"], config.share["dtype"], config.share["devices"],
                          log=lambda line: print(f"INFO:     {line}", file=sys.stderr, flush=True))
    exporters.start()
    os.environ.update(exporters.environment())  # what the workers (spawned from this process) map

    def watch() -> None:
        while not exporters.stopped:
            time.sleep(1.0)
            exporters.watch()

    threading.Thread(target=watch, name="exporters", daemon=True).start()
    return exporters


if __name__ == "__main__":
    sys.exit(main())
