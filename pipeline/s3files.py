"""Corpus files that are S3 objects: which objects an `s3://` corpus names, and a seekable read-only file over one.

pyarrow opens an object through `ObjectFile` (wrapped in `pyarrow.PythonFile`), so a Parquet reader fetches the
footer and the row groups it reads by ranged GETs through the process's one boto3 client (`pipeline.s3`): a chunk
task reads its rows and the footer, never the whole object. `pyarrow.fs.S3FileSystem` is not used: it reads
AWS_ENDPOINT_URL and AWS_PROFILE differently from boto3, and two clients would mean two sets of settings.
"""

from __future__ import annotations

import fnmatch
import glob
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from embedctl.pipeline.errors import CorpusError
from embedctl.pipeline.s3 import SCHEME, Replaced, S3Storage, call, client, split_uri

READ_AHEAD = 1 << 20
"""Bytes fetched at least per GET: pyarrow issues many small reads (page headers, the footer's length)."""
TAIL = 64 << 10
"""Bytes fetched by a read near the end: the footer's length and the footer (pyarrow's own first footer read)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or a HEAD says of one object."""

    uri: str
    size: int
    mtime_ns: int
    etag: str


class ObjectFile(io.RawIOBase):
    """A read-only, seekable file over one object, read by ranged GETs with a read-ahead buffer.

    A read in the last `TAIL` bytes fetches all of them, so the footer's length and the footer that pyarrow then
    asks for come from one GET (and a reader that wants only the footer does not download a read-ahead). With
    `etag` (the plan's), every GET is pinned to that version of the object: one replaced while it is read is an
    error, never a mix of two versions' row groups.
    """

    def __init__(self, uri: str, size: int, read_ahead: int = READ_AHEAD, etag: str = ""):
        super().__init__()
        bucket, self.key = split_uri(uri)
        self.uri, self.size, self.read_ahead, self.etag = uri, size, read_ahead, etag
        self._storage = S3Storage(f"{SCHEME}{bucket}")
        self._pos = 0
        self._buffer, self._buffer_start = b"", 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"cannot seek to {base + offset} in {self.uri}")
        self._pos = base + offset
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self._pos + size, self.size)
        if end <= self._pos:
            return b""
        data = self._cached(self._pos, end)
        if data is None:
            data = self._fetch(self._pos, end)
        self._pos = end
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def _cached(self, start: int, end: int) -> bytes | None:
        """Bytes [start, end) when the buffer holds all of them."""
        lo, hi = start - self._buffer_start, end - self._buffer_start
        if lo >= 0 and hi <= len(self._buffer):
            return self._buffer[lo:hi]
        return None

    def _fetch(self, start: int, end: int) -> bytes:
        """GET bytes [start, end), or a READ_AHEAD window around them when that is larger (kept as the buffer)."""
        if end - start >= self.read_ahead:
            return self._get(start, end - start)  # a column chunk read whole: keeping it would only cost memory
        tail = max(0, self.size - TAIL)
        window = tail if start >= tail else start
        self._buffer = self._get(window, min(self.size, window + max(self.read_ahead, end - window)) - window)
        self._buffer_start = window
        return self._buffer[start - window:end - window]

    def _get(self, start: int, length: int) -> bytes:
        try:
            data = self._storage.read_range(self.key, start, length, etag=self.etag)
        except Replaced:
            raise CorpusError(f"corpus object {self.uri} was replaced since the job was planned (its ETag changed); run "
                              "the same command again: it plans the corpus as it is now") from None
        except FileNotFoundError:
            raise CorpusError(f"corpus object {self.uri} is gone (deleted after it was listed); run the same command "
                              "again: it plans the corpus as it is now") from None
        if len(data) != length:  # replaced by a shorter object while open
            raise CorpusError(f"{self.uri} is shorter than the {self.size} bytes planned (it was replaced while being "
                              "read); run the same command again")
        return data


def head(uri: str) -> ObjectInfo | None:
    """The object `uri` as it is now (one HEAD); None when there is none."""
    bucket, key = split_uri(uri)
    if not key:
        return None
    try:
        reply = call(uri, "read", lambda: client().head_object(Bucket=bucket, Key=key))
    except FileNotFoundError:
        return None
    return ObjectInfo(uri, int(reply["ContentLength"]), _ns(reply["LastModified"]), reply["ETag"])


def discover_objects(source: str) -> list[ObjectInfo]:
    """The Parquet objects named by `source`, in the order of their keys' parts (a local corpus's order, so that the
    same files number their rows alike here and there), with what the listing says of them.

    `s3://bucket/file.parquet` is that object; `s3://bucket/prefix/` (or a prefix that names no object) is every
    `*.parquet` object below it; a glob (`*`, `?`, `[...]`) matches keys part by part, as a local glob matches paths
    (`*` stays within one part, `**` spans any number of them).
    """
    bucket, key = split_uri(source)
    if glob.has_magic(key):
        literal = key[:min(key.index(c) for c in "*?[" if c in key)]
        parts = key.split("/")
        found = _sorted(o for o in _listing(bucket, literal) if _glob_match(parts, _key_of(o).split("/")))
        if not found:
            raise CorpusError(f"no objects match {source!r}; check the pattern (quote it so the shell does not "
                              "expand it)")
        return found
    if key and not source.endswith("/") and (single := head(source)) is not None:
        return [single]
    below = f"{key}/" if key else ""
    found = _sorted(o for o in _listing(bucket, below) if o.uri.endswith(".parquet"))
    if not found:
        raise CorpusError(f"no *.parquet objects at or below {source!r}; point the corpus at Parquet objects "
                          "(s3://BUCKET/PREFIX/, s3://BUCKET/FILE.parquet or s3://BUCKET/DIR/*.parquet)")
    return found


def _listing(bucket: str, prefix: str) -> Iterator[ObjectInfo]:
    """Every object whose key starts with `prefix` (any string, not only a folder), in key order."""
    uri = f"{SCHEME}{bucket}/{prefix}"
    args = {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = call(uri, "list", lambda: client().list_objects_v2(**args))
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):  # a folder marker
                yield ObjectInfo(f"{SCHEME}{bucket}/{obj['Key']}", int(obj["Size"]), _ns(obj["LastModified"]),
                                 obj["ETag"])
        if not page.get("IsTruncated"):
            return
        args["ContinuationToken"] = page["NextContinuationToken"]


def _sorted(found: Iterable[ObjectInfo]) -> list[ObjectInfo]:
    """By key part by part, as paths sort (a listing sorts by the whole key: "b-2" before "b/c", paths after)."""
    return sorted(found, key=lambda o: _key_of(o).split("/"))


def _key_of(info: ObjectInfo) -> str:
    return split_uri(info.uri)[1]


def _glob_match(pattern: list[str], parts: list[str]) -> bool:
    """Whether key parts match pattern parts: fnmatch within a part, `**` for zero or more parts."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(pattern[1:], parts[1:])


def _ns(when) -> int:
    return int(when.timestamp() * 1_000_000_000)
