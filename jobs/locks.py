"""Locks as leases: one API, a Redis backend (redis-py's Lock) and a file backend (py-filelock).

A lease is taken without waiting and names its holder (run id, host, pid, mode, start) so that whoever finds it
taken can say who holds it. No lease outlives its holder:
- a Redis lease expires `ttl` seconds after its last renewal; holders renew it every third of that while they
  work (`keep_alive`), and any process that knows the token (a worker running a chunk of the run, the build
  task) can renew it, so a run whose processes all died releases its lock within `ttl`;
- a file lease is an OS lock on a file (flock through py-filelock), released by the kernel when its process
  exits, however it exits;
- a Redis lease whose taker follows its run (`mark_followed`: `embedctl index --broker` without --detach) and
  died is taken over at once by the next run, when this host can prove it dead: the holder record names the host,
  the machine (boot id and pid namespace), the user, the pid and the process's start time, and on that machine a
  pid that is gone, a zombie, or a process started at another time is no longer the holder.

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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from embedctl.pipeline.fsutil import FILE_MODE, json_writer, make_dirs, storage_error
from embedctl.pipeline.storage import is_uri, location, storage_of
from embedctl.settings import setting

if TYPE_CHECKING:  # the broker module is imported where a Redis lease is made: an embedded run never needs it
    from embedctl.jobs.broker import Settings

LOG = logging.getLogger(__name__)

LOCK_FILE = ".embedctl.lock"
HOLDER_FILE = ".embedctl.lock.json"


FOLLOWED = ":followed"
"""Suffix of the key that says a lease's taker keeps it alive itself (value: its run id; same time-to-live)."""
_UNMARK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def lease_seconds(settings: Settings | None = None) -> int:
    """The lease time-to-live: the settings', else EMBEDCTL_LEASE_SECONDS, else the default (embedded runs have no
    broker settings but judge the liveness of Celery runs by the same clock)."""
    if settings is not None:
        return settings.lease_seconds
    return setting("lease_seconds")


def holder_record(run_id: str, mode: str, job: str | None = None) -> dict:
    """Who takes a lease: shown to whoever finds it taken, and what proves later whether that process still runs
    (`holder_gone`)."""
    return {"run_id": run_id, "mode": mode, "job": job, "host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"), "machine": _machine(), "uid": os.getuid(),
            "pid_start": _process_start(os.getpid())}


def _machine() -> str | None:
    """This machine as its processes see it: the kernel's boot id and our pid namespace (two containers with one
    host name are two machines: a pid of one means nothing in the other). None without /proc."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _process_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) of process `pid` from /proc/PID/stat; None if unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces and parentheses
    try:
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (IndexError, ValueError):
        return None


def _process_start(pid: int) -> int | None:
    stat = _process_stat(pid)
    return stat[1] if stat else None


def holder_gone(holder: dict | None) -> str | None:
    """Why the process that took a lease is provably gone ('pid 12 is gone', 'pid 12 is another process now'),
    or None when it may still run: on another host or machine, of another user, a record without the facts, or a
    live process."""
    if not holder or holder.get("host") != socket.gethostname() or holder.get("uid") != os.getuid():
        return None
    machine, pid = holder.get("machine"), holder.get("pid")
    if not machine or machine != _machine() or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} is gone"
    except PermissionError:
        return None  # a process of another user has that pid: it is not ours to judge
    stat = _process_stat(pid)
    if stat is None:
        return None
    state, start = stat
    if state in ("Z", "X"):
        return f"pid {pid} has exited"
    if holder.get("pid_start") is not None and start != holder["pid_start"]:
        return f"pid {pid} is another process now"
    return None


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
    name = str(out).rstrip("/") if is_uri(str(out)) else str(Path(out).resolve())  # a URI: the same on every host
    return "embedctl:lock:out:" + hashlib.sha256(name.encode()).hexdigest()[:16]


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


_TAKE_OVER = """
if redis.call('get', KEYS[1]) == ARGV[1] and redis.call('get', KEYS[2]) == ARGV[2] then
    redis.call('set', KEYS[1], ARGV[3], 'PX', ARGV[4])
    redis.call('del', KEYS[2])
    return 1
end
return 0
"""


class RedisLease:
    """A Redis lock with a time-to-live, held by whoever knows its token (redis-py's Lock)."""

    backend = "redis"

    def __init__(self, settings: Settings, key: str, token: str, ttl: float | None = None):
        self.settings = settings
        self.key = key
        self.token = token
        from embedctl.jobs.broker import redis_client

        self.ttl = float(ttl or settings.lease_seconds)
        self._client = redis_client(settings)
        self._lock = self._client.lock(key, timeout=self.ttl, thread_local=False)

    @property
    def ref(self) -> LeaseRef:
        return LeaseRef(self.backend, self.key, self.token)

    def acquire(self) -> bool:
        """Take the lease if nobody holds it (no waiting), or if its holder followed its run and is provably dead
        (`holder_gone`): then one warning says whose lease was taken over and why."""
        return self._take() or self._take_over()

    def _take(self) -> bool:
        return bool(self._lock.acquire(blocking=False, token=self.token))

    def _take_over(self) -> bool:
        """Replace the lease of a dead follower by ours, atomically (only if nothing changed since we looked)."""
        raw = self._client.get(self.key)
        followed = self._client.get(self.key + FOLLOWED)
        if raw is None or followed is None:
            return False
        try:
            holder = json.loads(raw)
        except ValueError:
            return False
        if not isinstance(holder, dict) or followed.decode(errors="replace") != holder.get("run_id"):
            return False  # a detached run lives on in its workers, whatever became of its submitter
        reason = holder_gone(holder)
        if reason is None:
            return False
        swapped = self._client.eval(_TAKE_OVER, 2, self.key, self.key + FOLLOWED, raw, followed, self.token,
                                    int(self.ttl * 1000))
        if not swapped:
            return False
        self.taken_over = holder
        LOG.warning("took over the lease of %s: its follower died (%s); this run goes on with the job (complete "
                    "chunks are kept)", describe_holder(holder), reason)
        return True

    def unmark_followed(self) -> None:
        """Say that nobody follows the run any more although it lives on in its workers (its follower stopped
        following: Ctrl-C, a timeout): its lease is then waited out, never taken over."""
        run_id = json.loads(self.token).get("run_id", "")
        self._client.eval(_UNMARK, 1, self.key + FOLLOWED, run_id)

    def mark_followed(self) -> None:
        """Say that the process that took this lease keeps it alive itself (it follows its run), for as long as
        the lease lives: if it dies, the next run on its host may take the lease over at once (`acquire`)."""
        run_id = json.loads(self.token).get("run_id", "")
        self._client.set(self.key + FOLLOWED, run_id, px=int(self.ttl * 1000))

    def renew(self) -> bool:
        """Reset the time-to-live while the lease is ours; take it again if it lapsed and nobody took it.
        False: another holder has it now."""
        from redis.exceptions import LockError

        self._lock.local.token = self._client.get_encoder().encode(self.token)
        try:
            return bool(self._lock.reacquire())
        except LockError:
            return self._take()  # never a take-over: a run superseded by a live one must not come back

    def release(self) -> None:
        """Give the lease up if it is still ours (a lapsed or taken-over lease is left alone)."""
        from redis.exceptions import LockError

        self._lock.local.token = self._client.get_encoder().encode(self.token)
        try:
            self._lock.release()
        except LockError:
            LOG.debug("lease %s was no longer ours", self.key)
            return
        run_id = json.loads(self.token).get("run_id", "")
        if (self._client.get(self.key + FOLLOWED) or b"").decode(errors="replace") == run_id:
            self._client.delete(self.key + FOLLOWED)

    def holder(self) -> dict | None:
        raw = self._client.get(self.key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return {"run_id": raw.decode(errors="replace")}


class FileLease:
    """An OS lock on OUT/.embedctl.lock (py-filelock), released by the kernel when its process exits. An output
    folder on an object store has no file to lock: the lock file is then in this host's cache folder of it, which
    keeps two runs of one host apart; runs of two hosts are kept apart by the conditional commit of a version."""

    backend = "file"

    def __init__(self, out: str | Path, token: str):
        from filelock import FileLock

        self.out = location(out)
        self.folder = storage_of(self.out).local_path("") if is_uri(self.out) else Path(self.out)
        self.key = str(self.folder / LOCK_FILE)
        self.token = token
        self._lock = FileLock(self.key, timeout=0, thread_local=False, mode=FILE_MODE)

    @property
    def ref(self) -> LeaseRef:
        return LeaseRef(self.backend, self.key, self.token)

    def acquire(self, write_holder: bool = True) -> bool:
        """Take the lock if no process holds it (no waiting); `write_holder=False` only probes."""
        from filelock import Timeout

        try:
            make_dirs(self.folder)
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        except OSError as exc:
            raise storage_error(exc, self.key) from None
        if write_holder:
            storage = storage_of(self.out)
            storage.write(HOLDER_FILE, json_writer(json.loads(self.token)))
        return True

    def renew(self) -> bool:
        return self._lock.is_locked

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    def holder(self) -> dict | None:
        storage = storage_of(self.out)
        try:
            return json.loads(storage.read_bytes(HOLDER_FILE))
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
        failing_since = None
        while not stop.wait(every):
            try:
                if not renew():
                    lost.set()
                    LOG.warning("%s: lost to another holder", name)
                    return
            except Exception as exc:  # noqa: BLE001 - a broker hiccup: try again at the next beat
                # one warning per outage, not one per beat (a Redis restart would fill the terminal)
                log = LOG.debug if failing_since is not None else LOG.warning
                log("%s: cannot renew (%s); retrying every %.0f s", name, exc, every)
                failing_since = failing_since or time.monotonic()
                continue
            if failing_since is not None:
                LOG.warning("%s: renewed again after %.0f s", name, time.monotonic() - failing_since)
                failing_since = None

    thread = threading.Thread(target=loop, name=f"embedctl-{name}", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join(timeout=5)
