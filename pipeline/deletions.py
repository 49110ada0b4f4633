"""Position sets: sorted int64 row positions as plain `.npy` files (the one owner of their names).

    deleted-<segment id>.npy   the positions of a segment's rows that a version no longer holds (in the version
                               folder, `pipeline.manifest`), or that a build plans to delete (`pipeline.compose`)
    sources-<segment id>.npy   the rows of a new segment: positions in a job's stored rows (`pipeline.compose`)
"""

from __future__ import annotations

import numpy as np

from embedctl.pipeline.fsutil import npy_writer
from embedctl.pipeline.storage import Stat, Storage


def deletions_file(segment_id: str) -> str:
    """The name of the deletion set of `segment_id`."""
    return f"deleted-{segment_id}.npy"


def sources_file(segment_id: str) -> str:
    """The name of the rows (source positions) of a new segment."""
    return f"sources-{segment_id}.npy"


def write_positions(storage: Storage, key: str, positions: np.ndarray) -> Stat:
    """Write `positions` (as int64) under `key`, atomically."""
    return storage.write(key, npy_writer(np.asarray(positions, dtype=np.int64)))


def read_positions(storage: Storage, key: str) -> np.ndarray:
    """The positions written by `write_positions` (raises OSError when missing or unreadable)."""
    return np.load(storage.local_path(key), allow_pickle=False)
