"""Every `EMBEDCTL_*` variable that is not a command-line option, read in one place.

The options of the commands read their own variables through click (`EMBEDCTL_<OPTION>`, shown in `--help`);
what remains is read here: the settings of the processes that a command starts (a Celery pool child, a server
worker, an exporter), the broker's, and the tuning knobs with no option. Each is a field of `Settings` with its
default and its parser, so a variable is parsed once, the same way, wherever it is used.

This module is a leaf below every package (it imports nothing of embedctl but `embedctl.errors`), so that
`shm_loader/`, the lowest layer, reads its variables here too. A bad value raises `ConfigError` naming the
variable; nothing is read at import time, so a test (or a process that changed its environment) gets the current
values from `Settings.from_env()`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from embedctl.errors import ConfigError

BROKER_ENV = ("EMBEDCTL_BROKER_URL", "CELERY_BROKER_URL")
"""Where the broker URL is read, in order (`celery` itself reads CELERY_BROKER_URL)."""
TRUE = {"1", "true", "yes", "on"}

DEFAULT_VISIBILITY_TIMEOUT = 6 * 3600
"""Seconds before Redis hands an unacknowledged task to another worker: longer than the longest chunk."""
DEFAULT_RESULT_EXPIRES = 24 * 3600
"""Seconds task results are kept in Redis."""
DEFAULT_LEASE_SECONDS = 120
"""Time-to-live of a lock lease (a run's hold on its output folder, a build's hold on its plan). Holders renew it
every third of this while they work; a lease whose holder died lapses after at most this long."""
DEFAULT_STALL_SECONDS = 180
"""A follower re-queues the chunks (or the build) of its job that made no progress for this long: a dead
worker costs minutes instead of the visibility time-out (hours)."""
EMBED_QUEUE = "embedctl.embed"
"""Queue of the embedding tasks (GPU hosts)."""
BUILD_QUEUE = "embedctl.build"
"""Queue of the index building and scheduled-run tasks (CPU)."""
DEFAULT_WORKER_DEATHS = 5
"""Deaths of the Celery worker within the window below after which `embedctl worker` gives up."""
DEFAULT_WORKER_DEATH_WINDOW = 300
"""Seconds over which those deaths are counted."""


def _text(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def _positive_int(env: Mapping[str, str], name: str, default: int, what: str = "a positive integer") -> int:
    raw = _text(env, name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {what}, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be {what}, got {raw!r}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _text(env, name).lower() or default
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """The variables below, parsed; `Settings.from_env()` reads them (the process's environment by default)."""

    # the broker (jobs.broker builds Celery's configuration from these)
    broker_url: str | None = field(default=None, repr=False)  # EMBEDCTL_BROKER_URL, else CELERY_BROKER_URL
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT  # EMBEDCTL_VISIBILITY_TIMEOUT
    result_expires: int = DEFAULT_RESULT_EXPIRES  # EMBEDCTL_RESULT_EXPIRES
    lease_seconds: int = DEFAULT_LEASE_SECONDS  # EMBEDCTL_LEASE_SECONDS
    stall_seconds: int = DEFAULT_STALL_SECONDS  # EMBEDCTL_STALL_SECONDS
    embed_queue: str = EMBED_QUEUE  # EMBEDCTL_EMBED_QUEUE
    build_queue: str = BUILD_QUEUE  # EMBEDCTL_BUILD_QUEUE
    jobs_path: str | None = None  # EMBEDCTL_JOBS: the job spec file
    # the model of a worker process (`embedctl worker` passes its options down to the Celery children)
    model: str | None = None  # EMBEDCTL_MODEL
    device: str = "auto"  # EMBEDCTL_DEVICE
    dtype: str = "auto"  # EMBEDCTL_DTYPE
    threads: int | None = None  # EMBEDCTL_THREADS: torch threads per process
    shm: str = "auto"  # EMBEDCTL_SHM (auto, require, off); EMBEDCTL_REQUIRE_SHM=1 makes it require
    require_shm: bool = False  # EMBEDCTL_REQUIRE_SHM: weights only from shared memory, whatever --shm says
    # shared weights
    shm_dir: Path = Path("/dev/shm")  # EMBEDCTL_SHM_DIR: where weight segments live
    device_share: str = "auto"  # EMBEDCTL_DEVICE_SHARE (auto, on, off): one device copy per GPU
    exporter_key: str = field(default="", repr=False)  # EMBEDCTL_EXPORTER_KEY: the bootstrap's exporter
    # the encoder's tuning knobs
    packing: str = "off"  # EMBEDCTL_PACKING (off, on, auto)
    compile_after: float | None = None  # EMBEDCTL_COMPILE_AFTER: seconds of eager compute before compiling
    exact_tile_rows: int | None = None  # EMBEDCTL_EXACT_TILE_ROWS: rows per tile of exact search
    # `embedctl worker`'s supervision, and the server's process settings
    worker_deaths: int = DEFAULT_WORKER_DEATHS  # EMBEDCTL_WORKER_DEATHS
    worker_death_window: int = DEFAULT_WORKER_DEATH_WINDOW  # EMBEDCTL_WORKER_DEATH_WINDOW
    log_level: str = "info"  # EMBEDCTL_LOG_LEVEL: the server's log level
    serve_config: str | None = field(default=None, repr=False)  # EMBEDCTL_SERVE_CONFIG (set by `embedctl serve`)
    # where this host caches the objects of s3:// folders (the --cache-dir and --cache-size of the commands, which
    # export them to the processes they start)
    cache_dir: Path | None = None  # EMBEDCTL_CACHE_DIR
    cache_size: int | None = None  # EMBEDCTL_CACHE_SIZE, in bytes (500M, 20G)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        compile_after = _text(env, "EMBEDCTL_COMPILE_AFTER")
        if compile_after:
            try:
                seconds = float(compile_after)
            except ValueError:
                seconds = -1.0
            if not seconds >= 0:  # inf: never compile; NaN and negatives are refused
                raise ConfigError(f"EMBEDCTL_COMPILE_AFTER must be a number of seconds >= 0, got {compile_after!r}")
        require_shm = _text(env, "EMBEDCTL_REQUIRE_SHM").lower() in TRUE
        shm = "require" if require_shm else _choice(
            env, "EMBEDCTL_SHM", "auto", ("auto", "require", "off"))
        seconds = "a positive integer number of seconds"
        return cls(
            broker_url=next((env[k] for k in BROKER_ENV if env.get(k)), None),
            visibility_timeout=_positive_int(env, "EMBEDCTL_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT, seconds),
            result_expires=_positive_int(env, "EMBEDCTL_RESULT_EXPIRES", DEFAULT_RESULT_EXPIRES, seconds),
            lease_seconds=_positive_int(env, "EMBEDCTL_LEASE_SECONDS", DEFAULT_LEASE_SECONDS, seconds),
            stall_seconds=_positive_int(env, "EMBEDCTL_STALL_SECONDS", DEFAULT_STALL_SECONDS, seconds),
            embed_queue=_text(env, "EMBEDCTL_EMBED_QUEUE") or EMBED_QUEUE,
            build_queue=_text(env, "EMBEDCTL_BUILD_QUEUE") or BUILD_QUEUE,
            jobs_path=_text(env, "EMBEDCTL_JOBS") or None,
            model=_text(env, "EMBEDCTL_MODEL") or None,
            device=_text(env, "EMBEDCTL_DEVICE") or "auto",
            dtype=_text(env, "EMBEDCTL_DTYPE") or "auto",
            threads=_positive_int(env, "EMBEDCTL_THREADS", 0) or None,
            shm=shm,
            require_shm=require_shm,
            shm_dir=Path(_text(env, "EMBEDCTL_SHM_DIR") or "/dev/shm"),
            device_share=_choice(env, "EMBEDCTL_DEVICE_SHARE", "auto", ("auto", "on", "off")),
            exporter_key=_text(env, "EMBEDCTL_EXPORTER_KEY"),
            packing=_choice(env, "EMBEDCTL_PACKING", "off", ("off", "on", "auto")),
            compile_after=float(compile_after) if compile_after else None,
            exact_tile_rows=_positive_int(env, "EMBEDCTL_EXACT_TILE_ROWS", 0, "a positive number of rows") or None,
            worker_deaths=_positive_int(env, "EMBEDCTL_WORKER_DEATHS", DEFAULT_WORKER_DEATHS),
            worker_death_window=_positive_int(env, "EMBEDCTL_WORKER_DEATH_WINDOW", DEFAULT_WORKER_DEATH_WINDOW, seconds),
            log_level=(_text(env, "EMBEDCTL_LOG_LEVEL") or "info").lower(),
            serve_config=env.get("EMBEDCTL_SERVE_CONFIG") or None,
            cache_dir=Path(_text(env, "EMBEDCTL_CACHE_DIR")).expanduser() if _text(env, "EMBEDCTL_CACHE_DIR") else None,
            cache_size=parse_size(_text(env, "EMBEDCTL_CACHE_SIZE"), "EMBEDCTL_CACHE_SIZE"),
        )


def parse_size(text: str | None, name: str = "the size") -> int | None:
    """A size such as 500M, 20G or 1.5T (powers of 1024), or plain bytes; None when empty."""
    if not text:
        return None
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    body = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (body[:-1], body[-1]) if body and body[-1] in units else (body, "")
    try:
        size = int(float(number) * units[unit])
    except ValueError:
        size = 0
    if size <= 0:
        raise ConfigError(f"{name} must be a size > 0 in bytes or with K, M, G or T (20G), got {text!r}")
    return size


def setting(name: str, environ: Mapping[str, str] | None = None):
    """One setting, parsed alone: a bad value of another variable does not stop a process that never uses it."""
    env = os.environ if environ is None else environ
    return getattr(Settings.from_env({v: env[v] for v in _ENV_OF[name] if v in env}), name)


_ENV_OF = {  # field -> the variables it is parsed from
    "broker_url": BROKER_ENV, "visibility_timeout": ("EMBEDCTL_VISIBILITY_TIMEOUT",),
    "result_expires": ("EMBEDCTL_RESULT_EXPIRES",), "lease_seconds": ("EMBEDCTL_LEASE_SECONDS",),
    "stall_seconds": ("EMBEDCTL_STALL_SECONDS",), "embed_queue": ("EMBEDCTL_EMBED_QUEUE",),
    "build_queue": ("EMBEDCTL_BUILD_QUEUE",), "jobs_path": ("EMBEDCTL_JOBS",), "model": ("EMBEDCTL_MODEL",),
    "device": ("EMBEDCTL_DEVICE",), "dtype": ("EMBEDCTL_DTYPE",), "threads": ("EMBEDCTL_THREADS",),
    "shm": ("EMBEDCTL_SHM", "EMBEDCTL_REQUIRE_SHM"), "require_shm": ("EMBEDCTL_REQUIRE_SHM",), "shm_dir": ("EMBEDCTL_SHM_DIR",),
    "device_share": ("EMBEDCTL_DEVICE_SHARE",), "exporter_key": ("EMBEDCTL_EXPORTER_KEY",),
    "packing": ("EMBEDCTL_PACKING",), "compile_after": ("EMBEDCTL_COMPILE_AFTER",),
    "exact_tile_rows": ("EMBEDCTL_EXACT_TILE_ROWS",), "worker_deaths": ("EMBEDCTL_WORKER_DEATHS",),
    "worker_death_window": ("EMBEDCTL_WORKER_DEATH_WINDOW",), "log_level": ("EMBEDCTL_LOG_LEVEL",),
    "serve_config": ("EMBEDCTL_SERVE_CONFIG",), "cache_dir": ("EMBEDCTL_CACHE_DIR",),
    "cache_size": ("EMBEDCTL_CACHE_SIZE",),
}
