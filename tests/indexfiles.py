"""Where a published version's files are, for tests that open them as a user would (plain faiss, pyarrow). `out` is a
local folder or an `s3://` URI (its files are then opened from this process's cache of the store)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embedctl.pipeline import versions
from embedctl.pipeline.manifest import read_deletions, read_info
from embedctl.pipeline.storage import is_uri, join


def current(out: Path | str):
    return versions.resolve_index_dir(out if is_uri(str(out)) else Path(out))


def segment_files(out: Path, name: str) -> list[Path]:
    """The file `name` (rows.parquet, index-<dim>.faiss) of every segment of the current version."""
    version = current(out)
    return [ref.folder(Path(out)) / name for ref in read_info(version).segments]


def live_ids(out: Path | str) -> list:
    return versions.live_ids(current(out)).to_pylist()


def live_count(out: Path | str, dim: int) -> int:
    """Vectors the current version's `dim` indexes hold, less the ones it deleted (plain faiss.read_index)."""
    import faiss

    version = current(out)
    info = read_info(version)
    storage = versions.version_folder(version).storage
    total = 0
    for ref in info.segments:
        index = faiss.read_index(str(storage.local_path(join(ref.prefix, f"index-{dim}.faiss"))))
        total += index.ntotal - len(read_deletions(version, info, ref))
    return total


def deleted(out: Path) -> dict[str, np.ndarray]:
    version = current(out)
    info = read_info(version)
    return {ref.id: read_deletions(version, info, ref) for ref in info.segments}
