"""Files on disk: atomic writes (a reader sees the old file or the complete new one, never a part), private
modes, and the one place where OS errors at the file boundary become the project's errors, with the path and a
remedy. Output folders are read and written through `pipeline.storage` (whose local backend uses these); the writers
(`json_writer`, `npy_writer`) are what a format module hands to `Storage.write`.

Everything embedctl creates is private whatever the umask: folders 0700, files 0600 (`make_dirs`,
`private_opener`, and `atomic_write`'s mkstemp). Under a permissive umask (000) a plain mkdir or open would let
another local user delete or replace an index's files, or append to its history."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from embedctl.pipeline.errors import StorageError

DIR_MODE = 0o700
"""Mode of every folder embedctl creates."""
FILE_MODE = 0o600
"""Mode of every file embedctl creates."""

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM)


def storage_error(exc: OSError, path: Path | str, action: str = "write") -> StorageError:
    """An OS error on `path` as one line: what failed, where, and what to do."""
    code = exc.errno
    if code is None and "No space left" in str(exc):  # pyarrow's and faiss's errors carry the text, not the code
        code = errno.ENOSPC
    if code in _NO_SPACE:
        return StorageError(f"no space left on the device of {path} (while trying to {action} it); free space, then "
                            "run the same command again (complete chunks and the published version are kept)")
    if code in _DENIED:
        return StorageError(f"permission denied to {action} {path}; fix the owner or mode of the file or its folder")
    if code == errno.EROFS:
        return StorageError(f"cannot {action} {path}: the filesystem is read-only; give a writable --out")
    reason = exc.strerror or str(exc)
    return StorageError(f"cannot {action} {path} ({reason}); check the disk and the folder, then run again")


def make_dirs(path: Path | str) -> Path:
    """Create `path` and its missing parents, each 0700 whatever the umask; folders that exist keep their mode
    (the user's own --out parent is not ours to change). Returns `path`."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.parent != path:
        make_dirs(path.parent)
    try:
        os.mkdir(path, DIR_MODE)  # the umask only takes bits away: never more open than 0700
    except FileExistsError:
        if not path.is_dir():
            raise
        return path  # another process made it first, with this same function
    if os.stat(path).st_mode & DIR_MODE != DIR_MODE:  # a umask that took the owner's own bits (0o277)
        os.chmod(path, DIR_MODE)
    return path


def private_opener(path: str, flags: int) -> int:
    """`open(path, mode, opener=private_opener)`: a file it creates is 0600 whatever the umask (one that exists
    keeps its mode)."""
    return os.open(path, flags, FILE_MODE)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None],
                 before_replace: Callable[[Path], None] | None = None) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it to `path`.

    `before_replace(tmp)` runs between the fsync and the rename (the chunk store records the file's checksum
    there). An OS error (disk full, permission denied) becomes a StorageError naming `path`; the temporary file is
    removed whatever happens.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        make_dirs(path.parent)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fchmod(fh.fileno(), FILE_MODE)  # mkstemp's 0600, even if `write` replaced the file with its own
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise storage_error(exc, path) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path


def json_writer(data: dict) -> Callable[[Path], None]:
    """A writer of `data` as indented JSON into the file it is given."""
    return lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_json(path: Path, data: dict) -> Path:
    """Write `data` as indented JSON, atomically."""
    return atomic_write(path, json_writer(data))


def npy_writer(array) -> Callable[[Path], None]:
    """A writer of `array` as a `.npy` file (np.save's bytes) into the file it is given. The bytes are written by
    Python rather than numpy's fwrite: a short fwrite (a full disk) raises an OSError without errno ("76800
    requested and 44992 written") that cannot be told from other failures, while Python's write raises ENOSPC,
    which `atomic_write` reports as a full disk naming the file."""
    import numpy as np

    array = np.ascontiguousarray(array)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to a temporary name
            np.lib.format.write_array_header_1_0(fh, np.lib.format.header_data_from_array_1_0(array))
            fh.write(array.data)

    return write

