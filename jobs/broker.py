"""The broker side of embedctl, for whoever sends or watches tasks: settings, the Celery configuration, a sending
app, broker checks, live workers and queued messages.

Tasks are sent by name (`embedctl.embed_chunk`, ...), so nothing here imports `embedctl.tasks`: the worker side
imports this module, never the other way round. Settings come from one place: `EMBEDCTL_BROKER_URL`, else
`CELERY_BROKER_URL`, for the broker and the result backend alike.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from embedctl import settings as environment
from embedctl.pipeline.errors import BrokerError, ConfigError
from embedctl.settings import (
    BUILD_QUEUE,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_RESULT_EXPIRES,
    DEFAULT_STALL_SECONDS,
    DEFAULT_VISIBILITY_TIMEOUT,
    EMBED_QUEUE,
)

if TYPE_CHECKING:
    from celery import Celery

LOG = logging.getLogger(__name__)

EMBED_TASK = "embedctl.embed_chunk"
BUILD_TASK = "embedctl.build_index"  # plans a version's build, queues its pieces
SEGMENT_TASK = "embedctl.build_segment"  # one index file of one segment and dim
PUBLISH_TASK = "embedctl.publish"
RUN_JOB_TASK = "embedctl.run_job"


PERCENT_ENCODE = "the password must be percent-encoded: '/' as %2F, '?' as %3F, '#' as %23, '@' as %40"
"""How to write a password that holds reserved characters (said by every refusal of a URL)."""

_SECRET_QUERY_KEYS = {"password", "passwd", "pass"}


def _split(url: str) -> SplitResult:
    """The URL's parts (RFC 3986, Python's urllib); ValueError when it cannot be split (a bad port or bracket)."""
    parts = urlsplit(url)
    parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    return parts


def _ambiguous(parts: SplitResult) -> bool:
    """Whether a raw '/', '?' or '#' in the user or password part cut the URL's host part short: then an '@'
    follows where the host part ends. Parsers disagree on such a URL (kombu's sanitiser printed part of the
    password as the host, redis-py connected to it), so it is refused, never guessed."""
    return "@" in parts.path or "@" in parts.query or "@" in parts.fragment


def mask_url(url: str | None) -> str:
    """The URL with its password (and a `password=` query value) replaced by **: safe to print and log.

    Parsed with urllib (RFC 3986: the last '@' of the host part ends the user part), not kombu's
    `maybe_sanitize_url`, which drops the query, mangles IPv6 hosts and, given a raw '/' in the password, prints
    its tail as the host. A URL that cannot be read back unambiguously shows nothing after its scheme.
    """
    try:
        parts = _split(url or "")
    except ValueError:
        return "<a broker URL that cannot be parsed>"
    if _ambiguous(parts):
        return f"{parts.scheme}://** (unreadable: percent-encode its password)"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:**@{hostport}" if colon else f"**@{hostport}"
    query = "&".join(_mask_pair(pair) for pair in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _mask_pair(pair: str) -> str:
    key, equals, _value = pair.partition("=")
    return f"{key}=**" if equals and unquote(key).lower() in _SECRET_QUERY_KEYS else pair


def url_password(url: str | None) -> str | None:
    """The URL's password, decoded (None: none, or a URL that cannot be parsed)."""
    try:
        parts = _split(url or "")
    except ValueError:
        return None
    return unquote(parts.password) if parts.password is not None else None


def _check_url(url: str) -> None:
    """Refuse a URL that is not Redis or that parses ambiguously, without ever echoing its password."""
    if not url.startswith(("redis://", "rediss://", "redis+socket://")):
        raise ConfigError(f"the broker URL must be a Redis URL (redis://[:password@]host:port/db), got "
                          f"{mask_url(url)!r}")
    try:
        parts = _split(url)
    except ValueError:
        raise ConfigError(f"the broker URL cannot be parsed (a port that is not a number?); if it holds a password "
                          f"with reserved characters, {PERCENT_ENCODE}") from None
    if _ambiguous(parts):
        raise ConfigError(f"the broker URL cannot be read: an '@' follows its host (a raw '/', '?' or '#' in the "
                          f"password ends the host early; an '@' in a query value reads the same); {PERCENT_ENCODE}, "
                          "and an '@' in a query value as %40")
    if url.startswith("redis+socket://"):
        return
    if not parts.hostname:
        raise ConfigError(f"the broker URL {mask_url(url)!r} names no host; give redis://[:password@]host:port/db")


@dataclass(frozen=True)
class Settings:
    """Everything the broker side needs; `from_env` reads EMBEDCTL_* (and CELERY_BROKER_URL)."""

    broker_url: str | None = field(default=None, repr=False)  # None: not configured (a worker refuses to start)
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT
    result_expires: int = DEFAULT_RESULT_EXPIRES
    lease_seconds: int = DEFAULT_LEASE_SECONDS
    stall_seconds: int = DEFAULT_STALL_SECONDS
    embed_queue: str = EMBED_QUEUE
    build_queue: str = BUILD_QUEUE
    jobs_path: str | None = None  # the job spec file whose schedules beat runs (EMBEDCTL_JOBS)

    def __post_init__(self) -> None:
        if self.broker_url is not None:
            _check_url(self.broker_url)
        for name in ("visibility_timeout", "result_expires", "lease_seconds", "stall_seconds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")

    @property
    def url(self) -> str:
        """The broker URL; raises ConfigError when none is configured."""
        if not self.broker_url:
            raise ConfigError("no broker is configured: set EMBEDCTL_BROKER_URL (or CELERY_BROKER_URL) to a Redis URL "
                              "such as redis://:PASSWORD@host:6379/0, or pass --broker")
        return self.broker_url

    @property
    def masked_broker(self) -> str:
        return mask_url(self.broker_url) if self.broker_url else "(no broker)"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Settings from the environment: EMBEDCTL_BROKER_URL (else CELERY_BROKER_URL),
        EMBEDCTL_VISIBILITY_TIMEOUT, EMBEDCTL_RESULT_EXPIRES, EMBEDCTL_LEASE_SECONDS, EMBEDCTL_STALL_SECONDS,
        EMBEDCTL_EMBED_QUEUE, EMBEDCTL_BUILD_QUEUE, EMBEDCTL_JOBS; `overrides` win when not None."""
        values = {name: environment.setting(name, environ)  # these only: another knob's bad value is not ours
                  for name in ("broker_url", "visibility_timeout", "result_expires", "lease_seconds",
                               "stall_seconds", "embed_queue", "build_queue", "jobs_path")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def celery_config(settings: Settings) -> dict:
    """The Celery configuration: JSON only, late acks, one prefetch, both queues, the visibility timeout
    everywhere. A worker started without -Q consumes both queues (`task_queues`)."""
    from kombu import Queue

    transport = {"visibility_timeout": settings.visibility_timeout}
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.broker_url,
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
        "task_queues": (Queue(settings.embed_queue, routing_key=settings.embed_queue),
                        Queue(settings.build_queue, routing_key=settings.build_queue)),
        "task_default_queue": settings.embed_queue,
        "task_routes": {EMBED_TASK: {"queue": settings.embed_queue},
                        **{task: {"queue": settings.build_queue}
                           for task in (BUILD_TASK, SEGMENT_TASK, PUBLISH_TASK, RUN_JOB_TASK)}},
        "task_track_started": True,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "enable_utc": True,
    }


class BrokerUnavailable(BrokerError):
    """The broker did not answer (down, restarting, unreachable): worth trying again, not a fault of the workers."""


def sender(settings: Settings) -> Celery:
    """A Celery app that sends embedctl's tasks by name and inspects workers (it registers no task).

    It has no result backend: nothing here reads a task's result, and Celery's Redis backend would open a
    subscription per task sent (one more connection that a Redis restart leaves stale). The workers store results
    as configured (`celery_config`)."""
    from celery import Celery

    app = Celery("embedctl")
    app.conf.update(celery_config(settings))
    app.conf.result_backend = None
    return app


def reset_connections() -> None:
    """Close this process's pooled broker connections. Kombu pools them process-wide, keyed by URL and shared by
    every app: after a Redis restart they are dead ("Connection closed by server"), and even a new app would be
    handed them again. Make a new `sender` afterwards."""
    from kombu import pools

    pools.reset()


def check_broker(settings: Settings, timeout: float = 5.0) -> None:
    """Ping the Redis broker; raise BrokerError (one line, password masked) when it cannot be used."""
    import redis

    url, masked = settings.url, settings.masked_broker
    try:
        redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping()
    except (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError):
        if url_password(url) is None:
            raise BrokerError(f"the broker at {masked} requires a password: put it in the URL "
                              "(redis://:PASSWORD@host:port/db)") from None
        raise BrokerError(f"the broker at {masked} refused the password; check the password in --broker / "
                          "EMBEDCTL_BROKER_URL") from None
    except redis.ResponseError as exc:
        reason = clean(str(exc), url)
        if "NOAUTH" in reason or "AUTH" in reason:
            raise BrokerError(f"the broker at {masked} requires a password: put it in the URL "
                              "(redis://:PASSWORD@host:port/db)") from None
        raise BrokerError(f"the broker at {masked} answered with an error ({reason})") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError, ValueError) as exc:
        reason = clean(str(exc), url) or type(exc).__name__
        raise BrokerError(f"cannot reach the broker at {masked} ({reason}); is Redis running there? Check "
                          "--broker / EMBEDCTL_BROKER_URL") from None


def clean(text: str, url: str | None) -> str:
    """An error text from the broker library, on one line, without the URL's password (as given or decoded)."""
    text = " ".join(text.split())
    password = url_password(url)
    if password:
        raw = urlsplit(url or "").password or ""
        for form in sorted({password, raw} - {""}, key=len, reverse=True):
            text = text.replace(form, "**")
    return text


def redis_client(settings: Settings):
    import redis

    return redis.Redis.from_url(settings.url, socket_connect_timeout=10, socket_timeout=30)


def live_queues(app: Celery, timeout: float = 2.0) -> dict[str, set[str]]:
    """Queues consumed by the live workers, by worker name (an empty dict: no worker answered)."""
    try:
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
    except Exception as exc:  # noqa: BLE001 - a broker error while inspecting is one line
        raise BrokerUnavailable(f"cannot ask the workers which queues they consume: "
                                f"{clean(str(exc), app.conf.broker_url)}") from None
    return {worker: {q["name"] for q in queues} for worker, queues in replies.items()}


def describe_workers(live: dict[str, set[str]]) -> str:
    """Live workers and their queues, as words ('w1@h: embedctl.build; ...', or 'none answered')."""
    return "; ".join(f"{w}: {', '.join(sorted(q))}" for w, q in sorted(live.items())) or "none answered"


def require_consumers(app: Celery, queues: list[str], timeout: float = 2.0, wait: float = 0.0) -> None:
    """Raise BrokerError naming the first of `queues` that no live worker consumes (after waiting up to `wait`
    seconds for workers that are starting)."""
    import time

    deadline = time.monotonic() + wait
    while True:
        live = live_queues(app, timeout)
        consumed = set().union(*live.values()) if live else set()
        lacking = [q for q in queues if q not in consumed]
        if not lacking:
            return
        if time.monotonic() >= deadline:
            break
    raise BrokerError(f"no live worker consumes the queue {lacking[0]} (workers: {describe_workers(live)}); start "
                      "one with `embedctl worker --model MODEL` (it serves both queues), or pass --detach to queue the "
                      "job for workers that start later")


def queued_args(settings: Settings, queue: str, task: str) -> list[list]:
    """The arguments of the `task` messages waiting in `queue` (not those a worker has taken).

    Kombu's Redis transport keeps a queue as a Redis list of JSON messages (one list per priority step); this
    reads them without taking any. A message that cannot be read is skipped.
    """
    client = redis_client(settings)
    found = []
    keys = [queue] + [k.decode() for k in client.scan_iter(match=f"{queue}\x06\x16*", count=100)]
    for key in keys:
        for raw in client.lrange(key, 0, -1):
            try:
                message = json.loads(raw)
                if message.get("headers", {}).get("task") != task:
                    continue
                import base64

                body = message["body"]
                if message.get("properties", {}).get("body_encoding") == "base64":
                    body = base64.b64decode(body)
                args = json.loads(body)[0]
            except (ValueError, KeyError, TypeError, IndexError):
                continue
            found.append(list(args))
    return found
