"""The embedding cache: vectors already on disk, found by (vector key, text hash), so only new texts are embedded.

Every chunk's rows file keeps a 64-bit hash of each text. A later plan of the same output folder whose vector
key matches (model fingerprint, document instruction, max length, dtype: everything that shapes a vector other
than the text) reuses those vectors for identical texts instead of running the model. The cache is therefore
bounded by what the output folder keeps (the work folder of the published plan, plus unfinished ones), and
`embedctl cache prune` removes the rest (`prune`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from embedctl.pipeline.errors import EmbedctlError, StorageError
from embedctl.pipeline.storage import storage_of
from embedctl.pipeline.vectors import ChunkStore, Layout, Source

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
    stored: Layout | None = None  # where the found rows' vectors are stored (source -1: not found)


class EmbeddingCache:
    """A read-only index over the complete chunks of some chunk stores: text hash -> stored vector.

    A text is found through the chunk that lists it (whose checksums, its sources' included, are checked before
    its rows are reused); its vector is read from the file that stores it, which for an overlay chunk may be an
    earlier chunk's (`vectors.Layout`), and the hits say which file that is, so that a new chunk can point there
    too instead of storing the vector again."""

    def __init__(self, stores: Sequence[ChunkStore]):
        hashes, where = [], []
        self._chunks: list[tuple[ChunkStore, int]] = []
        self._checked: dict[int, bool] = {}  # chunk index -> sound (verified on first use)
        self._seen: dict = {}  # verdicts of the files checked, shared by the chunks that cite one
        self._dtypes: list[list[str]] = []
        self._sizes: list[int] = []  # rows of each chunk
        self._files: list[Source] = []  # the vectors files the chunks' rows are stored in
        self._readers: list[ChunkStore] = []  # a store of each file's storage, to open it
        self._file_of: dict[tuple[str, str], int] = {}  # (key, recorded checksum): a file rewritten since an
        # older overlay cited it is another entry, so a hit cites the checksum its own (verified) chunk recorded
        storages = {store.storage for store in stores}
        self._storage = next(iter(storages)) if len(storages) == 1 else None
        for store in stores:
            for number in sorted(store.complete()):
                try:
                    column = store.read_rows(number, columns=["hash"]).column("hash")
                    report = store.read_report(number)
                    layout = store.layout(number, report)
                except (KeyError, OSError, ValueError, TypeError, IndexError):
                    continue  # written before hashes were kept, or unreadable: not a cache source
                h = column.to_numpy(zero_copy_only=False).astype(np.uint64, copy=False)
                if len(layout.source) != len(h):
                    continue  # a report that does not describe its rows: not a cache source
                chunk_index = len(self._chunks)
                self._chunks.append((store, number))
                self._dtypes.append(report.get("dtypes", []))
                self._sizes.append(len(h))
                files = np.array([self._file_index(store, source) for source in layout.sources], dtype=np.int64)
                hashes.append(h)
                where.append(np.stack([np.full(len(h), chunk_index, np.int64), files[layout.source],
                                       layout.position], 1))
        self.hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        locations = np.concatenate(where) if where else np.zeros((0, 3), np.int64)
        order = np.argsort(self.hashes, kind="stable")
        self.hashes, self._where = self.hashes[order], locations[order]

    def _file_index(self, store: ChunkStore, source: Source) -> int:
        key = (source.key, json.dumps(source.checksum, sort_keys=True))
        if key not in self._file_of:
            self._file_of[key] = len(self._files)
            self._files.append(source)
            self._readers.append(store)
        return self._file_of[key]

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
        sound = np.ones(len(locs), dtype=bool)
        for chunk_index in np.unique(locs[:, 0]):
            sel = locs[:, 0] == chunk_index
            if not self._sound(int(chunk_index)):
                sound[sel] = False  # embedded again instead
                continue
            hits.dtypes.update(self._dtypes[chunk_index])
        hits.found[targets[~sound]] = False
        locs, targets = locs[sound], targets[sound]
        source = np.full(len(hashes), -1, np.int64)
        position = np.zeros(len(hashes), np.int64)
        for file_index in np.unique(locs[:, 1]):
            sel = locs[:, 1] == file_index
            reader, stored_file = self._readers[file_index], self._files[file_index]
            try:
                stored = np.load(reader.source_path(stored_file), mmap_mode="r")
                hits.vectors[targets[sel]] = stored[locs[sel, 2]]
            except (OSError, ValueError, IndexError) as exc:  # removed or replaced since it was checked
                LOG.warning("not reusing vectors of %s (%s); their texts are embedded again", stored_file.key, exc)
                hits.found[targets[sel]] = False
        keep = hits.found[targets]
        source[targets[keep]], position[targets[keep]] = locs[keep, 1], locs[keep, 2]
        hits.stored = Layout(list(self._files), source, position, self._storage)
        return hits

    def _sound(self, chunk_index: int) -> bool:
        """Whether a source chunk matches its checksums (checked once; an overlay's with the files it points at): a
        damaged one is never copied from."""
        if chunk_index not in self._checked:
            store, number = self._chunks[chunk_index]
            damage = store.verify(number, self._seen)
            for path, problem in damage:
                LOG.warning("not reusing the vectors of %s: %s; its texts are embedded again", path, problem)
            self._checked[chunk_index] = not damage
        return self._checked[chunk_index]


UNFINISHED_SECONDS = 3600
"""A job that wrote anything (a chunk, a build piece, a heartbeat) this recently and is not published is taken to be
running: `prune` keeps it and the segments its build plans name; multipart uploads this old are aborted."""


def prune(out: Path | str, everything: bool = False, published: Callable[[WorkPlan], object] = lambda plan: False,
          ) -> tuple[list[str], int]:
    """Remove the stored vectors (job folders) of `out` that no published version needs; returns the removed job
    ids and the bytes freed. The vectors of the current version are kept unless `everything`; a job still writing
    (not `published` and a chunk written in the last `UNFINISHED_SECONDS`) is left alone, and while one is, no
    work folder is removed (its chunks may point into any); so are the folders whose vectors the kept ones' chunks
    point at (`plan.work_in_use`)."""
    from embedctl.pipeline import versions
    from embedctl.pipeline.manifest import read_info
    from embedctl.pipeline.plan import WORK, load_plan, work_in_use

    storage = storage_of(out)
    if not storage.is_folder(WORK):
        raise StorageError(f"{str(out)!r} has no stored vectors (no {WORK}/ folder); is it an --out folder?")
    current = versions.current_folder(storage)
    keep_id = read_info(current).plan_id if current else None
    folders = [entry for entry in storage.list(WORK) if entry.folder]
    kept = {keep_id} if keep_id and not everything else set()
    objects = {}
    for entry in folders:
        objects[entry.name] = list(storage.walk(entry.key))
        if entry.name in kept:
            continue
        try:
            plan = load_plan(storage.describe(entry.key))
            # anything written there lately (a chunk, a build piece, a live step's heartbeat): a run is working
            newest = max((st.mtime for _key, st in objects[entry.name]), default=None)
            if not published(plan) and newest is not None and time.time() - newest < UNFINISHED_SECONDS:
                kept.add(entry.name)  # a job still writing here: leave it
        except EmbedctlError:
            pass
    unfinished = kept - {keep_id}
    kept = work_in_use(storage, kept)  # with the folders whose vectors their chunks point at
    removed, freed = [], 0
    for entry in folders:
        if entry.name in kept or unfinished:  # a run still writing may point into any of them: all are kept
            continue
        freed += sum(st.size for _key, st in objects[entry.name])
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
