"""Celery settings of embedctl, from one typed object built from `EMBEDCTL_*` environment variables."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import ConfigError

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
"""Broker of `celery -A tasks worker` when EMBEDCTL_BROKER_URL is not set."""

DEFAULT_VISIBILITY_TIMEOUT = 6 * 3600
"""Seconds before Redis hands an unacknowledged chunk to another worker: longer than the longest chunk."""

DEFAULT_RESULT_EXPIRES = 24 * 3600
"""Seconds task results are kept in Redis."""

EMBED_QUEUE = "embedctl.embed"
"""Queue of the embedding tasks (GPU hosts)."""

BUILD_QUEUE = "embedctl.build"
"""Queue of the index building tasks (CPU)."""

_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@]*:)(?P<password>[^@/]*)(?P<tail>@)", re.IGNORECASE)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***: safe to print and log."""
    return _PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", url or "")


def url_password(url: str) -> str | None:
    m = _PASSWORD.search(url or "")
    return m["password"] if m and m["password"] else None


@dataclass(frozen=True)
class Settings:
    """Everything the Celery app needs; `from_env` reads EMBEDCTL_BROKER_URL and friends."""

    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str | None = None  # None: the broker URL
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT
    result_expires: int = DEFAULT_RESULT_EXPIRES
    embed_queue: str = EMBED_QUEUE
    build_queue: str = BUILD_QUEUE
    jobs_path: str | None = None  # the job spec file whose schedules beat runs (EMBEDCTL_JOBS)

    def __post_init__(self) -> None:
        if not self.broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
            raise ConfigError(f"broker URL must be a Redis URL (redis://[:password@]host:port/db), got "
                              f"{mask_url(self.broker_url)!r}")
        for name in ("visibility_timeout", "result_expires"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def masked_broker(self) -> str:
        return mask_url(self.broker_url)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Settings from EMBEDCTL_BROKER_URL, EMBEDCTL_RESULT_BACKEND, EMBEDCTL_VISIBILITY_TIMEOUT,
        EMBEDCTL_RESULT_EXPIRES, EMBEDCTL_EMBED_QUEUE, EMBEDCTL_BUILD_QUEUE; `overrides` win when not None."""
        env = os.environ if environ is None else environ
        values = {
            "broker_url": env.get("EMBEDCTL_BROKER_URL") or DEFAULT_BROKER_URL,
            "result_backend": env.get("EMBEDCTL_RESULT_BACKEND") or None,
            "visibility_timeout": _int(env, "EMBEDCTL_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT),
            "result_expires": _int(env, "EMBEDCTL_RESULT_EXPIRES", DEFAULT_RESULT_EXPIRES),
            "embed_queue": env.get("EMBEDCTL_EMBED_QUEUE") or EMBED_QUEUE,
            "build_queue": env.get("EMBEDCTL_BUILD_QUEUE") or BUILD_QUEUE,
            "jobs_path": env.get("EMBEDCTL_JOBS") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer number of seconds, got {raw!r}") from None


def celery_config(settings: Settings) -> dict:
    """The Celery configuration: JSON only, late acks, one prefetch, the visibility timeout everywhere."""
    transport = {"visibility_timeout": settings.visibility_timeout}
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.backend_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "result_expires": settings.result_expires,
        "task_default_queue": settings.embed_queue,
        "task_routes": {"embedctl.embed_chunk": {"queue": settings.embed_queue},
                        "embedctl.build_index": {"queue": settings.build_queue},
                        "embedctl.run_job": {"queue": settings.build_queue}},
        "task_track_started": True,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "enable_utc": True,
    }
