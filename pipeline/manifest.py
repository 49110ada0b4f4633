"""`info.json`: what a published index version holds and how it was made (the one owner of that file).

A version is a list of segments (`pipeline.segments`), each with the version's own deletion set: the positions of
the segment's rows that this version no longer holds (a file of the version folder, `pipeline.deletions`).
`info.json` records every file a reader opens with its size and checksum, and a checksum of its own contents.

Every reader (`embedctl info`, `query`, `eval`, the run lifecycle, `verify`, `cache prune`) goes through
`read_info`, which turns a missing, unreadable or damaged file into one line naming the file and the remedy.
Format 1 (one flat version folder, before segments) is read as one segment at the version's root.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from embedctl.pipeline.checksum import DamagedFile, Verdicts, checksum, digest_bytes, size_problem, verify
from embedctl.pipeline.deletions import deletions_file, read_positions, write_positions
from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.fsutil import json_writer
from embedctl.pipeline.segments import segment_prefix
from embedctl.pipeline.storage import Folder, LocalStorage, join
from embedctl.pipeline.versions import VERSIONS, version_folder

INFO = "info.json"
FORMAT = 2
"""Version of the info.json layout this embedctl writes (it reads 1 and 2)."""


@dataclass(frozen=True)
class CorpusInfo:
    """The corpus a version was built from."""

    source: str
    fingerprint: str
    rows: int
    text_column: str
    id_column: str | None
    files: int


@dataclass(frozen=True)
class SegmentRef:
    """A segment as one version uses it."""

    id: str
    rows: int  # rows in the segment: its index positions 0..rows-1
    files: dict  # file name (rows.parquet, index-<dim>.faiss) -> {"bytes": n, "xxh3_128": hex}
    deleted: int = 0  # positions this version no longer holds
    deletions: str | None = None  # the file of those positions in the version folder (int64 .npy)
    path: str | None = None  # where its files are, relative to the output folder (default: `segment_prefix`)

    @property
    def live(self) -> int:
        return self.rows - self.deleted

    @property
    def prefix(self) -> str:
        """The storage key of the segment's folder."""
        return segment_prefix(self.id, self.path)

    def folder(self, out: Path) -> Path:
        return LocalStorage(out).local_path(self.prefix)


@dataclass(frozen=True)
class VersionInfo:
    """The contents of a version's info.json."""

    created: str
    model: str  # as the user named it
    model_path: str
    model_fingerprint: str
    model_type: str
    pooling: str
    dim: int
    dtype: str  # the dtype the vectors were computed in (e.g. fp32, bf16; "bf16+fp32" when workers differed)
    max_length: int
    instruction_format: str  # qwen3 | raw
    document_prefix: str
    query_prefix: str
    dims: tuple[int, ...]
    rows: int  # live rows, over all segments
    hnsw: dict  # m, ef_construction, ef_search
    index_type: str
    corpus: CorpusInfo
    index_key: dict  # what a job must match to be up to date with this version
    segments: tuple[SegmentRef, ...] = ()
    segment_key: str = ""  # what a segment must match to be reused by the next build (`pipeline.compose`)
    segment_rows: int = 0
    build_seconds: dict = field(default_factory=dict)
    checksums: dict = field(default_factory=dict)  # the version folder's own files (deletion sets)
    format: int = FORMAT

    @property
    def plan_id(self) -> str:
        return self.index_key.get("plan_id", "")

    def model_ref(self):
        """The model that built this index, as it loads here: its folder while that still holds a model, else its
        name resolved again (a ModelError says it cannot be loaded here). `require_model` checks it is the same."""
        from embedctl.pipeline.errors import ModelError
        from embedctl.pipeline.models import ModelRef, resolve_model

        path = Path(self.model_path)
        if (path / "config.json").is_file() or (path / "modules.json").is_file():
            return ModelRef(self.model, path)
        try:
            return resolve_model(self.model)
        except ModelError as exc:
            raise ModelError(f"the index was built with {self.model!r}, which cannot be loaded here: {exc}") from None

    def query_prefix_for(self, instruction: str | None) -> str:
        """What goes before a query: the prefix recorded at index time, or `instruction` in the index's format."""
        if instruction is None:
            return self.query_prefix
        from embedctl.pipeline.models import format_instruction

        return format_instruction(instruction, self.instruction_format)

    def require_model(self, fingerprint: str, model: str, where: Path) -> None:
        """Refuse (one line) to embed this index's queries with another model than the one that built it."""
        if self.model_fingerprint != fingerprint:
            raise StorageError(f"{where} was built with model {self.model!r}, not {model!r}: its queries must be "
                               f"embedded by the model that built it; serve it with `--model {self.model}`")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["dims"] = list(self.dims)
        return data

    @classmethod
    def from_dict(cls, data: dict, version_dir: Path | Folder | None = None) -> VersionInfo:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("format") not in (1, FORMAT):
            raise ValueError(f"format {data.get('format')!r}, this embedctl reads formats 1 and {FORMAT}")
        if "digest" in data and data["digest"] != _digest(data):
            raise ValueError("its contents changed since it was written (checksum mismatch)")
        if data["format"] == 1:
            data = _from_format_1(data, version_dir)
        names = {f.name for f in fields(cls)}
        optional = {"build_seconds", "instruction_format", "checksums", "segments", "segment_key", "segment_rows"}
        missing = sorted(n for n in names - set(data) if n not in optional)
        if missing:
            raise ValueError(f"no {missing[0]!r}")
        values = {k: v for k, v in data.items() if k in names}
        values.setdefault("instruction_format", "qwen3")
        values["dims"] = tuple(int(d) for d in values["dims"])
        values["corpus"] = CorpusInfo(**values["corpus"])
        values["segments"] = tuple(SegmentRef(**s) for s in values.get("segments", ()))
        return cls(**values)


def _from_format_1(data: dict, version_dir: Path | Folder | None) -> dict:
    """A format-1 version (one flat folder) as one segment at the version's root."""
    name = version_dir.name if version_dir else ""
    files = {data["rows_file"]: data.get("checksums", {}).get(data["rows_file"], {})}
    files.update({f: data.get("checksums", {}).get(f, {}) for f in data["files"].values()})
    segment = {"id": f"{name}-flat", "rows": data["rows"], "files": files, "path": join(VERSIONS, name)}
    return {**{k: v for k, v in data.items() if k not in ("files", "rows_file", "checksums")},
            "segments": [segment], "format": FORMAT}


def _remedy(version: Folder) -> str:
    return f"repair the index with `embedctl verify {version.storage.root} --repair`"


def read_info(version_dir: Path | Folder) -> VersionInfo:
    """The info of the version in `version_dir`; raises DamagedFile (one line) when it is missing or damaged."""
    version = version_folder(version_dir)
    path = version.storage.describe(version.child(INFO))
    remedy = f"{_remedy(version)}, or point `current` at an earlier version"
    try:
        return VersionInfo.from_dict(json.loads(version.storage.read_bytes(version.child(INFO))), version)
    except FileNotFoundError:
        raise DamagedFile(path, "missing", remedy) from None
    except OSError as exc:
        raise DamagedFile(path, f"cannot be read: {exc.strerror}", remedy) from None
    except (ValueError, TypeError, KeyError) as exc:
        problem = str(exc) if "checksum mismatch" in str(exc) else f"not a valid info.json: {exc}"
        raise DamagedFile(path, problem, remedy) from None


def _digest(data: dict) -> str:
    """The checksum of an info.json's contents (all but the `digest` field itself), as canonical JSON."""
    body = {k: v for k, v in data.items() if k != "digest"}
    return digest_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_info(version_dir: Path | Folder, info: VersionInfo) -> Path:
    """Write info.json into a version folder being built (atomically), with the checksum of its contents."""
    version = version_folder(version_dir)
    data = info.to_dict()
    version.storage.write(version.child(INFO), json_writer({**data, "digest": _digest(data)}))
    return version.storage.local_path(version.child(INFO))


def write_deletions(version_dir: Path | Folder, segment: SegmentRef,
                    deleted: np.ndarray) -> tuple[SegmentRef, dict]:
    """Write a version's deletion set of `segment` (sorted positions); returns the segment as the version uses it
    and the file's checksum (none written when nothing is deleted)."""
    version = version_folder(version_dir)
    deleted = np.unique(np.asarray(deleted, dtype=np.int64))
    if not len(deleted):
        return replace(segment, deleted=0, deletions=None), {}
    name = deletions_file(segment.id)
    write_positions(version.storage, version.child(name), deleted)
    return replace(segment, deleted=len(deleted), deletions=name), {
        name: checksum(version.storage.local_path(version.child(name)))}


def read_deletions(version_dir: Path | Folder, info: VersionInfo, segment: SegmentRef,
                   check: bool = True) -> np.ndarray:
    """The positions of `segment` that the version deleted (checked against their checksum)."""
    if not segment.deletions:
        return np.zeros(0, dtype=np.int64)
    version = version_folder(version_dir)
    key = version.child(segment.deletions)
    path, shown = version.storage.local_path(key), version.storage.describe(key)
    if check:
        verify(path, info.checksums.get(segment.deletions), _remedy(version), shown)
    deleted = read_positions(version.storage, key)
    if deleted.dtype != np.int64 or len(deleted) != segment.deleted:
        raise DamagedFile(path, "not the deletion set the version recorded", _remedy(version), shown)
    return deleted


def version_files(version_dir: Path | Folder, info: VersionInfo):
    """(segment or None for the version's own files, local path, recorded checksum) of each file of a version."""
    version = version_folder(version_dir)
    storage = version.storage
    for name, expected in sorted(info.checksums.items()):
        yield None, storage.local_path(version.child(name)), expected
    for ref in info.segments:
        for name, expected in sorted(ref.files.items()):
            yield ref, storage.local_path(join(ref.prefix, name)), expected


def _remote_problems(version: Path | Folder, info: VersionInfo) -> list[tuple[SegmentRef | None, str, str]]:
    """Missing or resized objects of a version on an object store (no object is downloaded: a reader checks each
    file's checksum when it caches it)."""
    version = version_folder(version)
    storage = version.storage
    keys = [(None, version.child(name), expected) for name, expected in sorted(info.checksums.items())]
    keys += [(ref, join(ref.prefix, name), expected) for ref in info.segments for name, expected in
             sorted(ref.files.items())]
    found = []
    for ref, key, expected in keys:
        st = storage.stat(key)
        if st is None:
            found.append((ref, storage.describe(key), "missing"))
        elif expected and st.size != expected.get("bytes", st.size):
            found.append((ref, storage.describe(key), f"{st.size} bytes, {expected['bytes']} were written"))
    return found


def damaged_files(version: Path | Folder, info: VersionInfo,
                  contents: bool = True) -> list[tuple[SegmentRef | None, Path, str]]:
    """(segment or None for the version's own files, path, problem) of the files of a version that are missing or
    whose contents differ from their checksum. A file is read whole only when its stat changed since it last
    matched (`checksum.Verdicts`), so the check of an untouched version reads no file; `embedctl verify` reads
    them all. `contents` False: existence and sizes only (no file read, nothing written)."""
    storage = version_folder(version).storage
    if not isinstance(storage, LocalStorage):  # an object store: sizes by asking it (readers check contents)
        return _remote_problems(version, info)
    if not contents:
        return [(ref, path, p) for ref, path, expected in version_files(version, info)
                if (p := size_problem(path, expected))]
    verdicts = Verdicts(version_folder(version).storage)
    found = [(ref, path, p) for ref, path, expected in version_files(version, info)
             if (p := verdicts.problem(path, expected))]
    verdicts.save()
    return found
