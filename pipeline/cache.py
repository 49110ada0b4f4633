"""The embedding cache: vectors already on disk, found by (vector key, text hash), so only new texts are embedded.

Every chunk's rows file keeps a 64-bit hash of each text. A later plan of the same output folder whose vector
key matches (model fingerprint, document instruction, max length, dtype: everything that shapes a vector other
than the text) reuses those vectors for identical texts instead of running the model. The cache is therefore
bounded by what the output folder keeps (the work folder of the published plan, plus unfinished ones), and
`embedctl cache prune` removes the rest.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.vectors import ChunkStore

LOG = logging.getLogger(__name__)


def text_hash(text: str) -> int:
    """64-bit hash of a text (blake2b), stable across processes and hosts."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def text_hashes(texts: Sequence[str]) -> np.ndarray:
    return np.fromiter((text_hash(t) for t in texts), dtype=np.uint64, count=len(texts))


class EmbeddingCache:
    """A read-only index over the complete chunks of some chunk stores: text hash -> stored vector."""

    def __init__(self, stores: Sequence[ChunkStore]):
        hashes, where = [], []
        self._files: list[Path] = []
        for store in stores:
            for number in sorted(store.complete()):
                rows_file = store.root / f"chunk-{number:06d}.rows.parquet"
                try:
                    column = pq.read_table(rows_file, columns=["hash"]).column("hash")
                except (KeyError, OSError, ValueError):
                    continue  # written before hashes were kept, or unreadable: not a cache source
                h = column.to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)
                file_index = len(self._files)
                self._files.append(store.root / f"chunk-{number:06d}.npy")
                hashes.append(h)
                where.append(np.stack([np.full(len(h), file_index, np.int64), np.arange(len(h), dtype=np.int64)], 1))
        self.hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        locations = np.concatenate(where) if where else np.zeros((0, 2), np.int64)
        order = np.argsort(self.hashes, kind="stable")
        self.hashes, self._where = self.hashes[order], locations[order]

    def __len__(self) -> int:
        return len(self.hashes)

    def lookup(self, hashes: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, float16 vectors with the found rows filled) for `hashes`."""
        found = np.zeros(len(hashes), dtype=bool)
        vectors = np.zeros((len(hashes), dim), dtype=np.float16)
        if not len(self.hashes) or not len(hashes):
            return found, vectors
        pos = np.searchsorted(self.hashes, hashes)
        pos_ok = pos < len(self.hashes)
        found[pos_ok] = self.hashes[pos[pos_ok]] == hashes[pos_ok]
        if not found.any():
            return found, vectors
        locs = self._where[pos[found]]
        targets = np.flatnonzero(found)
        for file_index in np.unique(locs[:, 0]):
            sel = locs[:, 0] == file_index
            stored = np.load(self._files[file_index], mmap_mode="r")
            vectors[targets[sel]] = stored[locs[sel, 1]]
        return found, vectors
