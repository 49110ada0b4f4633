"""Index versions inside an output folder, published by an atomic pointer swap (the one owner of `versions/` and
`current`).

    OUT/versions/v000001/   a complete index version (info.json, deletion sets)
    OUT/versions/.build-*   a version being built (never read; removed by the next run when its builder died)
    OUT/current             the pointer to the current version: a symlink -> versions/v000001, swapped with the
                            storage's compare-and-swap (locally: os.replace under a lock)

A reader resolves `current` once and reads that version's files: it never sees a half-written version, and a
failed build leaves the previous version current. Every file operation goes through the output folder's
`pipeline.storage.Storage`; the functions that take or return paths serve callers that work with local folders.
"""

from __future__ import annotations

import posixpath
import re
import time
from pathlib import Path

from embedctl.pipeline.errors import ConfigError, IndexNotFoundError, StorageError
from embedctl.pipeline.storage import (
    Folder,
    LocalStorage,
    Pointer,
    Storage,
    declare_immutable,
    grandparent,
    is_uri,
    join,
    storage_of,
)

CURRENT = "current"
VERSIONS = "versions"
BUILD_PREFIX = ".build-"
_VERSION = re.compile(r"^v(\d{6,})$")
declare_immutable(f"{VERSIONS}/v")  # a version's files are written once, under the name its commit took


def version_folder(path: Path | str | Folder) -> Folder:
    """The storage and key of a version folder given by its path (OUT/versions/<name>: the layout this module
    owns), for the callers that hold a path."""
    if isinstance(path, Folder):
        return path
    path = Path(path)
    return Folder(LocalStorage(grandparent(path)), join(VERSIONS, path.name))


def version_names(storage: Storage) -> list[str]:
    """Names of the complete versions, oldest first."""
    found = [(int(m.group(1)), e.name) for e in storage.list(VERSIONS) if e.folder and (m := _VERSION.match(e.name))]
    return [name for _, name in sorted(found)]


def version_dirs(out: Path | str) -> list[Path | Folder]:
    """Complete versions in `out`, oldest first (local paths; folders of the store when `out` is remote)."""
    storage = storage_of(out)
    return [_ref(Folder(storage, join(VERSIONS, name))) for name in version_names(storage)]


def version_ref(out: Path | str, name: str) -> Path | Folder:
    """The version `name` of `out` (whether or not it exists), as `version_dirs` gives versions."""
    return _ref(Folder(storage_of(out), join(VERSIONS, name)))


def _ref(folder: Folder) -> Path | Folder:
    """A version or build folder as its callers take it: a local path, or the folder itself on an object store."""
    return folder.path if isinstance(folder.storage, LocalStorage) else folder


def read_current(storage: Storage) -> Pointer | None:
    """The `current` pointer of an output folder (its value: the key of a version), None before the first
    publish."""
    return storage.read_pointer(CURRENT)


def current_name(out: Path | str | Storage) -> str | None:
    """The name of the version `current` names, complete or not (None: no pointer): what a publish expects to still
    find there (`publish`'s `after`)."""
    pointer = read_current(storage_of(out))
    return posixpath.normpath(pointer.value).rsplit("/", 1)[-1] if pointer else None


def pointed_folder(storage: Storage, pointer: Pointer) -> Folder | None:
    """The folder a pointer names (None when it names nothing inside the output folder)."""
    key = posixpath.normpath(pointer.value)
    if key.startswith(("/", "..")) or key == ".":
        return None
    return Folder(storage, key)


def pointed_version(storage: Storage) -> tuple[Pointer | None, Folder | None]:
    """The `current` pointer and the version folder it names when that folder exists (complete or not: a reader
    of its info.json says what is wrong with it)."""
    pointer = read_current(storage)
    folder = pointed_folder(storage, pointer) if pointer else None
    return pointer, folder if folder is not None and storage.is_folder(folder.key) else None


def current_folder(storage: Storage) -> Folder | None:
    """The version `current` points to when it is complete (has its manifest), else None."""
    from embedctl.pipeline.manifest import INFO

    pointer = read_current(storage)
    folder = pointed_folder(storage, pointer) if pointer else None
    return folder if folder is not None and storage.exists(folder.child(INFO)) else None


def current_version(out: Path | str) -> Path | Folder | None:
    """The version `out/current` points to, or None before the first publish."""
    folder = current_folder(storage_of(out))
    if folder is None:
        return None
    return folder.path.resolve() if isinstance(folder.storage, LocalStorage) else folder


def new_build_dir(out: Path | str) -> Path | Folder:
    """A fresh private folder in which to build the next version."""
    storage = storage_of(out)
    return _ref(Folder(storage, storage.staging(VERSIONS, BUILD_PREFIX)))  # 0700, and so is the version it becomes


def remove_dead_builds(out: Path, idle_seconds: float) -> list[str]:
    """Remove build folders nothing wrote into for `idle_seconds` (their builder died); returns their names.

    The run lifecycle calls this while it holds the output folder's lock, so no live run of this folder is
    building an older folder; the idle time spares a build that a run of the other mode may still be writing.
    """
    storage = storage_of(out)
    removed = []
    for entry in storage.list(VERSIONS):
        if not entry.name.startswith(BUILD_PREFIX):
            continue
        stats = [storage.stat(entry.key)] + [storage.stat(e.key) for e in storage.list(entry.key)]
        if any(st is None for st in stats):
            continue
        if time.time() - max(st.mtime for st in stats) >= idle_seconds:
            storage.delete(entry.key)
            removed.append(entry.name)
    return removed


class PublishConflict(StorageError):
    """Another run published a version since this one planned its build: committing would drop that version's
    changes, so this run does not publish (its vectors and segments are kept for the next run)."""


def publish(out: Path | str, build_dir: Path | Folder, after: str | None = "") -> Path | Folder:
    """Move a complete build to the next version number and point `current` at it, atomically.

    `after`: the version that was current when the build was planned (None: there was none); the publish fails with
    PublishConflict when `current` moved since, whoever moved it. "" checks nothing."""
    from embedctl.pipeline.manifest import INFO

    storage = storage_of(out)
    staged = join(VERSIONS, build_dir.name)
    if after != "":
        _still_current(storage, after)
    while True:
        existing = version_names(storage)
        number = int(_VERSION.match(existing[-1]).group(1)) + 1 if existing else 1
        target = join(VERSIONS, f"v{number:06d}")
        if storage.rename(staged, target, commit=INFO):  # False when another publisher took the number: try the next
            break
    while True:  # without `after`, the newest publish wins, as it did when the pointer was replaced without a compare
        pointer = read_current(storage)
        if pointer is not None and posixpath.normpath(pointer.value) == target:
            return _ref(Folder(storage, target))  # our swap landed though its answer was lost (a retried request)
        if after != "":
            try:
                _still_current(storage, after, pointer)
            except PublishConflict:
                storage.delete(target)  # committed under its number but never current: nobody reads it
                raise
        if storage.compare_and_swap(CURRENT, pointer.token if pointer else None, target):
            return _ref(Folder(storage, target))


def _still_current(storage: Storage, expected: str | None, pointer: Pointer | None = None) -> None:
    """Raise PublishConflict unless `current` names the version `expected` (None: there is no `current`)."""
    pointer = pointer if pointer is not None else read_current(storage)
    found = posixpath.normpath(pointer.value).rsplit("/", 1)[-1] if pointer else None
    if found != expected:
        now, was = found or "none", expected or "none"
        raise PublishConflict(f"another run published {now} to {storage.root} while this run built on {was}: this "
                              "run did not publish, so that version's changes are not overwritten; run the command "
                              "again (its vectors are kept: only what changed is embedded)")


def prune(out: Path, keep: int) -> list[str]:
    """Remove the oldest versions beyond the newest `keep`, never the current one; returns the removed names."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep!r}")
    storage = storage_of(out)
    current = current_folder(storage)
    removed = []
    for name in version_names(storage)[:-keep]:
        if current is not None and join(VERSIONS, name) == current.key:
            continue
        storage.delete(join(VERSIONS, name))
        removed.append(name)
    return removed


def discard(build_dir: Path | Folder) -> None:
    """Remove an unfinished build."""
    folder = version_folder(build_dir)
    folder.storage.delete(folder.key)


def index_names(folders) -> dict[str, Path]:
    """The name each index folder is served and searched by (its folder name), refusing two of one name."""
    names: dict[str, Path] = {}
    for folder in folders:
        name = str(folder).rstrip("/").rsplit("/", 1)[-1] if is_uri(str(folder)) else Path(folder).resolve().name
        if name in names:
            raise ConfigError(f"two indexes are named {name!r} ({names[name]} and {folder}); serve folders with "
                              "different names")
        names[name] = folder
    return names


def resolve_index_dir(path: Path | str) -> Path | Folder:
    """The version folder to read for `path`: an output folder (its current version) or a version folder; a local
    path, or a folder of an object store when `path` is a URI (`pipeline.s3`)."""
    from embedctl.pipeline.manifest import INFO

    if is_uri(str(path)):
        return _resolve_remote(storage_of(str(path)))
    path = Path(path).expanduser()
    storage = LocalStorage(path)
    if storage.exists(INFO):
        return path.resolve()
    if not path.exists():
        raise IndexNotFoundError(f"index folder {str(path)!r} does not exist; build one with `embedctl index`")
    version = current_folder(storage)
    if version is not None:
        return version.path.resolve()
    pointer, pointed = pointed_version(storage)
    if pointed is not None:
        return pointed.path.resolve()  # a version folder whose info.json is damaged: reading it says so
    link = storage.describe(CURRENT)
    if pointer is not None:
        raise IndexNotFoundError(f"{link} points to {pointer.value}, which is missing or incomplete; point it "
                                 f"at a complete version (ln -sfn versions/vNNNNNN {link}) or run `embedctl index` "
                                 "again")
    raise IndexNotFoundError(f"{str(path)!r} holds no published index yet; run `embedctl index CORPUS --out "
                             f"{path}` (or wait for the running job to finish)")


def _resolve_remote(storage: Storage) -> Folder:
    """The current version of an output folder on an object store (read once: a reader never mixes versions)."""
    from embedctl.pipeline.manifest import INFO

    pointer = read_current(storage)
    folder = pointed_folder(storage, pointer) if pointer else None
    if folder is not None and storage.exists(folder.child(INFO)):
        return folder
    if pointer is not None:
        raise IndexNotFoundError(f"{storage.describe(CURRENT)} points to {pointer.value}, which is missing or "
                                 "incomplete; run `embedctl index` again")
    raise IndexNotFoundError(f"{storage.root} holds no published index yet; run `embedctl index CORPUS --out "
                             f"{storage.root}` (or wait for the running job to finish)")


def live_ids(version_dir: Path):
    """The ids a version holds (live rows of all its segments), as one Arrow array."""
    import numpy as np
    import pyarrow as pa

    from embedctl.pipeline.manifest import read_deletions, read_info
    from embedctl.pipeline.segments import read_ids

    version = version_folder(version_dir)
    info = read_info(version)
    parts = []
    for ref in info.segments:
        ids = read_ids(version.storage, ref.prefix)
        deleted = read_deletions(version, info, ref)
        if len(deleted):
            live = np.ones(ref.rows, dtype=bool)
            live[deleted] = False
            ids = ids.filter(pa.array(live))
        parts.append(ids)
    return pa.concat_arrays(parts) if parts else pa.array([], pa.string())


def segments_of_kept_versions(out: Path) -> set[str] | None:
    """The segment ids the versions in `out` use (None when one of them cannot be read: keep everything)."""
    from embedctl.pipeline.errors import StorageError
    from embedctl.pipeline.manifest import INFO, read_info

    storage = storage_of(out)
    found: set[str] = set()
    for name in version_names(storage):
        if not isinstance(storage, LocalStorage) and not storage.exists(join(VERSIONS, name, INFO)):
            continue  # on a store: a copy its publisher never committed (it died, or lost the number), not a version
        try:
            found.update(s.id for s in read_info(Folder(storage, join(VERSIONS, name))).segments)
        except StorageError:
            return None
    return found
