"""An output folder (or a corpus) on S3 or an S3-compatible store: `S3Storage`, the remote backend of
`pipeline.storage.Storage`, and the one S3 client of a process.

Why boto3 (`python -m bench.s3client`, side by side against one SeaweedFS server): obstore was 2-4x faster on small
requests, but a child forked after its parent used obstore hangs on its first request (its Rust runtime does not
survive a fork), and Celery's prefork pool and `serve`'s workers are forked; boto3 in a forked child works. Both
enforce the two conditional writes a commit needs (If-None-Match: * and If-Match: ETag).

- Credentials, region and endpoint come the way every AWS tool takes them: `AWS_ACCESS_KEY_ID`,
  `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, `AWS_REGION`, `AWS_ENDPOINT_URL` (a MinIO, Ceph,
  R2 or SeaweedFS server). No message, report or job file ever holds a credential: errors name the URI.
- Retries: botocore's standard mode (throttling such as 503 SlowDown, 5xx, connection errors, with backoff); past
  those, a store that answered before in this process is waited for up to `RETRY_SECONDS` (a restart, a cut link)
  before the error is raised; one that never answered fails at once, with one line.
- Immutable objects are cached locally by key (`local_path`): index files, rows and chunk vectors are opened by
  faiss, pyarrow and numpy from the cache. The cache is bounded (`configure_cache`: least recently used files are
  evicted) and keys that may be replaced (a chunk re-written by a retried task) are checked by ETag.
- Requests are counted per process (`requests()`), so a run report can say what a run cost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.storage import Entry, Pointer, Stat, Storage, Writer, is_immutable, is_uri, join

SCHEME = "s3://"
RETRY_SECONDS = 120.0
"""How long a store that answered before is waited for (it restarts, a link comes back) before a request fails."""
FIRST_CONTACT_ATTEMPTS = 3
MULTIPART_BYTES = 64 << 20
"""Objects at least this large are uploaded in parts (several at once); a failed upload's parts are aborted."""
DEFAULT_CACHE = Path("~/.cache/embedctl/s3")

_OPS = {"GetObject": "GET", "HeadObject": "HEAD", "PutObject": "PUT", "UploadPart": "PUT",
        "CreateMultipartUpload": "PUT", "CompleteMultipartUpload": "PUT", "CopyObject": "PUT",
        "ListObjectsV2": "LIST", "DeleteObject": "DELETE", "DeleteObjects": "DELETE", "AbortMultipartUpload": "DELETE",
        "ListMultipartUploads": "LIST"}


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, key prefix) of `s3://bucket/prefix`."""
    if not is_uri(uri):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    bucket, _, prefix = uri[len(SCHEME):].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket; write s3://BUCKET/PREFIX")
    return bucket, prefix.strip("/")


# --- the process's client, request counts, cache settings -------------------------------------------------------

_lock = threading.Lock()
_client: tuple[int, object] | None = None  # (pid, client): a forked child makes its own
_counts: Counter = Counter()
_count_lock = threading.Lock()
_answered = False


@dataclass
class CacheConfig:
    folder: Path = DEFAULT_CACHE
    max_bytes: int | None = None  # None: unbounded


_cache: CacheConfig | None = None  # from the settings on first use, unless a command configured it


def configure_cache(folder: Path | str | None = None, max_bytes: int | None = None, export: bool = False) -> None:
    """Where remote objects are cached and how large the cache may grow (`--cache-dir`, `--cache-size`);
    `export`: the processes this one starts (server and worker processes) inherit it through the environment."""
    global _cache, _estimate
    _cache = CacheConfig(Path(folder).expanduser() if folder else _settings().folder, max_bytes)
    _estimate = _Estimate()
    if not export:
        return
    os.environ["EMBEDCTL_CACHE_DIR"] = str(_cache.folder)
    if max_bytes:
        os.environ["EMBEDCTL_CACHE_SIZE"] = str(max_bytes)
    else:
        os.environ.pop("EMBEDCTL_CACHE_SIZE", None)


def _settings() -> CacheConfig:
    from embedctl.settings import setting

    return CacheConfig(setting("cache_dir") or DEFAULT_CACHE, setting("cache_size"))


def _config() -> CacheConfig:
    global _cache
    if _cache is None:
        _cache = _settings()
    return _cache


def cache_folder() -> Path:
    return _config().folder.expanduser()


def requests() -> dict[str, int]:
    """Requests this process sent (GET, HEAD, PUT, LIST, DELETE) and bytes it moved (`bytes_up`, `bytes_down`)."""
    with _count_lock:
        return dict(_counts)


_local = threading.local()


@contextlib.contextmanager
def at_once() -> Iterator[None]:
    """Requests of this thread fail at once when the store does not answer (a server's background poll, which tries
    again soon), instead of waiting it out."""
    _local.at_once = True
    try:
        yield
    finally:
        _local.at_once = False


def ride_out_outages() -> None:
    """Wait out a store that does not answer (up to `RETRY_SECONDS`) even before this process reached it: what a
    worker's processes do, since every task they get was planned by a process that reached the store."""
    global _answered
    _answered = True


def requests_since(before: dict[str, int]) -> dict[str, int]:
    """The requests sent and bytes moved since `before` (a `requests()` of earlier)."""
    now = requests()
    return {k: n - before.get(k, 0) for k, n in now.items() if n - before.get(k, 0)}


def _count(model, **_) -> None:
    with _count_lock:  # transfers send from their own threads
        _counts[_OPS.get(model.name, "OTHER")] += 1


def _count_bytes(kind: str, n: int) -> None:
    with _count_lock:
        _counts[kind] += n


def client():
    """The process's S3 client (made after a fork anew: a client's connections are not shared across processes)."""
    global _client
    with _lock:
        if _client is not None and _client[0] == os.getpid():
            return _client[1]
        import boto3
        from botocore.config import Config

        session = boto3.session.Session()
        made = session.client("s3", config=Config(retries={"mode": "standard", "max_attempts": FIRST_CONTACT_ATTEMPTS},
                                                  connect_timeout=5, read_timeout=60,
                                                  max_pool_connections=32))
        made.meta.events.register("before-call.s3.*", _count)
        _client = (os.getpid(), made)
        return made


def endpoint() -> str:
    """The endpoint the client sends to, without any user or password in it (for messages)."""
    if _client is None:
        return "the S3 endpoint"  # no client could be made (a wrong profile, say): the error says why
    url = str(_client[1].meta.endpoint_url)
    parts = urlsplit(url)
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl() \
        if parts.hostname else url


def _status(exc) -> int:
    return int(getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _code(exc) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _transient(exc) -> bool:
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, ConnectionError | HTTPClientError):
        return True
    return isinstance(exc, ClientError) and (_status(exc) >= 500 or _code(exc) in ("SlowDown", "Throttling",
                                                                                   "RequestTimeout"))


class Replaced(Exception):
    """A pinned read (`read_range(..., etag=)`) of an object that was replaced since its ETag was taken."""


def call(uri: str, action: str, fn):
    """`fn()` (one S3 request of `action` on `uri`), retried past botocore's own retries while a store that answered
    before is down (`RETRY_SECONDS`); its errors as one `StorageError` line naming `uri` (FileNotFoundError for a
    missing object)."""
    global _answered
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    deadline, pause = time.monotonic() + RETRY_SECONDS, 0.5
    while True:
        try:
            result = fn()
            _answered = True
            return result
        except NoCredentialsError:
            raise StorageError(f"no S3 credentials to {action} {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                               "(or AWS_PROFILE)") from None
        except Boto3Error as exc:  # a managed transfer (a large upload or download) that failed past its retries
            inner = getattr(exc, "last_exception", None) or exc.__cause__ or exc.__context__
            if isinstance(inner, ClientError) and not _transient(inner) and _code(inner) != "NoSuchUpload":
                # (NoSuchUpload: the multipart upload was aborted under it, e.g. by `cache prune`: a new one may do)
                raise _error(inner, uri, action) from None  # refused (denied, no bucket): waiting will not help
            if _answered and not getattr(_local, "at_once", False) and time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 8.0)
                continue
            cause = (_code(inner) or type(inner).__name__) if inner is not None else type(exc).__name__
            raise StorageError(f"cannot {action} {uri}: the transfer failed ({cause}); check the store and the "
                               "network, then run again") from None
        except (ClientError, BotoCoreError) as exc:
            if isinstance(exc, ClientError) and (_status(exc) == 404 or _code(exc) in ("NoSuchKey", "404")) \
                    and _code(exc) != "NoSuchBucket":
                raise FileNotFoundError(uri) from None
            if _transient(exc) and _answered and not getattr(_local, "at_once", False) \
                    and time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, 8.0)
                continue
            raise _error(exc, uri, action) from None


def _error(exc, uri: str, action: str) -> StorageError:
    from botocore.exceptions import ClientError, NoRegionError, PartialCredentialsError, ProfileNotFound

    if isinstance(exc, ProfileNotFound):
        return StorageError(f"the AWS profile in AWS_PROFILE does not exist (while trying to {action} {uri}); name a "
                            "profile of ~/.aws/config, or unset AWS_PROFILE")
    if isinstance(exc, PartialCredentialsError):
        return StorageError(f"incomplete S3 credentials to {action} {uri}: set both AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if isinstance(exc, NoRegionError):
        return StorageError(f"no AWS region to {action} {uri}: set AWS_REGION")
    code, status = _code(exc), _status(exc)
    if code == "NoSuchBucket":
        bucket = split_uri(uri)[0]
        return StorageError(f"the bucket {bucket!r} does not exist at {endpoint()} (while trying to {action} {uri}); "
                            "create it, or check the URI and AWS_ENDPOINT_URL")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
        return StorageError(f"the S3 credentials were refused by {endpoint()} ({code}, while trying to {action} "
                            f"{uri}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
        return StorageError(f"access denied to {action} {uri}; grant these credentials access to that bucket and "
                            "prefix")
    if isinstance(exc, ClientError):
        return StorageError(f"cannot {action} {uri}: {code or status} from {endpoint()}; check the store, then run "
                            "again")
    return StorageError(f"cannot {action} {uri}: the S3 endpoint {endpoint()} does not answer "
                        f"({type(exc).__name__}); check AWS_ENDPOINT_URL and the network, then run again")


# --- the storage -------------------------------------------------------------------------------------------------


class S3Storage(Storage):
    """An output folder under `s3://bucket/prefix` (see the module doc and `pipeline.storage`)."""

    def __init__(self, uri: str):
        self.bucket, self.prefix = split_uri(uri)
        self._uri = f"{SCHEME}{self.bucket}/{self.prefix}".rstrip("/")

    def __repr__(self) -> str:
        return f"S3Storage({self._uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Storage) and other._uri == self._uri

    def __hash__(self) -> int:
        return hash(self._uri)

    @property
    def root(self) -> str:
        return self._uri

    def describe(self, key: str = "") -> str:
        return f"{self._uri}/{key}" if key else self._uri

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"a storage key is relative to the output folder, got {key!r}")
        return join(self.prefix, key)

    def _call(self, key: str, action: str, fn):
        return call(self.describe(key), action, fn)

    # reads

    def read_bytes(self, key: str) -> bytes:
        data = self._call(key, "read", lambda: client().get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
                          .read())
        _count_bytes("bytes_down", len(data))
        return data

    def read_range(self, key: str, start: int, length: int, etag: str = "") -> bytes:
        """`Storage.read_range`; with `etag`, only from that version of the object (`If-Match`): `Replaced` when the
        object was replaced since, so that a reader never mixes two versions' bytes."""
        if start < 0 or length < 0:
            raise ValueError(f"a range starts and lasts >= 0 bytes, got start {start!r}, length {length!r}")
        if length == 0:
            return b""
        pinned = {"IfMatch": etag} if etag else {}

        def get() -> bytes:
            try:
                return client().get_object(Bucket=self.bucket, Key=self._key(key),
                                           Range=f"bytes={start}-{start + length - 1}", **pinned)["Body"].read()
            except Exception as exc:
                if _status(exc) == 416:  # the range starts at or past the end
                    return b""
                if etag and _status(exc) == 412:
                    raise Replaced(self.describe(key)) from None
                raise

        data = self._call(key, "read", get)
        _count_bytes("bytes_down", len(data))
        return data

    def stat(self, key: str) -> Stat | None:
        try:
            head = self._call(key, "read", lambda: client().head_object(Bucket=self.bucket, Key=self._key(key)))
            return Stat(int(head["ContentLength"]), head["LastModified"].timestamp(), head["ETag"])
        except FileNotFoundError:
            pass
        newest = None  # a folder: its newest object says when it was last written
        size = 0
        for _, st in self.walk(key):
            size += st.size
            newest = st if newest is None or st.mtime > newest.mtime else newest
        return Stat(size, newest.mtime, newest.token) if newest else None

    def is_folder(self, key: str) -> bool:
        found = self._call(key, "list", lambda: client().list_objects_v2(
            Bucket=self.bucket, Prefix=self._key(key) + "/", MaxKeys=1))
        return bool(found.get("KeyCount"))

    def _pages(self, key: str, delimiter: bool) -> Iterator[dict]:
        prefix = self._key(key)
        prefix = prefix + "/" if prefix else ""
        args = {"Bucket": self.bucket, "Prefix": prefix, **({"Delimiter": "/"} if delimiter else {})}
        while True:
            page = self._call(key, "list", lambda: client().list_objects_v2(**args))
            yield page
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]

    def _relative(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def list(self, prefix: str = "") -> list[Entry]:
        found: dict[str, Entry] = {}
        for page in self._pages(prefix, delimiter=True):
            for common in page.get("CommonPrefixes", []):
                name = common["Prefix"].rstrip("/").rsplit("/", 1)[-1]
                found[name] = Entry(name, join(prefix, name), True)
            for obj in page.get("Contents", []):
                name = obj["Key"].rsplit("/", 1)[-1]
                if name:
                    found.setdefault(name, Entry(name, join(prefix, name), False))
        return [found[name] for name in sorted(found)]

    def walk(self, prefix: str) -> Iterator[tuple[str, Stat]]:
        for page in self._pages(prefix, delimiter=False):
            for obj in page.get("Contents", []):
                yield self._relative(obj["Key"]), Stat(int(obj["Size"]), obj["LastModified"].timestamp(), obj["ETag"])

    # the local cache

    def cache_path(self, key: str) -> Path:
        """Where the cached copy of `key` lives (whether or not it is there)."""
        return cache_folder() / self.bucket / self._key(key)

    def local_path(self, key: str) -> Path:
        path = self.cache_path(key)
        if not key:
            return path
        mutable = not is_immutable(key)
        if path.is_dir():
            return path  # a folder (for messages, or a caller that joins names to it)
        if path.is_file() and (not mutable or _cached_token(path) == (self.stat(key) or Stat(0, 0, "")).token):
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: evicted last
            return path
        if not mutable or not self.is_folder(key):
            self._fill(key, path)
        return path

    def drop_copy(self, key: str) -> None:
        with contextlib.suppress(OSError):
            self.cache_path(key).unlink(missing_ok=True)

    def _fill(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            head = self._call(key, "read", lambda: client().head_object(Bucket=self.bucket, Key=self._key(key)))
            self._call(key, "read", lambda: client().download_file(self.bucket, self._key(key), str(tmp)))
            size = tmp.stat().st_size
            _count_bytes("bytes_down", size)
            os.replace(tmp, path)
            _set_token(path, head["ETag"])
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            if path.is_file():
                path.unlink()  # a copy of an object deleted since is stale
            return  # a missing object has no copy: the caller's open says it is missing
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        evict(keep=path, added=size)

    # writes

    def write(self, key: str, write: Writer, before_commit: Writer | None = None) -> Stat:
        path = self.cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            write(tmp)
            if before_commit is not None:
                before_commit(tmp)
            stat = self._upload(key, tmp)
            size = tmp.stat().st_size
            os.replace(tmp, path)  # the writer's own later reads come from here
            _set_token(path, stat.token)
        except OSError as exc:
            from embedctl.pipeline.fsutil import storage_error

            raise storage_error(exc, path) from None
        finally:
            tmp.unlink(missing_ok=True)
        evict(keep=path, added=size)
        return stat

    def _upload(self, key: str, local: Path, **conditions) -> Stat:
        size = local.stat().st_size
        if size < MULTIPART_BYTES or conditions:
            with open(local, "rb") as fh:
                body = fh.read()
            reply = self._call(key, "write", lambda: client().put_object(Bucket=self.bucket, Key=self._key(key),
                                                                         Body=body, **conditions))
            _count_bytes("bytes_up", size)
            return Stat(size, time.time(), reply["ETag"])
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=16 << 20, max_concurrency=8)
        # s3transfer aborts the multipart upload when a part fails; `cache prune` collects any left by a killed process
        self._call(key, "write", lambda: client().upload_file(str(local), self.bucket, self._key(key), Config=config))
        _count_bytes("bytes_up", size)
        return self.stat(key) or Stat(size, time.time(), "")

    def put(self, key: str, data: bytes | Path) -> Stat:
        if isinstance(data, Path):
            return self.write(key, lambda tmp: shutil.copyfile(data, tmp))
        reply = self._call(key, "write", lambda: client().put_object(Bucket=self.bucket, Key=self._key(key),
                                                                     Body=data))
        _count_bytes("bytes_up", len(data))
        cached = self.cache_path(key)
        if cached.exists():  # a replaced object: the old copy is stale
            cached.unlink(missing_ok=True)
        return Stat(len(data), time.time(), reply["ETag"])

    def copy(self, src: str, dst: str) -> Stat:
        self._call(dst, "write", lambda: client().copy({"Bucket": self.bucket, "Key": self._key(src)}, self.bucket,
                                                       self._key(dst)))
        cached = self.cache_path(dst)
        if cached.exists():
            cached.unlink(missing_ok=True)
        return self.stat(dst) or Stat(0, time.time(), "")

    def append(self, key: str, data: bytes) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        self.put(join(key, f"{stamp}-{uuid.uuid4().hex[:8]}"), data)

    def read_appended(self, key: str) -> bytes:
        parts = []
        with contextlib.suppress(FileNotFoundError):
            parts.append(self.read_bytes(key))
        for name, _ in sorted(self.walk(key)):
            with contextlib.suppress(FileNotFoundError):
                parts.append(self.read_bytes(name))
        return b"".join(p if p.endswith(b"\n") else p + b"\n" for p in parts if p)

    def _conditional_put(self, key: str, data: bytes, **condition) -> bool:
        from botocore.exceptions import ClientError

        def put():
            try:
                client().put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
                return True
            except ClientError as exc:
                # 412: the condition failed; 409: a conditional write raced another to the same key
                if _status(exc) in (409, 412) or _code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                if "IfMatch" in condition and _status(exc) == 404:  # AWS: If-Match on a key that is not there
                    return False
                raise

        done = self._call(key, "write", put)
        if done:
            _count_bytes("bytes_up", len(data))
        return done

    def create_if_absent(self, key: str, data: bytes) -> bool:
        return self._conditional_put(key, data, IfNoneMatch="*")

    def read_pointer(self, key: str) -> Pointer | None:
        try:
            reply = self._call(key, "read", lambda: client().get_object(Bucket=self.bucket, Key=self._key(key)))
        except FileNotFoundError:
            return None
        value = reply["Body"].read().decode("utf-8", "replace").strip()
        return Pointer(value, reply["ETag"])

    def compare_and_swap(self, key: str, expected: str | None, value: str) -> bool:
        data = (value + "\n").encode()
        if expected is None:
            return self._conditional_put(key, data, IfNoneMatch="*")
        return self._conditional_put(key, data, IfMatch=expected)

    def delete(self, key: str) -> None:
        keys = [self._key(key)] if key else []
        below = [k for k, _ in self.walk(key)]
        keys += [self._key(k) for k in below]
        # A store with real directories (SeaweedFS) keeps the emptied folders, and lists them: their keys ("a/b/")
        # go last, deepest first (elsewhere, deleting a key that is not there does nothing)
        folders = {k.rsplit("/", n)[0] for k in below for n in range(1, k[len(key):].count("/") + 1)}
        keys += [self._key(f) + "/" for f in sorted(folders, key=lambda f: (-f.count("/"), f)) if f]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            reply = self._call(key, "delete", lambda b=batch: client().delete_objects(
                Bucket=self.bucket, Delete={"Objects": b, "Quiet": True}))
            # a quiet delete reports only what it could not delete (a folder that filled again meanwhile is kept)
            if failed := [e for e in reply.get("Errors", []) if not e.get("Key", "").endswith("/")]:
                raise StorageError(f"cannot delete {self.describe(self._relative(failed[0]['Key']))}: "
                                   f"{failed[0].get('Code', 'refused')} from {endpoint()} ({len(failed)} objects "
                                   "not deleted); check the store and its permissions, then run again")
        with contextlib.suppress(OSError):
            cached = self.cache_path(key)
            if cached.is_dir():
                shutil.rmtree(cached, ignore_errors=True)
            else:
                cached.unlink(missing_ok=True)

    def rename(self, src: str, dst: str, commit: str | None = None) -> bool:
        """Copy the objects of `src` to `dst`, each created only if absent and `commit` last; False (and the objects
        this call created removed) when `dst` is taken. The staged objects are removed once the copy is complete."""
        if self.is_folder(dst):
            return False
        objects = sorted(k for k, _ in self.walk(src))
        names = [k[len(src) + 1:] for k in objects]
        if commit is not None:  # the commit object last: a reader that finds it finds the rest
            if commit not in names:
                raise StorageError(f"cannot publish {self.describe(src)}: it has no {commit} (the build did not "
                                   "finish); run the job again")
            names.remove(commit)
            names.append(commit)
        created: list[str] = []
        for name in names:
            target = join(dst, name)
            data = self.read_bytes(join(src, name))
            if self.create_if_absent(target, data):
                created.append(target)
            elif name != commit or not self._holds(target, data):  # the commit: ours when it holds our manifest
                for key in created:  # (an object equal to ours may be another publisher's: never removed)
                    self._call(key, "delete", lambda k=key: client().delete_object(Bucket=self.bucket,
                                                                                   Key=self._key(k)))
                return False
        self.delete(src)
        return True

    def abort_uploads(self, older_than: float) -> int:
        """Abort the multipart uploads under this folder started more than `older_than` seconds ago (a process killed
        while uploading leaves its parts, which the store keeps and bills); returns how many."""
        found = self._call("", "list", lambda: client().list_multipart_uploads(
            Bucket=self.bucket, Prefix=self._key("") + "/" if self.prefix else ""))
        aborted = 0
        for upload in found.get("Uploads", []):
            if time.time() - upload["Initiated"].timestamp() < older_than:
                continue
            self._call("", "delete", lambda u=upload: client().abort_multipart_upload(
                Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"]))
            aborted += 1
        return aborted

    def _holds(self, key: str, data: bytes) -> bool:
        """Whether `key` holds `data`: a conditional create refused because its own earlier attempt, whose answer was
        lost, created the object (botocore retried it)."""
        try:
            return self.read_bytes(key) == data
        except FileNotFoundError:
            return False

    def staging(self, prefix: str, name_prefix: str) -> str:
        return join(prefix, f"{name_prefix}{uuid.uuid4().hex[:12]}")


# --- cache bookkeeping -------------------------------------------------------------------------------------------

_TOKEN = "user.embedctl.etag"


def _set_token(path: Path, token: str) -> None:
    """Remember which version of the object a cached file holds (an xattr; a sidecar file where none is allowed)."""
    try:
        os.setxattr(path, _TOKEN, token.encode())
    except OSError:
        path.with_name(path.name + ".etag").write_text(token)


def _cached_token(path: Path) -> str | None:
    try:
        return os.getxattr(path, _TOKEN).decode()
    except OSError:
        side = path.with_name(path.name + ".etag")
        return side.read_text() if side.exists() else None


RESCAN_FILLS = 64
"""Between two walks of the cache folder a process counts the bytes it added itself, and walks it again (to see
what other processes added) once its count passes `--cache-size` or after this many fills."""


@dataclass
class _Estimate:
    total: int | None = None  # bytes in the cache folder at the last walk, plus what this process added since
    fills: int = 0


_estimate = _Estimate()
_estimate_lock = threading.Lock()


def evict(keep: Path | None = None, added: int = 0) -> list[Path]:
    """Remove the least recently used cached files until the cache fits `--cache-size` (never `keep`, the file
    just filled, of `added` bytes); returns what was removed. The folder is walked only when this process's count
    says it may be full, or every `RESCAN_FILLS` fills, not on every fill."""
    limit = _config().max_bytes
    root = cache_folder()
    if limit is None or not root.is_dir():
        return []
    with _estimate_lock:
        if _estimate.total is not None and _estimate.fills < RESCAN_FILLS and _estimate.total + added <= limit:
            _estimate.total += added
            _estimate.fills += 1
            return []
    files = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            with contextlib.suppress(OSError):
                st = path.stat()
                files.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in files)
    removed = []
    for _, size, path in sorted(files, key=lambda f: f[0]):
        if total <= limit:
            break
        if path == keep or path.name.startswith(".") or path.name.endswith(".etag") or _cached_token(path) is None:
            continue  # only copies of objects: never a lock or verdicts file, a sidecar or a file being filled
        with contextlib.suppress(OSError):
            path.unlink()
            total -= size
            removed.append(path)
    with _estimate_lock:
        _estimate.total, _estimate.fills = total, 0
    return removed
