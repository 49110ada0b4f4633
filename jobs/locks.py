"""Locks as leases: one API, a Redis backend (redis-py's Lock) and a file backend (py-filelock).

A lease is taken without waiting and names its holder (run id, host, pid, mode, start) so that whoever finds it
taken can say who holds it. No lease outlives its holder:
- a Redis lease expires `ttl` seconds after its last renewal; holders renew it every third of that while they
  work (`keep_alive`), and any process that knows the token (a worker running a chunk of the run, the build
  task) can renew it, so a run whose processes all died releases its lock within `ttl`;
- a file lease is an OS lock on a file (flock through py-filelock), released by the kernel when its process
  exits, however it exits.

Keys: `embedctl:lock:out:<hash of the output folder>` (one writer per --out) and
`embedctl:lock:build:<hash of the output folder>:<plan id>` (one build of a plan at a time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from embedctl.jobs.broker import Settings, redis_client
from embedctl.pipeline.fsutil import storage_error, write_json

LOG = logging.getLogger(__name__)

LOCK_FILE = ".embedctl.lock"
HOLDER_FILE = ".embedctl.lock.json"


def holder_record(run_id: str, mode: str, job: str | None = None) -> dict:
    """Who takes a lease: shown to whoever finds it taken."""
    return {"run_id": run_id, "mode": mode, "job": job, "host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.now(UTC).isoformat(timespec="seconds")}


def describe_holder(holder: dict | None) -> str:
    """A holder record as words: 'run 1a2b3c (celery, job docs) on host h, pid 12, since ...'."""
    if not holder:
        return "another run"
    job = f", job {holder['job']}" if holder.get("job") else ""
    return (f"run {holder.get('run_id', '?')} ({holder.get('mode', '?')}{job}) on host {holder.get('host', '?')}, "
            f"pid {holder.get('pid', '?')}, since {holder.get('since', '?')}")


def out_key(out: str | Path) -> str:
    """The Redis key of an output folder's lock (the folder's absolute path, hashed: the same on every host that
    mounts the shared folder at the same path)."""
    return "embedctl:lock:out:" + hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:16]


def build_key(out: str | Path, plan_id: str) -> str:
    return f"embedctl:lock:build:{out_key(out).rsplit(':', 1)[-1]}:{plan_id}"


@dataclass(frozen=True)
class LeaseRef:
    """What a process needs to renew or release a lease it did not take (recorded in job.json)."""

    backend: str  # redis | file
    key: str  # Redis key, or the lock file's path
    token: str  # the holder record as JSON (Redis); the run id (file)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "key": self.key, "token": self.token}

    @classmethod
    def from_dict(cls, data: dict) -> LeaseRef:
        return cls(data["backend"], data["key"], data["token"])


class RedisLease:
    """A Redis lock with a time-to-live, held by whoever knows its token (redis-py's Lock)."""

    backend = "redis"

    def __init__(self, settings: Settings, key: str, token: str, ttl: float | None = None):
        self.settings = settings
        self.key = key
        self.token = token
        self.ttl = float(ttl or settings.lease_seconds)
        self._client = redis_client(settings)
        self._lock = self._client.lock(key, timeout=self.ttl, thread_local=False)

    @property
    def ref(self) -> LeaseRef:
        return LeaseRef(self.backend, self.key, self.token)

    def acquire(self) -> bool:
        """Take the lease if nobody holds it (no waiting)."""
        return bool(self._lock.acquire(blocking=False, token=self.token))

    def renew(self) -> bool:
        """Reset the time-to-live while the lease is ours; take it again if it lapsed and nobody took it.
        False: another holder has it now."""
        from redis.exceptions import LockError

        self._lock.local.token = self._client.get_encoder().encode(self.token)
        try:
            return bool(self._lock.reacquire())
        except LockError:
            return self.acquire()

    def release(self) -> None:
        """Give the lease up if it is still ours (a lapsed or taken-over lease is left alone)."""
        from redis.exceptions import LockError

        self._lock.local.token = self._client.get_encoder().encode(self.token)
        try:
            self._lock.release()
        except LockError:
            LOG.debug("lease %s was no longer ours", self.key)

    def holder(self) -> dict | None:
        raw = self._client.get(self.key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return {"run_id": raw.decode(errors="replace")}


class FileLease:
    """An OS lock on OUT/.embedctl.lock (py-filelock), released by the kernel when its process exits."""

    backend = "file"

    def __init__(self, out: str | Path, token: str):
        from filelock import FileLock

        self.out = Path(out)
        self.key = str(self.out / LOCK_FILE)
        self.token = token
        self._lock = FileLock(self.key, timeout=0, thread_local=False)

    @property
    def ref(self) -> LeaseRef:
        return LeaseRef(self.backend, self.key, self.token)

    def acquire(self, write_holder: bool = True) -> bool:
        """Take the lock if no process holds it (no waiting); `write_holder=False` only probes."""
        from filelock import Timeout

        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        except OSError as exc:
            raise storage_error(exc, self.key) from None
        if write_holder:
            write_json(self.out / HOLDER_FILE, json.loads(self.token))
        return True

    def renew(self) -> bool:
        return self._lock.is_locked

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    def holder(self) -> dict | None:
        from embedctl.pipeline.fsutil import read_json

        try:
            return read_json(self.out / HOLDER_FILE)
        except (OSError, ValueError):
            return None


Lease = RedisLease | FileLease


def from_ref(ref: LeaseRef, settings: Settings | None) -> Lease:
    """The lease that `ref` names, to renew or release it from another process."""
    if ref.backend == "redis":
        if settings is None:
            raise ValueError("a Redis lease needs the broker settings")
        return RedisLease(settings, ref.key, ref.token)
    return FileLease(Path(ref.key).parent, ref.token)


@contextmanager
def keep_alive(renew: Callable[[], bool], every: float, name: str = "lease") -> Iterator[threading.Event]:
    """Call `renew` every `every` seconds in a thread while the block runs; the event it yields is set when a
    renewal answers False (the lease went to another holder) so that the holder can stop its work."""
    lost, stop = threading.Event(), threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            try:
                if not renew():
                    lost.set()
                    LOG.warning("%s: lost to another holder", name)
                    return
            except Exception as exc:  # noqa: BLE001 - a broker hiccup: try again at the next beat
                LOG.warning("%s: cannot renew (%s); retrying", name, exc)

    thread = threading.Thread(target=loop, name=f"embedctl-{name}", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join(timeout=5)
