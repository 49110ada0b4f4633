"""Files on disk: atomic writes (a reader sees the old file or the complete new one, never a part), and the one
place where OS errors at the file boundary become the project's errors, with the path and a remedy."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from embedctl.pipeline.errors import StorageError

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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        with open(tmp, "rb+") as fh:
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


def write_json(path: Path, data: dict) -> Path:
    """Write `data` as indented JSON, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def read_json(path: Path) -> dict:
    """Read a JSON file written by `write_json` (raises OSError or ValueError: callers say what the file is)."""
    return json.loads(Path(path).read_text())
