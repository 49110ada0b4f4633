"""The settings of `embedctl serve`, in one typed object.

The CLI builds it from its options (each also an `EMBEDCTL_*` variable) and hands it to the server process as JSON
in `EMBEDCTL_SERVE_CONFIG`; every worker process reads it back from there (uvicorn starts workers by spawning a
fresh interpreter, so the environment is the one channel they all share).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from embedctl.pipeline.errors import ConfigError
from embedctl.settings import setting

ENV = "EMBEDCTL_SERVE_CONFIG"

DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 256
"""Requests waiting for the model per worker before the server answers 429."""
DEFAULT_MAX_BODY = 4 * 1024 * 1024
"""Largest request body in bytes (413 above it): 2,048 texts of 2 KB."""
DEFAULT_MAX_INPUTS = 2048
"""Most texts in one request (OpenAI's own limit)."""
DEFAULT_BATCH_WAIT_MS = 2.0
"""How long the first request of a batch waits for others while clients are concurrent (serve.batcher)."""
DEFAULT_CACHE = 16384
"""(text, instruction) embeddings kept per worker (16,384 x 2560 dims x 4 bytes = 160 MiB at the reference model)."""
DEFAULT_HEADER_TIMEOUT = 10.0
"""Seconds a connection has to send a request's headers (from connecting, or from the request's first byte on a
kept-alive connection) before it is closed: headers are a few hundred bytes, sent at once by any real client."""
DEFAULT_BODY_TIMEOUT = 30.0
"""Seconds a request's whole body has to arrive after its headers before the answer is 408: the largest body
(--max-body, 4 MiB) at 1.1 Mbit/s. A deadline for the whole body, not for each chunk, which one byte a second meets."""
DEFAULT_MAX_CONNECTIONS = 1000
"""Open connections per worker; past it a request is answered 503. With the two timeouts above, a client that
never finishes its requests must open 25 connections a second to reach it."""


@dataclass(frozen=True)
class ServeConfig:
    model: str  # --model as given (alias, folder or hub id): the name clients send as `model`
    model_path: str | None = None  # the folder its weights load from (resolved by the CLI; None: resolve `model`)
    indexes: tuple[str, ...] = ()  # index folders (an --out folder each), served by folder name
    workers: int = 1
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = field(default=None, repr=False)
    device: str = "auto"
    dtype: str = "auto"
    shm: str = "auto"
    threads: int | None = None  # torch threads per worker (default: the cores divided among the workers)
    batch_tokens: int | None = None  # token budget of one batch (default: the encoder's for the device)
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    max_queue: int = DEFAULT_MAX_QUEUE
    max_body: int = DEFAULT_MAX_BODY
    max_inputs: int = DEFAULT_MAX_INPUTS
    cache: int = DEFAULT_CACHE
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    verify: bool = True  # check index files against their checksums when (re)loading them
    funnel: int | None = None  # the default of /v1/search's `funnel` (a request naming `dim` searches that dim)
    shortlist: int | None = None  # the default of its `shortlist` (None: DEFAULT_SHORTLIST)
    share: dict | None = None  # {"folder", "dtype", "devices"}: the weight exporters the supervisor runs

    def __post_init__(self):
        """Refuse a bad value in one line naming its option (each field is an option of `embedctl serve`)."""
        for name, low in (("workers", 1), ("threads", 1), ("batch_tokens", 1), ("max_queue", 1), ("max_body", 1),
                          ("max_inputs", 1), ("cache", 0), ("batch_wait_ms", 0), ("max_connections", 1),
                          ("funnel", 1), ("shortlist", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{_option(name)} must be >= {low}, got {value}")
        for name in ("header_timeout", "body_timeout"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(f"{_option(name)} must be a finite number of seconds > 0, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty; give a key or leave the option out")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be between 1 and 65535, got {self.port}")

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "indexes": list(self.indexes)})

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        data = json.loads(text)
        return cls(**{**data, "indexes": tuple(data.get("indexes", ()))})

    @classmethod
    def from_env(cls) -> ServeConfig:
        text = setting("serve_config")
        if not text:
            raise RuntimeError(f"{ENV} is not set: start the server with `embedctl serve`")
        return cls.from_json(text)

    def torch_threads(self, cores: int) -> int:
        """Threads each worker's model uses: --threads, else the cores shared out among the workers."""
        return self.threads or max(1, cores // max(1, self.workers))


def _option(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")
