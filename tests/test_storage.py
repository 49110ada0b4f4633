"""The local storage backend: the interface every format module reads and writes an output folder through."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.storage import Folder, LocalStorage, join


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(tmp_path / "out")


def test_keys_are_relative_to_the_output_folder(storage, tmp_path):
    storage.put("versions/v000001/info.json", b"{}")
    assert (tmp_path / "out" / "versions" / "v000001" / "info.json").read_bytes() == b"{}"
    assert storage.local_path("segments/s1/rows.parquet") == tmp_path / "out" / "segments" / "s1" / "rows.parquet"
    for bad in ("/etc/passwd", "../elsewhere", "versions/../../x"):
        with pytest.raises(ValueError, match="relative to the output folder"):
            storage.local_path(bad)
    assert join("versions", "", "v1/", "info.json") == "versions/v1/info.json"
    assert Folder(storage, "versions/v1").child("info.json") == "versions/v1/info.json"


def test_put_is_atomic_private_and_replaces(storage):
    first = storage.put("a/b.bin", b"one")
    second = storage.put("a/b.bin", b"two!")
    assert storage.read_bytes("a/b.bin") == b"two!"
    assert (first.size, second.size) == (3, 4) and first.token != second.token
    path = storage.local_path("a/b.bin")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [e.name for e in storage.list("a")] == ["b.bin"]  # no temporary file is left


def test_put_of_a_local_file_and_write_with_a_hook_before_the_commit(storage, tmp_path):
    source = tmp_path / "local.bin"
    source.write_bytes(b"from a file")
    storage.put("copied.bin", source)
    assert storage.read_bytes("copied.bin") == b"from a file"
    seen = []

    def before(tmp):
        seen.append((tmp.read_bytes(), storage.exists("written.bin")))

    storage.write("written.bin", lambda tmp: tmp.write_bytes(b"by a library"), before_commit=before)
    assert seen == [(b"by a library", False)] and storage.read_bytes("written.bin") == b"by a library"


def test_a_failed_write_leaves_nothing_and_names_the_key(storage):
    def fail(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageError, match="no space left"):
        storage.write("x/y.npy", fail)
    assert storage.list("x") == [] and not storage.exists("x/y.npy")


def test_conditional_create_refuses_a_second_create(storage):
    assert storage.create_if_absent("versions/v000001/info.json", b"first")
    assert not storage.create_if_absent("versions/v000001/info.json", b"second")
    assert storage.read_bytes("versions/v000001/info.json") == b"first"
    assert [e.name for e in storage.list("versions/v000001")] == ["info.json"]


def test_conditional_create_has_one_winner_among_racing_creators(storage):
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
    assert len(winners) == 1 and storage.read_bytes("manifest") == str(winners[0]).encode()


def test_compare_and_swap_of_the_pointer(storage):
    assert storage.read_pointer("current") is None
    assert not storage.compare_and_swap("current", "a-token", "versions/v000001")  # there is none yet
    assert storage.compare_and_swap("current", None, "versions/v000001")
    first = storage.read_pointer("current")
    assert first.value == "versions/v000001"
    assert os.readlink(storage.local_path("current")) == "versions/v000001"  # the layout stays a symlink
    assert not storage.compare_and_swap("current", None, "versions/v000009")  # one exists now
    assert storage.compare_and_swap("current", first.token, "versions/v000002")
    assert not storage.compare_and_swap("current", first.token, "versions/v000003")  # a stale token fails
    assert storage.read_pointer("current").value == "versions/v000002"
    assert sorted(e.name for e in storage.list()) == [".embedctl.pointer.lock", "current"]  # no temporary file left


def test_ranged_reads(storage):
    storage.put("segments/s1/rows.parquet", bytes(range(100)))
    assert storage.read_range("segments/s1/rows.parquet", 10, 5) == bytes(range(10, 15))
    assert storage.read_range("segments/s1/rows.parquet", 95, 50) == bytes(range(95, 100))  # short at the end
    assert storage.read_range("segments/s1/rows.parquet", 200, 4) == b""
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
    storage.delete("work/j1")  # a prefix: everything below it
    storage.delete("work/README")
    storage.delete("work/never")  # nothing there: nothing happens
    assert [e.name for e in storage.list("work")] == ["j2"]


def test_rename_publishes_a_staged_folder_unless_the_name_is_taken(storage):
    staged = storage.staging("versions", ".build-")
    assert staged.startswith("versions/.build-") and storage.is_folder(staged)
    storage.put(join(staged, "info.json"), b"{}")
    assert storage.rename(staged, "versions/v000001")
    other = storage.staging("versions", ".build-")
    storage.put(join(other, "info.json"), b"{}")
    assert not storage.rename(other, "versions/v000001")  # taken: nothing moves
    assert storage.is_folder(other) and storage.read_bytes("versions/v000001/info.json") == b"{}"


def test_the_pointer_swap_locks_a_regular_file_not_the_folder(storage, tmp_path):
    """An NFS client refuses an exclusive lock on a folder (it needs a file open for writing): the swap locks a
    private regular file beside the pointer."""
    from embedctl.pipeline.storage import POINTER_LOCK

    (tmp_path / "out" / "versions" / "v000001").mkdir(parents=True)
    assert storage.compare_and_swap("current", None, "versions/v000001")
    lock = os.lstat(tmp_path / "out" / POINTER_LOCK)
    assert stat.S_ISREG(lock.st_mode) and stat.S_IMODE(lock.st_mode) == 0o600


@pytest.mark.parametrize("spelling", ["absolute", "parent"])
def test_a_pointer_made_by_hand_is_read_whatever_the_spelling_of_the_folder(tmp_path, spelling, monkeypatch):
    """A rollback by hand (`ln -sfn $PWD/out/versions/v000001 out/current`), a `../` link, or the folder reached
    through a symlink or a relative path: the pointer still names the version inside the folder."""
    out = tmp_path / "out"
    (out / "versions" / "v000001").mkdir(parents=True)
    target = {"absolute": str(out / "versions" / "v000001"), "parent": "../out/versions/v000001"}[spelling]
    os.symlink(target, out / "current")
    (tmp_path / "alias").symlink_to(out)
    monkeypatch.chdir(tmp_path)
    for root in ("out", tmp_path / "alias", out):
        found = LocalStorage(root).read_pointer("current")
        assert found is not None and found.value == "versions/v000001", (root, found)


def test_append_is_private_durable_and_ends_a_cut_line_first(storage):
    assert storage.read_appended("runs.jsonl") == b""  # nothing appended yet
    storage.append("runs.jsonl", b'{"a": 1}\n')
    path = storage.local_path("runs.jsonl")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with open(path, "ab") as fh:  # a line cut by a crash
        fh.write(b'{"b": ')
    storage.append("runs.jsonl", b'{"c": 3}\n')
    assert storage.read_appended("runs.jsonl") == b'{"a": 1}\n{"b": \n{"c": 3}\n'
    with pytest.raises(StorageError, match="runs.jsonl/log"):  # an OS error names the key's file
        storage.append("runs.jsonl/log", b"x\n")


def test_touch_renews_the_mtime_of_an_object_only(storage):
    storage.put("work/j1/running/chunk-000000.json", b"{}")
    os.utime(storage.local_path("work/j1/running/chunk-000000.json"), (1, 1))
    storage.touch("work/j1/running/chunk-000000.json")
    assert storage.stat("work/j1/running/chunk-000000.json").mtime > 1
    assert storage.read_bytes("work/j1/running/chunk-000000.json") == b"{}"
    with pytest.raises(FileNotFoundError):
        storage.touch("work/j1/running/build.json")
