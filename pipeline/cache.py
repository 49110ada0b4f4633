"""The embedding cache: vectors already on disk, found by (vector key, text hash), so only new texts are embedded.

Every chunk's rows file keeps a 64-bit hash of each text. A later plan of the same output folder whose vector
key matches (model fingerprint, document instruction, max length, dtype: everything that shapes a vector other
than the text) reuses those vectors for identical texts instead of running the model. The cache is therefore
bounded by what the output folder keeps (the work folder of the published plan, plus unfinished ones), and
`embedctl cache prune` removes the rest (`prune`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from embedctl.pipeline.errors import EmbedctlError, StorageError
from embedctl.pipeline.storage import storage_of
from embedctl.pipeline.vectors import ChunkStore

if TYPE_CHECKING:
    from embedctl.pipeline.plan import WorkPlan

LOG = logging.getLogger(__name__)


def text_hash(text: str) -> int:
    """64-bit hash of a text (blake2b), stable across processes and hosts."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def text_hashes(texts: Sequence[str]) -> np.ndarray:
    return np.fromiter((text_hash(t) for t in texts), dtype=np.uint64, count=len(texts))


@dataclass
class CacheHits:
    """What `EmbeddingCache.lookup` found."""

    found: np.ndarray  # (n,) bool
    vectors: np.ndarray  # (n, dim) float16, the found rows filled
    dtypes: set[str]  # compute dtypes of the found vectors (from their chunk reports)
    whole: tuple[ChunkStore, int] | None = None  # the one stored chunk all of them come from, of as many rows


class EmbeddingCache:
    """A read-only index over the complete chunks of some chunk stores: text hash -> stored vector."""

    def __init__(self, stores: Sequence[ChunkStore]):
        hashes, where = [], []
        self._files: list[Path] = []
        self._chunks: list[tuple[ChunkStore, int]] = []
        self._checked: dict[int, bool] = {}  # file index -> sound (verified on first use)
        self._dtypes: list[list[str]] = []
        self._sizes: list[int] = []  # rows of each chunk
        for store in stores:
            for number in sorted(store.complete()):
                try:
                    column = store.read_rows(number, columns=["hash"]).column("hash")
                    dtypes = store.read_report(number).get("dtypes", [])
                except (KeyError, OSError, ValueError):
                    continue  # written before hashes were kept, or unreadable: not a cache source
                h = column.to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)
                file_index = len(self._files)
                self._files.append(store.vectors_path(number))
                self._chunks.append((store, number))
                self._dtypes.append(dtypes)
                hashes.append(h)
                self._sizes.append(len(h))
                where.append(np.stack([np.full(len(h), file_index, np.int64), np.arange(len(h), dtype=np.int64)], 1))
        self.hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        locations = np.concatenate(where) if where else np.zeros((0, 2), np.int64)
        order = np.argsort(self.hashes, kind="stable")
        self.hashes, self._where = self.hashes[order], locations[order]

    def __len__(self) -> int:
        return len(self.hashes)

    def lookup(self, hashes: np.ndarray, dim: int) -> CacheHits:
        """The stored vectors of `hashes` that are in the cache."""
        hits = CacheHits(np.zeros(len(hashes), dtype=bool), np.zeros((len(hashes), dim), dtype=np.float16), set())
        if not len(self.hashes) or not len(hashes):
            return hits
        pos = np.searchsorted(self.hashes, hashes)
        pos_ok = pos < len(self.hashes)
        hits.found[pos_ok] = self.hashes[pos[pos_ok]] == hashes[pos_ok]
        if not hits.found.any():
            return hits
        locs = self._where[pos[hits.found]]
        targets = np.flatnonzero(hits.found)
        if hits.found.all() and (locs[:, 0] == locs[0, 0]).all() and self._sizes[int(locs[0, 0])] == len(locs):
            hits.whole = self._chunks[int(locs[0, 0])]  # its file may be these vectors (the writer compares)
        for file_index in np.unique(locs[:, 0]):
            sel = locs[:, 0] == file_index
            if not self._sound(int(file_index)):
                hits.found[targets[sel]] = False  # embedded again instead
                continue
            stored = np.load(self._files[file_index], mmap_mode="r")
            hits.vectors[targets[sel]] = stored[locs[sel, 1]]
            hits.dtypes.update(self._dtypes[file_index])
        return hits

    def _sound(self, file_index: int) -> bool:
        """Whether a source chunk matches its checksums (checked once): a damaged one is never copied from."""
        if file_index not in self._checked:
            store, number = self._chunks[file_index]
            damage = store.verify(number)
            for path, problem in damage:
                LOG.warning("not reusing the vectors of %s: %s; its texts are embedded again", path, problem)
            self._checked[file_index] = not damage
        return self._checked[file_index]


UNFINISHED_SECONDS = 3600
"""A job that wrote anything (a chunk, a build piece, a heartbeat) this recently and is not published is taken to be
running: `prune` keeps it and the segments its build plans name; multipart uploads this old are aborted."""


def prune(out: Path | str, everything: bool = False, published: Callable[[WorkPlan], object] = lambda plan: False,
          ) -> tuple[list[str], int]:
    """Remove the stored vectors (job folders) of `out` that no published version needs; returns the removed job
    ids and the bytes freed. The vectors of the current version are kept unless `everything`; a job still writing
    (not `published` and a chunk written in the last `UNFINISHED_SECONDS`) is left alone."""
    from embedctl.pipeline import versions
    from embedctl.pipeline.manifest import read_info
    from embedctl.pipeline.plan import WORK, load_plan

    storage = storage_of(out)
    if not storage.is_folder(WORK):
        raise StorageError(f"{str(out)!r} has no stored vectors (no {WORK}/ folder); is it an --out folder?")
    current = versions.current_folder(storage)
    keep_id = read_info(current).plan_id if current else None
    removed, freed = [], 0
    for entry in storage.list(WORK):
        if not entry.folder or (entry.name == keep_id and not everything):
            continue
        objects = list(storage.walk(entry.key))
        try:
            plan = load_plan(storage.describe(entry.key))
            # anything written there lately (a chunk, a build piece, a live step's heartbeat): a run is working
            newest = max((st.mtime for _key, st in objects), default=None)
            unfinished = not published(plan) and newest is not None and time.time() - newest < UNFINISHED_SECONDS
        except EmbedctlError:
            unfinished = False
        if unfinished and entry.name != keep_id:
            continue  # a job still writing here: leave it
        freed += sum(st.size for _key, st in objects)
        storage.delete(entry.key)
        removed.append(entry.name)
    freed += _collect_leftovers(storage)
    return removed, freed


def _collect_leftovers(storage) -> int:
    """What dead runs left besides their work folders: segments that no kept version and no build plan of a kept
    work folder refers to, and (on an object store) multipart uploads a killed process never finished. Returns the
    bytes freed."""
    from embedctl.pipeline import versions
    from embedctl.pipeline.compose import segments_in_use
    from embedctl.pipeline.plan import WORK
    from embedctl.pipeline.segments import SEGMENTS, collect_garbage

    freed = 0
    planned = segments_in_use(storage.sub(WORK))  # before the versions: a segment is named by its build plan until
    used = versions.segments_of_kept_versions(storage)  # its version is published, and the plan is removed after
    if used is not None:
        used |= planned
        sizes, young = {}, set()
        for entry in storage.list(SEGMENTS):
            if entry.folder and entry.name not in used:
                stats = [st for _k, st in storage.walk(entry.key)]
                sizes[entry.name] = sum(st.size for st in stats)
                if any(time.time() - st.mtime < UNFINISHED_SECONDS for st in stats):
                    young.add(entry.name)  # written lately: a grace period for a build this listing missed
        for name in collect_garbage(storage, used | young):
            freed += sizes.get(name, 0)
    collect = getattr(storage, "abort_uploads", None)
    if collect is not None:
        collect(older_than=UNFINISHED_SECONDS)
    return freed
