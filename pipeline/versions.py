"""Index versions inside an output folder, published by an atomic pointer swap.

    OUT/versions/v000001/   a complete index version (info.json, rows.parquet, index-<dim>.faiss)
    OUT/versions/.build-*   a version being built (never read; removed by the next run when its builder died)
    OUT/current             symlink -> versions/v000001 (replaced atomically with os.replace)

A reader resolves `current` once and reads that version's files: it never sees a half-written version, and a
failed build leaves the previous version current.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from embedctl.pipeline.errors import ConfigError, IndexNotFoundError
from embedctl.pipeline.fsutil import fsync_dir, make_dirs
from embedctl.pipeline.manifest import INFO

CURRENT = "current"
VERSIONS = "versions"
BUILD_PREFIX = ".build-"
_VERSION = re.compile(r"^v(\d{6,})$")


def version_dirs(out: Path) -> list[Path]:
    """Complete versions in `out`, oldest first."""
    root = Path(out) / VERSIONS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _VERSION.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def current_version(out: Path) -> Path | None:
    """The version `out/current` points to, or None before the first publish."""
    link = Path(out) / CURRENT
    if not link.is_symlink() and not link.exists():
        return None
    target = link.resolve()
    return target if (target / INFO).is_file() else None


def new_build_dir(out: Path) -> Path:
    """A fresh private folder in which to build the next version."""
    root = make_dirs(Path(out) / VERSIONS)
    return Path(tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=root))  # 0700, and so is the version it becomes


def remove_dead_builds(out: Path, idle_seconds: float) -> list[str]:
    """Remove build folders nothing wrote into for `idle_seconds` (their builder died); returns their names.

    The run lifecycle calls this while it holds the output folder's lock, so no live run of this folder is
    building an older folder; the idle time spares a build that a run of the other mode may still be writing.
    """
    root = Path(out) / VERSIONS
    removed = []
    for path in root.glob(f"{BUILD_PREFIX}*") if root.is_dir() else []:
        try:
            newest = max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.iterdir()])
        except OSError:
            continue
        if time.time() - newest >= idle_seconds:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def publish(out: Path, build_dir: Path) -> Path:
    """Move a complete build to the next version number and point `current` at it, atomically."""
    out = Path(out)
    root = out / VERSIONS
    while True:
        existing = version_dirs(out)
        number = int(_VERSION.match(existing[-1].name).group(1)) + 1 if existing else 1
        target = root / f"v{number:06d}"
        try:
            os.rename(build_dir, target)  # fails if another publisher took the number: try the next
            break
        except OSError:
            if not target.exists():
                raise
    fsync_dir(root)
    tmp_link = out / f".{CURRENT}.{os.getpid()}.tmp"
    tmp_link.unlink(missing_ok=True)
    os.symlink(os.path.join(VERSIONS, target.name), tmp_link)
    os.replace(tmp_link, out / CURRENT)
    fsync_dir(out)
    return target


def prune(out: Path, keep: int) -> list[str]:
    """Remove the oldest versions beyond the newest `keep`, never the current one; returns the removed names."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep!r}")
    current = current_version(out)
    removed = []
    for path in version_dirs(out)[:-keep]:
        if current is not None and path.resolve() == current:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def discard(build_dir: Path) -> None:
    """Remove an unfinished build."""
    shutil.rmtree(build_dir, ignore_errors=True)


def index_names(folders) -> dict[str, Path]:
    """The name each index folder is served and searched by (its folder name), refusing two of one name."""
    names: dict[str, Path] = {}
    for folder in map(Path, folders):
        name = folder.resolve().name
        if name in names:
            raise ConfigError(f"two indexes are named {name!r} ({names[name]} and {folder}); serve folders with "
                              "different names")
        names[name] = folder
    return names


def resolve_index_dir(path: Path) -> Path:
    """The version folder to read for `path`: an output folder (its current version) or a version folder."""
    path = Path(path).expanduser()
    if (path / INFO).is_file():
        return path.resolve()
    if not path.exists():
        raise IndexNotFoundError(f"index folder {str(path)!r} does not exist; build one with `embedctl index`")
    version = current_version(path)
    link = path / CURRENT
    if version is None and link.is_symlink() and link.resolve().is_dir():
        return link.resolve()  # a version folder whose info.json is damaged: reading it says so
    if version is None and link.is_symlink():
        raise IndexNotFoundError(f"{link} points to {os.readlink(link)}, which is missing or incomplete; point it "
                                 f"at a complete version (ln -sfn versions/vNNNNNN {link}) or run `embedctl index` "
                                 "again")
    if version is None:
        raise IndexNotFoundError(f"{str(path)!r} holds no published index yet; run `embedctl index CORPUS --out "
                                 f"{path}` (or wait for the running job to finish)")
    return version


def live_ids(version_dir: Path):
    """The ids a version holds (live rows of all its segments), as one Arrow array."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embedctl.pipeline.manifest import read_deletions, read_info

    info = read_info(version_dir)
    out = Path(version_dir).parent.parent
    parts = []
    for ref in info.segments:
        ids = pq.read_table(ref.folder(out) / "rows.parquet", columns=["id"]).column("id").combine_chunks()
        deleted = read_deletions(version_dir, info, ref)
        if len(deleted):
            live = np.ones(ref.rows, dtype=bool)
            live[deleted] = False
            ids = ids.filter(pa.array(live))
        parts.append(ids)
    return pa.concat_arrays(parts) if parts else pa.array([], pa.string())


def segments_of_kept_versions(out: Path) -> set[str] | None:
    """The segment ids the versions in `out` use (None when one of them cannot be read: keep everything)."""
    from embedctl.pipeline.errors import StorageError
    from embedctl.pipeline.manifest import read_info

    found: set[str] = set()
    for path in version_dirs(out):
        try:
            found.update(s.id for s in read_info(path).segments)
        except StorageError:
            return None
    return found
