"""The work plan: everything the data path needs to embed a corpus and build its indexes, saved as plan.json.

A plan is made once per run (`plan_job`: corpus validated, model resolved, prefixes decided) and saved in
`OUT/work/<plan_id>/plan.json`. The embedded runner and Celery workers read that file, so every process embeds
with the same settings. `plan_id` covers what changes the vectors (corpus, model, instruction, length, dtype,
chunking): the same job on the same corpus finds its earlier chunks and resumes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from embedctl.pipeline import defaults, versions
from embedctl.pipeline.corpus import CorpusPlan, plan_corpus
from embedctl.pipeline.defaults import DEFAULT_SEGMENT_ROWS
from embedctl.pipeline.errors import ConfigError, StorageError
from embedctl.pipeline.fsutil import json_writer
from embedctl.pipeline.manifest import read_info
from embedctl.pipeline.segments import LAYOUT
from embedctl.pipeline.storage import Folder, Storage, child, is_uri, join, location, parent, storage_of
from embedctl.pipeline.vectors import ChunkStore

PLAN_FILE = "plan.json"
WORK = "work"
CHUNKS = "chunks"


def index_dims(full_dim: int, dims: Sequence[int] | None, defaults: Sequence[int] = (),
               keep_full: bool = False) -> list[int]:
    """The dims to index with HNSW, largest first: the full dim, then each of `dims` below it.

    `dims` are what the user asked for: one above the model's dim, or one given twice, is refused (an explicit
    value that cannot be honoured is never dropped silently). With `dims` None, the `defaults` below the full dim
    are used and the others left out (the defaults suit the reference model's 2560 dims). `keep_full`: index only
    `dims` (the full dim too only when listed); the full vectors are kept in each segment's vectors file all the
    same, for the funnel's re-rank.
    """
    if keep_full and not dims:
        raise ConfigError("--keep-full needs --dims: the dims whose HNSW indexes to build (e.g. --dims 128 "
                          "--keep-full: a funnel from 128 re-ranks at the full dim without a full-dim HNSW)")
    if dims is None:
        return [full_dim] + sorted({int(d) for d in defaults if d < full_dim}, reverse=True)
    bad = [d for d in dims if not isinstance(d, int) or isinstance(d, bool) or d <= 0]
    if bad:
        raise ConfigError(f"dims must be positive integers, got {bad!r}")
    above = [d for d in dims if d > full_dim]
    if above:
        raise ConfigError(f"--dims {above[0]} is above the model's dim {full_dim}; give Matryoshka dims up to "
                          f"{full_dim} (the full dim is always indexed)")
    repeated = sorted({d for d in dims if list(dims).count(d) > 1})
    if repeated:
        raise ConfigError(f"--dims lists {repeated[0]} twice; give each dim once")
    if keep_full:
        return sorted(set(dims), reverse=True)
    return [full_dim] + sorted({d for d in dims if d < full_dim}, reverse=True)


@dataclass(frozen=True)
class WorkPlan:
    """A validated, resolved job: corpus chunks, model, prefixes and index parameters."""

    out: str
    corpus: CorpusPlan
    model: str  # as the user named it
    model_path: str
    model_fingerprint: str
    model_type: str
    pooling: str
    dim: int
    dtype: str  # the --dtype setting (auto resolves per device)
    device: str
    max_length: int
    batch_tokens: int | None
    document_prefix: str
    query_prefix: str
    dims: tuple[int, ...]  # dims with an HNSW index, largest first (the full dim first unless --keep-full left it out)
    hnsw_m: int
    ef_construction: int
    ef_search: int
    index_type: str = "hnsw"
    instruction_format: str = "qwen3"  # how the prefixes above were made from instructions (qwen3 | raw)
    segment_rows: int = DEFAULT_SEGMENT_ROWS  # the most rows an index segment holds (a build setting)
    compile: str = "auto"  # torch.compile: auto | on | off (speed only: not part of the plan id)

    @property
    def plan_id(self) -> str:
        """Identity of the vectors this plan produces (not of index parameters, which only change the build)."""
        key = [self.corpus.fingerprint, self.corpus.text_column, self.corpus.id_column, self.corpus.chunk_rows,
               self.model_fingerprint, self.dtype, self.max_length, self.document_prefix]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]

    @property
    def vector_key(self) -> str:
        """What shapes a vector besides its text: vectors of equal keys and texts are interchangeable."""
        key = [self.model_fingerprint, self.dtype, self.max_length, self.document_prefix, self.pooling, self.dim]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]

    @property
    def work_dir(self) -> Path | str:
        """The work folder: a local path, or a URI when the output folder is on an object store."""
        return child(self.out, WORK, self.plan_id)

    @property
    def storage(self) -> Storage:
        """The storage of the output folder."""
        return storage_of(self.out)

    @property
    def work(self) -> Folder:
        """The work folder in the output folder's storage (what `work_dir` is as a path)."""
        return Folder(self.storage, join(WORK, self.plan_id))

    @property
    def store(self) -> ChunkStore:
        return ChunkStore(Folder(self.storage, self.work.child(CHUNKS)))

    @property
    def index_key(self) -> dict:
        """What a published version must match for the job to be up to date."""
        return {"plan_id": self.plan_id, "dims": list(self.dims), "hnsw_m": self.hnsw_m,
                "ef_construction": self.ef_construction, "query_prefix": self.query_prefix,
                "index_type": self.index_type, "segment_layout": LAYOUT}

    def to_dict(self) -> dict:
        return {**asdict(self), "corpus": self.corpus.to_dict(), "dims": list(self.dims),
                "vector_key": self.vector_key}

    @classmethod
    def from_dict(cls, data: dict) -> WorkPlan:
        data = {k: v for k, v in data.items() if k != "vector_key"}
        if isinstance(data.get("compile"), bool):  # plans written before --compile auto
            data["compile"] = "on" if data["compile"] else "off"
        return cls(**{**data, "corpus": CorpusPlan.from_dict(data["corpus"]), "dims": tuple(data["dims"])})

    def cache_sources(self) -> list[ChunkStore]:
        """Chunk stores of other plans of this output folder whose vectors this plan can reuse."""
        sources = []
        storage = self.storage
        for entry in storage.list(WORK):
            if entry.name == self.plan_id or not entry.folder:
                continue
            try:
                key = json.loads(storage.read_bytes(join(entry.key, PLAN_FILE))).get("vector_key")
            except (OSError, ValueError, AttributeError):
                continue  # no plan (or not a file), or one that cannot be read
            if key == self.vector_key:
                sources.append(ChunkStore(Folder(storage, join(entry.key, CHUNKS))))
        return sources

    def save(self) -> str:
        """Write plan.json into the work folder (idempotent); returns where it is (for messages)."""
        key = self.work.child(PLAN_FILE)
        self.storage.write(key, json_writer(self.to_dict()))
        return self.storage.describe(key)


def work_in_use(storage: Storage, names: Iterable[str]) -> set[str]:
    """`names` (work folders of the output folder in `storage`) with the work folders whose vectors files their
    chunks point at (overlay chunks, `vectors.Source`), and theirs in turn: what must be kept for them to read."""
    found: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for key in ChunkStore(Folder(storage, join(WORK, name, CHUNKS))).referenced():
            parts = key.split("/")
            if len(parts) == 4 and parts[0] == WORK and parts[2] == CHUNKS and parts[1] not in found:
                todo.append(parts[1])
    return found


def load_plan(work_dir: Path | str) -> WorkPlan:
    """Read the plan a job saved in `work_dir` (a local path or a URI)."""
    storage = storage_of(location(work_dir))  # the work folder's storage
    path = storage.describe(PLAN_FILE)
    try:
        plan = WorkPlan.from_dict(json.loads(storage.read_bytes(PLAN_FILE)))
        out = parent(location(work_dir), 2)  # OUT/work/<plan id>
        # an output folder that was moved or copied: its plans belong where they are now
        same = plan.out == out if is_uri(out) else not is_uri(plan.out) and Path(plan.out) == out
        return plan if same else replace(plan, out=str(out))
    except FileNotFoundError:
        raise StorageError(f"no plan at {path}: the job folder is missing or was removed; re-run the job") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise StorageError(f"cannot read {path} ({exc}); remove that folder and re-run the job") from None


def plan_job(spec: Any) -> WorkPlan:
    """Validate the corpus, model and options of `spec` and plan its chunks; reads no weights.

    `spec` is a `jobs.spec.JobSpec`: the pipeline reads its fields only (it never imports nor calls the jobs layer).
    """
    from embedctl.pipeline.models import read_profile, resolve_model

    out = location(spec.out)
    if not is_uri(out) and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {spec.out} is a file; give a folder (it is created when missing)")
    ref = resolve_model(spec.model)
    profile = read_profile(ref.path)
    if spec.max_length and profile.position_limit and spec.max_length > profile.position_limit:
        raise ConfigError(f"--max-length {spec.max_length} is above the {profile.position_limit} positions of "
                          f"{spec.model}; give at most {profile.position_limit}")
    dims = index_dims(profile.dim, spec.dims, defaults.DEFAULT_DIMS, spec.keep_full)
    fmt = spec.instruction_format or profile.instruction_format
    named_ids = spec.id_column != defaults.DEFAULT_ID_COLUMN  # a column the user named must exist
    corpus = plan_corpus(spec.corpus, spec.text_column, spec.id_column, spec.chunk_rows,
                         id_column_required=named_ids, validated=_validated_fingerprint(spec))
    return WorkPlan(
        out=str(spec.out), corpus=corpus, model=spec.model, model_path=str(ref.path),
        model_fingerprint=ref.fingerprint, model_type=profile.model_type, pooling=profile.pooling, dim=profile.dim,
        dtype=spec.dtype, device=spec.device, max_length=spec.max_length or profile.max_length,
        batch_tokens=spec.batch_tokens, document_prefix=profile.document_prefix(spec.instruction, fmt),
        query_prefix=profile.query_prefix(spec.query_instruction, fmt), dims=tuple(dims),
        hnsw_m=spec.hnsw_m, ef_construction=spec.ef_construction, ef_search=spec.ef_search,
        index_type=spec.index_type, instruction_format=fmt, segment_rows=spec.segment_rows, compile=spec.compile)


def _validated_fingerprint(spec: Any) -> str | None:
    """Fingerprint of the corpus the current version was built from, when its ids and texts were checked in these
    columns (the plan checks them again otherwise)."""
    current = versions.current_version(spec.out)
    if current is None:
        return None
    try:
        corpus = read_info(current).corpus
    except StorageError:
        return None  # a damaged version: check the ids again
    same_columns = corpus.id_column == spec.id_column and corpus.text_column == spec.text_column
    return corpus.fingerprint if same_columns else None
