"""The indexes a server searches, each followed across re-indexes.

An index is an `--out` folder named by its folder name. Each request asks for the reader of the version that
`current` points to now: when a re-index has swapped `current`, the first request after the swap opens the new
version (its files checked, its indexes memory-mapped) and later ones use it; requests already searching keep
the reader they hold, whose files stay readable while it is open (memory maps and open files survive a removal
by retention). A new version that cannot be opened is logged and the previous one stays served.

An index on an object store (`s3://...`) is not asked on every request: a background poll reads its `current` pointer
at most every `POLL_SECONDS` (a GET of the pointer and a HEAD of the manifest it names) and opens a new version when
the pointer names another; the version's files come from the local cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from embedctl.pipeline.errors import ConfigError, EmbedctlError
from embedctl.pipeline.index import IndexReader
from embedctl.pipeline.storage import is_uri
from embedctl.pipeline.versions import index_names, resolve_index_dir

LOG = logging.getLogger(__name__)
POLL_SECONDS = 2.0
"""How often a server reads the `current` pointer of an index on an object store."""


class UnknownIndex(ConfigError):
    """A request names an index the server does not serve."""


@dataclass
class ServedIndex:
    name: str
    out: Path
    verify: bool
    reader: IndexReader | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    model: tuple[str, str] | None = None  # (fingerprint, name) of the served model: every version must match it
    reloads: int = 0
    failed: str | None = None  # the version that could not be opened (not retried until current moves again)
    polled: float = 0.0  # when the pointer of a remote index was last read (monotonic seconds)
    poll: asyncio.Task | None = None  # the background poll of a remote index's pointer

    def open(self) -> IndexReader:
        reader = IndexReader(self.out, verify=self.verify)
        if self.model is not None:
            reader.info.require_model(*self.model, self.out)
        reader.load()  # every dim of every segment, checked and mapped before the first search
        return reader

    async def current(self) -> IndexReader:
        """The reader of the version `current` points to (opening it on first use after a swap). An index on an
        object store is not asked on the request's path: a background poll (one at a time, every `POLL_SECONDS`,
        failing at once when the store does not answer) swaps the reader, and requests use the open one."""
        if self.reader is not None and is_uri(str(self.out)):
            if time.monotonic() - self.polled >= POLL_SECONDS and (self.poll is None or self.poll.done()):
                self.polled = time.monotonic()
                self.poll = asyncio.create_task(self._follow())
            return self.reader
        return await self._follow()

    async def _follow(self) -> IndexReader:
        """Open the version `current` points to when it is not the one open (see `current`)."""
        try:
            now = await asyncio.to_thread(_resolve_at_once, self.out) if is_uri(str(self.out)) \
                else resolve_index_dir(self.out)
        except EmbedctlError as exc:
            if self.reader is None:
                raise
            LOG.debug("index %s: %s; still serving %s", self.name, exc, self.reader.dir.name)
            now = None  # current is being swapped or was removed, or the store does not answer: keep serving
        if self.reader is not None and (now is None or now == self.reader.dir or str(now) == self.failed):
            return self.reader
        async with self.lock:
            if self.reader is None or (now is not None and now != self.reader.dir and str(now) != self.failed):
                try:
                    reader = await asyncio.to_thread(self.open)
                except EmbedctlError as exc:
                    if self.reader is None:
                        raise
                    LOG.error("index %s: cannot open %s (%s); still serving %s", self.name, now, exc,
                              self.reader.dir.name)
                    self.failed = str(now)
                else:
                    if self.reader is not None:
                        LOG.info("index %s: now serving %s (was %s)", self.name, reader.dir.name,
                                 self.reader.dir.name)
                        self.reloads += 1
                    self.reader, self.failed = reader, None
        return self.reader


def _resolve_at_once(out: str):
    """`resolve_index_dir` of a remote index without waiting out a store that does not answer (a server polls again
    in `POLL_SECONDS`)."""
    from embedctl.pipeline import s3

    with s3.at_once():
        return resolve_index_dir(out)


class ServedIndexes:
    """Index folders by name, checked at start-up against the served model."""

    def __init__(self, folders: list[Path] | tuple[str, ...], verify: bool = True):
        self.by_name = {name: ServedIndex(name, folder, verify) for name, folder in index_names(folders).items()}

    def names(self) -> list[str]:
        return list(self.by_name)

    def get(self, name: str) -> ServedIndex:
        try:
            return self.by_name[name]
        except KeyError:
            served = ", ".join(self.by_name) or "none"
            raise UnknownIndex(f"no index named {name!r} is served here (served: {served})") from None

    async def load(self, fingerprint: str, model: str) -> None:
        """Open every index (refused when another model built it)."""
        for index in self.by_name.values():
            index.model = (fingerprint, model)
            await index.current()

