"""The job spec: one validated dataclass holding every setting of a job, with a JSON round-trip.

The CLI builds it from its options (each with an `EMBEDCTL_*` environment variable); the Celery submitter sends
it as JSON (`to_dict` / `from_dict`). Invalid values raise ConfigError naming the bad value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from embedctl.pipeline.defaults import (
    DEFAULT_CHUNK_ROWS,
    DEFAULT_EF_CONSTRUCTION,
    DEFAULT_EF_SEARCH,
    DEFAULT_HNSW_M,
    DEFAULT_ID_COLUMN,
    DEFAULT_KEEP_VERSIONS,
    DEFAULT_MODEL,
    DEFAULT_SEGMENT_ROWS,
    DEFAULT_TEXT_COLUMN,
    DTYPE_NAMES,
    INDEX_TYPES,
    INSTRUCTION_FORMATS,
    compile_mode,
)
from embedctl.pipeline.errors import ConfigError


@dataclass(frozen=True)
class JobSpec:
    """Everything that defines an indexing job.

    `instruction` / `query_instruction`: None means "not set" (model defaults apply), "" means none.
    `instruction_format`: qwen3 or raw; None means the model's default (qwen3 for instruction-aware models).
    `dims`: None means the defaults below the model's dim; explicit dims must all be honoured.
    `keep_full`: HNSW indexes for `dims` only, no full-dim one (the full vectors are kept on disk all the same).
    `id_column`: when it is the default ("id") and the corpus has no such column, row numbers are the ids.
    """

    corpus: str
    out: str
    model: str = DEFAULT_MODEL
    text_column: str = DEFAULT_TEXT_COLUMN
    id_column: str = DEFAULT_ID_COLUMN
    instruction: str | None = None
    query_instruction: str | None = None
    instruction_format: str | None = None
    dims: tuple[int, ...] | None = None
    keep_full: bool = False
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    batch_tokens: int | None = None
    max_length: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    shm: str = "auto"
    hnsw_m: int = DEFAULT_HNSW_M
    ef_construction: int = DEFAULT_EF_CONSTRUCTION
    ef_search: int = DEFAULT_EF_SEARCH
    keep: int = DEFAULT_KEEP_VERSIONS
    index_type: str = "hnsw"
    segment_rows: int = DEFAULT_SEGMENT_ROWS
    compile: str = "auto"  # auto | on | off (true/false accepted: see defaults.compile_mode)
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.dims is not None:
            object.__setattr__(self, "dims", tuple(self.dims))
        for name in ("corpus", "out", "model", "text_column"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
        for name, low in (("chunk_rows", 1), ("batch_tokens", 1), ("max_length", 2), ("threads", 1),
                          ("hnsw_m", 2), ("ef_construction", 1), ("ef_search", 1), ("keep", 1), ("segment_rows", 1)):
            value = getattr(self, name)
            if value is None and name in ("batch_tokens", "max_length", "threads"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        bad = [d for d in self.dims or () if not isinstance(d, int) or isinstance(d, bool) or d <= 0]
        if bad:
            raise ConfigError(f"dims must be positive integers, got {bad!r}")
        if not isinstance(self.keep_full, bool):
            raise ConfigError(f"keep_full must be true or false, got {self.keep_full!r}")
        if self.instruction_format not in (None, *INSTRUCTION_FORMATS):
            raise ConfigError(f"instruction_format must be one of {', '.join(INSTRUCTION_FORMATS)}, got "
                              f"{self.instruction_format!r}")
        object.__setattr__(self, "compile", compile_mode(self.compile))
        if self.index_type not in INDEX_TYPES:
            raise ConfigError(f"index_type must be one of {', '.join(INDEX_TYPES)}, got {self.index_type!r}")
        if self.shm not in ("auto", "require", "off"):
            raise ConfigError(f"shm must be auto, require or off, got {self.shm!r}")
        if self.dtype != "auto" and self.dtype.lower() not in DTYPE_NAMES:
            raise ConfigError(f"dtype must be auto or one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("extra")
        data["dims"] = list(self.dims) if self.dims is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> JobSpec:
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown job setting {unknown[0]!r}; known settings: {', '.join(sorted(known))}")
        missing = [k for k in ("corpus", "out") if k not in data]
        if missing:
            raise ConfigError(f"job setting {missing[0]!r} is required")
        return cls(**data)
