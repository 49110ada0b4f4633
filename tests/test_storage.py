"""What only the local backend (`LocalStorage`) does: keys are files under the output folder, private modes, the
pointer as a relative symlink swapped under a lock file, a pointer made by hand, appends to one file. What every
backend does alike is in `test_storage_contract.py`."""

from __future__ import annotations

import os
import stat

import pytest

from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.storage import POINTER_LOCK, LocalStorage


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(tmp_path / "out")


def test_keys_are_files_under_the_output_folder(storage, tmp_path):
    storage.put("versions/v000001/info.json", b"{}")
    assert (tmp_path / "out" / "versions" / "v000001" / "info.json").read_bytes() == b"{}"
    assert storage.local_path("segments/s1/rows.parquet") == tmp_path / "out" / "segments" / "s1" / "rows.parquet"
    assert storage.local_path("") == tmp_path / "out" and storage.root == str(tmp_path / "out")
    assert storage.describe("versions/v000001/info.json") == str(tmp_path / "out" / "versions" / "v000001" / "info.json")


def test_objects_and_folders_are_private(storage):
    storage.put("a/b.bin", b"one")
    storage.put("a/b.bin", b"two!")  # a replaced file keeps its mode
    path = storage.local_path("a/b.bin")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    staged = storage.local_path(storage.staging("versions", ".build-"))
    assert staged.is_dir() and stat.S_IMODE(staged.stat().st_mode) == 0o700


def test_the_pointer_is_a_relative_symlink_replaced_at_once(storage):
    """The layout a user sees (`ls -l out/current`): a symlink to the version's folder, replaced with a rename, no
    temporary link left beside it."""
    assert storage.compare_and_swap("current", None, "versions/v000001")
    assert os.readlink(storage.local_path("current")) == "versions/v000001"
    assert storage.compare_and_swap("current", storage.read_pointer("current").token, "versions/v000002")
    assert os.readlink(storage.local_path("current")) == "versions/v000002"
    assert sorted(os.listdir(storage.local_path(""))) == sorted([POINTER_LOCK, "current"])


def test_the_pointer_swap_locks_a_regular_file_not_the_folder(storage, tmp_path):
    """An NFS client refuses an exclusive lock on a folder (it needs a file open for writing): the swap locks a
    private regular file beside the pointer."""
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
    storage.append("runs.jsonl", b'{"a": 1}\n')
    path = storage.local_path("runs.jsonl")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with open(path, "ab") as fh:  # a line cut by a crash
        fh.write(b'{"b": ')
    storage.append("runs.jsonl", b'{"c": 3}\n')
    assert storage.read_appended("runs.jsonl") == b'{"a": 1}\n{"b": \n{"c": 3}\n'
    with pytest.raises(StorageError, match="runs.jsonl/log"):  # an OS error names the key's file
        storage.append("runs.jsonl/log", b"x\n")
