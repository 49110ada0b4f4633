"""The storage of an output folder: every read, write, listing, rename and delete of its files goes through a
`Storage`, so that the format modules (`pipeline.versions`, `manifest`, `segments`, `deletions`, `vectors`,
`compose`, `checksum`, `index`) never touch a filesystem themselves.

A key is a path relative to the output folder, with `/` between its parts (`versions/v000001/info.json`,
`segments/<id>/rows.parquet`); a prefix is a key that names a folder. The interface is the one an object store
offers, so that a remote backend (S3 and compatibles) fits behind it without changing a format module:

- immutable objects under unique keys: `put` (bytes or a local file), `write` (a library writes a local file that
  becomes the object), `read_bytes`, `read_range` (a ranged read), `stat` (size, mtime and a version token),
  `list` (one level, like a listing with a delimiter), `delete`;
- a conditional create (`create_if_absent`: the second create of a key fails) and a compare-and-swap of a pointer
  (`read_pointer`, `compare_and_swap`: the swap fails when the pointer changed since its token was read), which is
  how a version is committed;
- `local_path(key)`: a real file for libraries that open paths (faiss.read_index with mmap flags, pyarrow, numpy
  mmap); a remote backend returns a local cache copy, kept by key (objects are immutable);
- `append(key, data)` and `read_appended(key)`: an append-only log (the run history). An object cannot be
  appended to: a remote backend stores each appended record as an object of its own under the prefix `key + "/"`,
  named so that names sort in the order of the appends (UTC time, then a unique suffix), and `read_appended`
  returns the bytes of an object `key` written before (a log kept as one file) followed by those records in
  order; the local backend appends to the file itself;
- `touch(key)`: gives an existing object a new mtime (a heartbeat); a remote backend writes the same bytes again;
- `rename(src, dst, commit)`: publishes a staged folder under a new name unless that name is taken; a remote
  backend copies the other objects, then creates `commit` (the version's manifest) with `create_if_absent`, which
  is what makes the folder a version (a reader asks for the manifest, never for the folder alone).

`LocalStorage` keeps today's layout and semantics: atomic writes (temporary file, fsync, rename), private modes
(`pipeline.fsutil`), appends of one line at a time to a 0600 file opened for append (an append that small is
atomic; no lock), a pointer that is a symlink replaced with `os.replace`, and an `flock` on the output folder
around a compare-and-swap.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from embedctl.pipeline.fsutil import atomic_write, fsync_dir, make_dirs, private_opener, storage_error

Writer = Callable[[Path], None]
"""Writes an object's bytes into the local file it is given (pyarrow, faiss and numpy write files)."""


@dataclass(frozen=True)
class Stat:
    """What `Storage.stat` says of an object."""

    size: int
    mtime: float  # Unix time of the last write
    token: str  # changes whenever the object is replaced (local: mtime, ctime and inode; S3: the ETag)


@dataclass(frozen=True)
class Entry:
    """One entry of a listing: an object, or a folder (a prefix that has objects below it)."""

    name: str  # the last part of the key
    key: str
    folder: bool


@dataclass(frozen=True)
class Pointer:
    """The value of a pointer (`current`: the key prefix of a version) and the token to swap it with."""

    value: str
    token: str


IMMUTABLE: set[str] = set()
"""Key prefixes whose objects are written once and never replaced, declared by their format owners
(`declare_immutable`): a remote backend trusts its cached copies of them without asking the store again."""


def declare_immutable(prefix: str) -> None:
    IMMUTABLE.add(prefix)


def is_immutable(key: str) -> bool:
    from embedctl.pipeline import segments, versions  # noqa: F401 - the owners declare their prefixes on import

    return key.startswith(tuple(IMMUTABLE))


POINTER_LOCK = ".embedctl.pointer.lock"
"""The lock file of a local folder's pointer swaps (`LocalStorage.compare_and_swap`)."""


def join(*parts: str) -> str:
    """A key from parts (empty parts are left out)."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Storage(ABC):
    """The storage of one output folder, addressed by keys relative to it (see the module doc)."""

    @property
    @abstractmethod
    def root(self) -> str:
        """Where the output folder is, as a user writes it (a folder, or an s3:// URI): for messages."""

    def describe(self, key: str = "") -> str:
        """A key as a user would find it (a path, or an s3:// URI): for messages."""
        return str(self.local_path(key)) if key else self.root

    def sub(self, prefix: str) -> Storage:
        """The storage of the folder `prefix` of this one (its keys relative to that folder)."""
        return storage_of(self.describe(prefix))

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """A local file (or folder) holding the object `key`, for libraries that open paths."""

    def drop_copy(self, key: str) -> None:
        """Forget the local copy of `key` that `local_path` made (a remote backend's cache; the next `local_path`
        fetches the object again). Nothing for a local folder, whose files are the objects."""
        return None

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The bytes of `key` (raises FileNotFoundError when it does not exist, OSError when it cannot be read)."""

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes of `key` from `start` (fewer at the end of the object)."""

    @abstractmethod
    def write(self, key: str, write: Writer, before_commit: Writer | None = None) -> Stat:
        """Create or replace `key` atomically with what `write(tmp)` writes into a local file. `before_commit(tmp)`
        runs once the bytes are durable and before they appear under `key` (the chunk store records the file's
        checksum there)."""

    def put(self, key: str, data: bytes | Path) -> Stat:
        """Store `data` (bytes, or the contents of a local file) under `key`, atomically."""
        if isinstance(data, Path):
            return self.write(key, lambda tmp: shutil.copyfile(data, tmp))
        return self.write(key, lambda tmp: tmp.write_bytes(data))

    def copy(self, src: str, dst: str) -> Stat:
        """Store a copy of the object `src` under `dst`, atomically (a remote backend copies inside the store)."""
        return self.write(dst, lambda tmp: shutil.copyfile(self.local_path(src), tmp))

    @abstractmethod
    def append(self, key: str, data: bytes) -> None:
        """Add `data` (one record, ending with a newline) at the end of the log `key`, durably; a record cut by an
        earlier crash is ended first, so that `data` starts a line of its own (see the module doc)."""

    def read_appended(self, key: str) -> bytes:
        """Everything appended to the log `key`, in order (empty when nothing was)."""
        try:
            return self.read_bytes(key)
        except FileNotFoundError:
            return b""

    def touch(self, key: str) -> None:
        """Give the existing object `key` a new mtime (raises FileNotFoundError when it does not exist)."""
        self.put(key, self.read_bytes(key))

    @abstractmethod
    def create_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` with `data` unless it exists (atomically: of two creators, one wins); False when it
        existed."""

    @abstractmethod
    def read_pointer(self, key: str) -> Pointer | None:
        """The pointer `key` (its value and swap token), None when there is none."""

    @abstractmethod
    def compare_and_swap(self, key: str, expected: str | None, value: str) -> bool:
        """Point `key` at `value` if its token is still `expected` (None: only if there is no pointer yet);
        False, changing nothing, when another writer swapped it since."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[Entry]:
        """The objects and folders directly under `prefix`, by name (empty when the prefix holds nothing)."""

    @abstractmethod
    def stat(self, key: str) -> Stat | None:
        """Size, mtime and version token of `key` (a folder: its own), None when it does not exist."""

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def is_folder(self, key: str) -> bool:
        """Whether `key` is a prefix with objects (or an empty folder) below it."""
        return any(e.name == key.rsplit("/", 1)[-1] and e.folder for e in self.list(_parent(key)))

    def walk(self, prefix: str) -> Iterator[tuple[str, Stat]]:
        """Every object below `prefix`, at any depth, with its stat."""
        for entry in self.list(prefix):
            if entry.folder:
                yield from self.walk(entry.key)
            elif (st := self.stat(entry.key)) is not None:
                yield entry.key, st

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object `key`, or everything under the prefix `key`; nothing when it does not exist."""

    @abstractmethod
    def rename(self, src: str, dst: str, commit: str | None = None) -> bool:
        """Move the folder `src` to `dst` at once, unless `dst` exists (False: nothing moved). `commit`: the name of
        the object in the folder whose creation commits the move where a folder cannot be renamed at once (an
        object store creates it last, conditionally)."""

    @abstractmethod
    def staging(self, prefix: str, name_prefix: str) -> str:
        """A new private folder under `prefix` whose name starts with `name_prefix` (unique); returns its key."""


def storage_of(out: Path | str | Storage) -> Storage:
    """The storage of an output folder given by its path, its URI (`s3://bucket/prefix`: `pipeline.s3`) or already
    open."""
    if isinstance(out, Storage):
        return out
    if is_uri(out):
        from embedctl.pipeline.s3 import S3Storage

        return S3Storage(str(out))
    return LocalStorage(Path(out))


def is_uri(location: object) -> bool:
    """Whether `location` names an object store (`s3://...`) rather than a local path."""
    return isinstance(location, str) and location.startswith("s3://")


def location(text: str | Path) -> str | Path:
    """A location a user gave (an option, a job spec field): a URI stays a string, anything else is a path."""
    return str(text) if is_uri(str(text)) else Path(text).expanduser()


def child(location: Path | str, *parts: str) -> Path | str:
    """`location` (a local path or a URI) with `parts` below it, of the same kind."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), join(*parts)]).rstrip("/")
    return Path(location).joinpath(*parts)


def parent(location: Path | str, levels: int = 1) -> Path | str:
    """The folder `levels` above `location` (a local path or a URI), of the same kind."""
    if is_uri(location):
        text = str(location).rstrip("/")
        for _ in range(levels):
            text = text.rsplit("/", 1)[0] if text.count("/") > 2 else text
        return text
    return grandparent(Path(location)) if levels == 2 else Path(location).parents[levels - 1]


def grandparent(path: Path) -> Path:
    """The output folder of a local version or segment folder (OUT/<kind>/<name>), for callers that hold its path."""
    parents = Path(path).parents
    return parents[1] if len(parents) > 1 else Path(".")


def _parent(key: str) -> str:
    return key.rsplit("/", 1)[0] if "/" in key else ""


class LocalStorage(Storage):
    """An output folder on a local (or shared POSIX) filesystem."""

    def __init__(self, root: Path | str):
        self._root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self._root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalStorage) and other._root == self._root

    def __hash__(self) -> int:
        return hash(self._root)

    @property
    def root(self) -> str:
        return str(self._root)

    def local_path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"a storage key is relative to the output folder, got {key!r}")
        return self._root / key if key else self._root

    def read_bytes(self, key: str) -> bytes:
        return self.local_path(key).read_bytes()

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"a range starts and lasts >= 0 bytes, got start {start!r}, length {length!r}")
        with open(self.local_path(key), "rb") as fh:
            fh.seek(start)
            return fh.read(length)

    def write(self, key: str, write: Writer, before_commit: Writer | None = None) -> Stat:
        path = atomic_write(self.local_path(key), write, before_replace=before_commit)
        return _stat(path)

    def append(self, key: str, data: bytes) -> None:
        path = self.local_path(key)
        try:
            make_dirs(path.parent)
            with open(path, "a+b", opener=private_opener) as fh:
                if fh.tell():  # a line cut by a crash or a full disk: start on a line of our own
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        data = b"\n" + data
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise storage_error(exc, path) from None

    def touch(self, key: str) -> None:
        os.utime(self.local_path(key))

    def create_if_absent(self, key: str, data: bytes) -> bool:
        path = self.local_path(key)
        tmp: Path | None = None
        try:
            make_dirs(path.parent)
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            tmp = Path(name)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # fails when the key exists: the create is atomic and conditional
            except FileExistsError:
                return False
            fsync_dir(path.parent)
            return True
        except OSError as exc:
            raise storage_error(exc, path) from None
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def read_pointer(self, key: str) -> Pointer | None:
        path = self.local_path(key)
        try:
            value = os.readlink(path)
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if path.exists() or path.is_symlink():  # not a symlink: a file stands where the pointer should be
                raise storage_error(exc, path, "read") from None
            return None
        token = f"{st.st_ino}-{st.st_mtime_ns}-{value}"
        if os.path.isabs(value) or ".." in Path(value).parts:  # a link a user made by hand (a rollback, say)
            target, root = Path(os.path.realpath(path.parent / value)), Path(os.path.realpath(self._root))
            if target.is_relative_to(root):  # whichever spelling of the folder (relative, through a symlink)
                value = target.relative_to(root).as_posix()
        return Pointer(value, token)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive flock on the folder's pointer lock file: a regular file opened for writing, as an NFS
        client needs for an exclusive lock (it refuses one on a folder). Not the run's lease file, which the
        publishing process holds already."""
        fd = os.open(make_dirs(self._root) / POINTER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def compare_and_swap(self, key: str, expected: str | None, value: str) -> bool:
        path = self.local_path(key)
        try:
            with self._locked():
                found = self.read_pointer(key)
                if (found.token if found else None) != expected:
                    return False
                tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
                tmp.unlink(missing_ok=True)
                os.symlink(value, tmp)
                os.replace(tmp, path)
                fsync_dir(path.parent)
                return True
        except OSError as exc:
            raise storage_error(exc, path) from None

    def list(self, prefix: str = "") -> list[Entry]:
        folder = self.local_path(prefix)
        try:
            children = sorted(folder.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [Entry(p.name, join(prefix, p.name), p.is_dir()) for p in children]

    def stat(self, key: str) -> Stat | None:
        try:
            return _stat(self.local_path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def exists(self, key: str) -> bool:
        return self.local_path(key).exists()

    def is_folder(self, key: str) -> bool:
        return self.local_path(key).is_dir()

    def delete(self, key: str) -> None:
        path = self.local_path(key)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def rename(self, src: str, dst: str, commit: str | None = None) -> bool:
        target = self.local_path(dst)
        try:
            os.rename(self.local_path(src), target)  # a folder onto an existing non-empty folder fails
        except OSError:
            if not target.exists():
                raise
            return False
        fsync_dir(target.parent)
        return True

    def staging(self, prefix: str, name_prefix: str) -> str:
        folder = make_dirs(self.local_path(prefix))
        return join(prefix, Path(tempfile.mkdtemp(prefix=name_prefix, dir=folder)).name)  # 0700


def _stat(path: Path) -> Stat:
    st = os.stat(path)
    return Stat(st.st_size, st.st_mtime, f"{st.st_mtime_ns}-{st.st_ctime_ns}-{st.st_ino}")


class Folder(NamedTuple):
    """A folder of an output folder (a version, a segment, a build): its storage and key prefix."""

    storage: Storage
    key: str

    @property
    def name(self) -> str:
        """The last part of the key (a version's name, a segment's id)."""
        return self.key.rsplit("/", 1)[-1]

    @property
    def path(self) -> Path:
        """The folder as a local path (for messages and path-based callers)."""
        return self.storage.local_path(self.key)

    def child(self, name: str) -> str:
        """The key of `name` in this folder."""
        return join(self.key, name)
