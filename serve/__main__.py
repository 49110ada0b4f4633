"""The server process: `python -P -m embedctl.serve`, started by `embedctl serve` with its settings in
EMBEDCTL_SERVE_CONFIG. With more than one worker this process is uvicorn's supervisor only: it holds the socket and
restarts workers that die, and imports neither torch nor the model (so it touches no CUDA)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import uvicorn

from embedctl.serve.config import ServeConfig


def main() -> int:
    config = ServeConfig.from_env()
    # every worker writes its metrics here, and /metrics sums them (serve.metrics)
    folder = tempfile.mkdtemp(prefix="embedctl-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    try:
        uvicorn.run("embedctl.serve.app:create_app", factory=True, host=config.host, port=config.port,
                    workers=config.workers, log_level=os.environ.get("EMBEDCTL_LOG_LEVEL", "info").lower(),
                    access_log=False, timeout_graceful_shutdown=10)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
