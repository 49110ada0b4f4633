"""`info.json`: what a published index version holds and how it was made (the one owner of that file).

Every reader (`embedctl info`, `query`, `eval`, the run lifecycle, `cache prune`) goes through `read_info`, which
turns a missing, unreadable or damaged file into one StorageError line naming the file and the remedy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from embedctl.pipeline.checksum import DamagedFile, digest_bytes
from embedctl.pipeline.fsutil import read_json, write_json

INFO = "info.json"
FORMAT = 1
"""Version of the info.json layout this embedctl writes and reads."""


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
    rows: int
    files: dict[str, str]  # dim -> index file name
    rows_file: str
    hnsw: dict  # m, ef_construction, ef_search
    index_type: str
    corpus: CorpusInfo
    index_key: dict  # what a job must match to be up to date with this version
    build_seconds: dict = field(default_factory=dict)
    checksums: dict = field(default_factory=dict)  # file name -> {"bytes": n, "xxh3_128": hex}
    format: int = FORMAT

    @property
    def plan_id(self) -> str:
        return self.index_key.get("plan_id", "")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["dims"] = list(self.dims)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> VersionInfo:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, this embedctl reads format {FORMAT}")
        if "digest" in data and data["digest"] != _digest(data):
            raise ValueError("its contents changed since it was written (checksum mismatch)")
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names - set(data) if n not in ("build_seconds", "instruction_format", "checksums"))
        if missing:
            raise ValueError(f"no {missing[0]!r}")
        values = {k: v for k, v in data.items() if k in names}
        values.setdefault("instruction_format", "qwen3")
        values["dims"] = tuple(int(d) for d in values["dims"])
        values["corpus"] = CorpusInfo(**values["corpus"])
        return cls(**values)


def read_info(version_dir: Path) -> VersionInfo:
    """The info of the version in `version_dir`; raises DamagedFile (one line) when it is missing or damaged."""
    path = Path(version_dir) / INFO
    out = Path(version_dir).parent.parent
    remedy = f"repair the index with `embedctl verify {out} --repair`, or point `current` at an earlier version"
    try:
        return VersionInfo.from_dict(read_json(path))
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


def write_info(version_dir: Path, info: VersionInfo) -> Path:
    """Write info.json into a version folder being built (atomically), with the checksum of its contents."""
    data = info.to_dict()
    return write_json(Path(version_dir) / INFO, {**data, "digest": _digest(data)})
