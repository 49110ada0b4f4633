"""A fresh process for the shared-memory tests: load a model (shared or from disk), embed, report, then act.

    python -m tests.shm_worker FOLDER DTYPE SHM_MODE OUT [then]
    then: exit (default) | wait (until stdin closes, then embed again) | write (write into a weight)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

TEXTS = ["dog cat house", "river stone light dark water", "a", "the quick horse runs over the old bridge",
         "fire and rain"]


def main() -> None:
    folder, dtype, mode, out = sys.argv[1:5]
    then = sys.argv[5] if len(sys.argv) > 5 else "exit"
    t0 = time.perf_counter()
    import numpy as np

    from embedctl.pipeline.encoder import load_encoder
    from embedctl.pipeline.models import ModelRef

    t_load = time.perf_counter()
    encoder = load_encoder(ModelRef("m", Path(folder)), device="cpu", dtype=dtype, shm=mode)
    vectors = encoder.encode(TEXTS).vectors
    t_done = time.perf_counter()
    np.save(out, vectors)
    segment = encoder.source.removeprefix("shm:")
    mapped = segment in Path("/proc/self/maps").read_text() if encoder.source.startswith("shm:") else False
    report = {"source": encoder.source, "mapped": mapped, "load_to_first_embedding": t_done - t_load,
              "process_to_first_embedding": t_done - t0}
    Path(out + ".json").write_text(json.dumps(report))
    print("ready", flush=True)
    if then == "wait":
        sys.stdin.read()
        again = encoder.encode(TEXTS).vectors
        np.save(out + ".again.npy", again)
    elif then == "write":
        param = next(encoder.model.parameters())
        param.data.add_(1.0)  # the mapping is read-only: this must kill the process
        print("wrote into shared weights", flush=True)


if __name__ == "__main__":
    main()
