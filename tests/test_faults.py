"""Fault injection: every kind of file the pipeline writes, truncated, garbled (same size), deleted or unreadable,
and a full disk at every write. Each fault ends in one line and a non-zero exit or in a self-repair; the published
version stays servable; no wrong result is ever printed."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from embedctl.cli import main
from tests import indexfiles
from tests.services import mount_tmpfs

HOWS = ("truncated", "garbled", "deleted", "unreadable")
QUERY = "a domestic animal that barks"
QUERIES = Path(__file__).resolve().parent.parent / "examples" / "wordnet" / "queries.parquet"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *fragments: str) -> str:
    """Assert a non-zero exit with one line on stderr (holding `fragments`) and nothing printed on stdout."""
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == "", result.stdout  # no result, right or wrong
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def damage(path: Path, how: str) -> None:
    """Damage a file: cut to half, one byte flipped in the middle, removed, or a folder standing in its place
    (what 'cannot be read' looks like to root, whom file modes do not stop)."""
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif how == "garbled":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "deleted":
        path.unlink()
    else:
        path.unlink()
        path.mkdir()


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """HNSW builds on one thread are deterministic: a repaired version then equals a clean build."""
    import faiss

    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(os.cpu_count() or 1)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, sample_slice):
    """A 600-row index of 3 chunks (MiniLM, dims 384 and 128), built once; tests damage copies of it."""
    out = tmp_path_factory.mktemp("pristine") / "idx"
    result = invoke("index", sample_slice, "--out", out, "--model", "minilm", "--chunk-rows", 200, "--dims", 128,
                    "--quiet", "--json")
    assert result.exit_code == 0, result.output
    hits = json.loads(invoke("query", out, QUERY, "-k", 5, "--json").stdout)
    return out, [h["id"] for h in hits]


@pytest.fixture
def index_copy(pristine, tmp_path):
    out = tmp_path / "idx"
    shutil.copytree(pristine[0], out, symlinks=True)
    return out


def _chunk_file(out: Path, kind: str) -> Path:
    suffix = {"vectors": ".npy", "rows": ".rows.parquet", "report": ".json"}[kind]
    [path] = out.glob(f"work/*/chunks/chunk-000001{suffix}")
    return path


def _hits(out: Path) -> list:
    result = invoke("query", out, QUERY, "-k", 5, "--json")
    assert result.exit_code == 0, result.output
    return [h["id"] for h in json.loads(result.stdout)]


# -- the stored vectors (source of truth) ------------------------------------------------------------------------

@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("kind", ["vectors", "rows", "report"])
def test_a_damaged_chunk_is_named_by_verify_and_embedded_again_by_the_next_build(kind, how, index_copy, pristine,
                                                                              sample_slice):
    path = _chunk_file(index_copy, kind)
    damage(path, how)
    checked = invoke("verify", index_copy)
    assert checked.exit_code == 1 and f"damaged  {path}" in checked.stdout, checked.output
    # a rebuild from the stored vectors (new dims) must not build from the damaged chunk: it embeds it again
    rebuilt = invoke("index", sample_slice, "--out", index_copy, "--model", "minilm", "--chunk-rows", 200, "--dims",
                     "128,64", "--quiet", "--json")
    assert rebuilt.exit_code == 0, rebuilt.output
    report = json.loads(rebuilt.stdout)
    assert report["status"] == "published" and report["rows_embedded"] == 200 and report["rows_indexed"] == 600
    assert invoke("verify", index_copy).exit_code == 0
    assert _hits(index_copy) == pristine[1]


def test_a_garbled_chunk_is_not_reused_by_the_embedding_cache(index_copy, sample_slice, tmp_path):
    damage(_chunk_file(index_copy, "vectors"), "garbled")
    table = pq.read_table(sample_slice)
    texts = table.column("text").to_pylist()
    texts[0] = "a changed first text"  # a new plan: the other 599 texts come from the cache, except chunk 1's
    changed = tmp_path / "changed.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("text"), "text", [texts]), changed)
    result = invoke("index", changed, "--out", index_copy, "--model", "minilm", "--chunk-rows", 200, "--dims", 128,
                    "--quiet", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows_embedded"] == 201 and report["rows_reused"] == 399  # chunk 1 embedded again, not copied
    assert invoke("verify", index_copy).exit_code == 0


# -- the published version ---------------------------------------------------------------------------------------

def _version_file(out: Path, name: str) -> Path:
    if name == "info.json":
        return indexfiles.current(out) / name
    [path] = indexfiles.segment_files(out, name)
    return path


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("name", ["index-128.faiss", "index-384.faiss", "rows.parquet", "info.json"])
def test_a_damaged_version_file_is_never_searched_and_verify_repair_restores_it(name, how, index_copy, pristine):
    path = _version_file(index_copy, name)
    damage(path, how)
    dim = "128" if name == "index-128.faiss" else "384"
    one_line_error(invoke("query", index_copy, QUERY, "--dim", dim), str(path))
    one_line_error(invoke("eval", index_copy, "--queries", QUERIES), str(path))
    if name == "info.json":
        one_line_error(invoke("info", index_copy), str(path))
    checked = invoke("verify", index_copy, "--json")
    assert checked.exit_code == 1
    assert [d["path"] for d in json.loads(checked.stdout)["check"]["damaged"]] == [str(path)]
    repaired = invoke("verify", index_copy, "--repair", "--quiet")
    assert repaired.exit_code == 0, repaired.output
    assert "repaired: published v000002" in repaired.stdout and "0 rows embedded again" in repaired.stdout
    assert invoke("verify", index_copy).exit_code == 0
    assert _hits(index_copy) == pristine[1]


@pytest.mark.parametrize("how", HOWS)
def test_a_damaged_deletion_set_is_never_searched_and_verify_repair_restores_it(how, index_copy, sample_slice,
                                                                              tmp_path):
    table = pq.read_table(sample_slice)
    changed = tmp_path / "changed.parquet"
    pq.write_table(table.slice(0, 590), changed)  # 10 rows deleted: the version's deletion set
    assert invoke("index", changed, "--out", index_copy, "--model", "minilm", "--chunk-rows", 200, "--dims", 128,
                  "--quiet").exit_code == 0
    [path] = indexfiles.current(index_copy).glob("deleted-*.npy")
    expected = _hits(index_copy)
    damage(path, how)
    one_line_error(invoke("query", index_copy, QUERY), str(path))
    checked = invoke("verify", index_copy, "--json")
    assert [d["path"] for d in json.loads(checked.stdout)["check"]["damaged"]] == [str(path)]
    repaired = invoke("verify", index_copy, "--repair", "--quiet")
    assert repaired.exit_code == 0 and "repaired: published v000003" in repaired.stdout, repaired.output
    assert _hits(index_copy) == expected and len(indexfiles.live_ids(index_copy)) == 590


def test_a_truncated_index_makes_the_next_run_build_a_new_version(index_copy, sample_slice, caplog):
    damage(_version_file(index_copy, "index-384.faiss"), "truncated")
    result = invoke("index", sample_slice, "--out", index_copy, "--model", "minilm", "--chunk-rows", 200, "--dims",
                    128, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("published v000002") and "building a new version" in caplog.text
    assert "rewriting segment" in caplog.text and invoke("verify", index_copy).exit_code == 0


def test_a_same_size_damaged_index_without_stored_vectors_is_rebuilt_by_the_next_index_run(index_copy, pristine,
                                                                                           sample_slice):
    """The documented path after `cache prune --all`: query names the damage, verify --repair says the vectors
    are gone and to run index, and index (which a size check alone called up to date) embeds everything again."""
    assert invoke("cache", "prune", index_copy, "--all").exit_code == 0
    path = _version_file(index_copy, "index-384.faiss")
    size = path.stat().st_size
    damage(path, "garbled")
    assert path.stat().st_size == size
    one_line_error(invoke("query", index_copy, QUERY), str(path), "verify")
    one_line_error(invoke("verify", index_copy, "--repair", "--quiet"), "embedctl index")
    rerun = invoke("index", sample_slice, "--out", index_copy, "--model", "minilm", "--chunk-rows", 200, "--dims", 128,
                   "--quiet", "--json")
    assert rerun.exit_code == 0, rerun.output
    report = json.loads(rerun.stdout)
    assert report["status"] == "published" and report["rows_embedded"] == 600, report
    assert invoke("verify", index_copy).exit_code == 0
    assert _hits(index_copy) == pristine[1]


def test_the_up_to_date_check_reads_only_files_changed_since_they_last_matched(index_copy, sample_slice,
                                                                               monkeypatch):
    from embedctl.pipeline import checksum

    args = ("index", sample_slice, "--out", index_copy, "--model", "minilm", "--chunk-rows", 200, "--dims", 128,
            "--quiet")
    read = []
    real = checksum.checksum
    monkeypatch.setattr(checksum, "checksum", lambda path: read.append(Path(path).name) or real(path))
    assert invoke(*args).stdout.startswith("up to date")  # a folder copied just now: read, but no verdict kept
    assert len(read) == 4  # rows.parquet, vectors.npy, index-384.faiss, index-128.faiss
    assert invoke(*args).stdout.startswith("up to date") and len(read) == 8  # still racy: read again
    monkeypatch.setattr(checksum, "RACY_SECONDS", 0.0)  # as if they had settled
    assert invoke(*args).stdout.startswith("up to date") and len(read) == 12
    read.clear()
    assert invoke(*args).stdout.startswith("up to date") and read == []  # settled and unchanged: nothing read
    rows = _version_file(index_copy, "rows.parquet")
    os.utime(rows)  # touched, not changed: read again, still up to date
    assert invoke(*args).stdout.startswith("up to date") and read == ["rows.parquet"]


def test_a_same_size_change_in_place_is_rebuilt_by_index_with_no_verify_between(index_copy, sample_slice,
                                                                                 monkeypatch, caplog):
    from embedctl.pipeline import checksum

    monkeypatch.setattr(checksum, "RACY_SECONDS", 0.0)
    args = ("index", sample_slice, "--out", index_copy, "--model", "minilm", "--chunk-rows", 200, "--dims", 128,
            "--quiet")
    assert invoke(*args).stdout.startswith("up to date")  # the verdicts are kept
    path = _version_file(index_copy, "index-128.faiss")
    damage(path, "garbled")
    result = invoke(*args)
    assert result.stdout.startswith("published v000002"), result.output
    assert "rewriting segment" in caplog.text and invoke("verify", index_copy).exit_code == 0


def test_a_dangling_current_is_one_line(index_copy):
    os.rename(index_copy / "versions" / "v000001", index_copy / "versions" / "gone")
    one_line_error(invoke("query", index_copy, QUERY), "current points to versions/v000001", "missing or incomplete")
    one_line_error(invoke("info", index_copy), "current points to versions/v000001")


# -- the run history ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", HOWS)
def test_a_damaged_run_history(how, tmp_path, sample_slice):
    spec = tmp_path / "jobs.toml"
    spec.write_text(f'[jobs.demo]\ncorpus = "{sample_slice}"\nmodel = "minilm"\ndims = [128]\nchunk_rows = 300\n')
    for _ in range(3):  # three runs, two lines each: a damage in the middle leaves whole runs before (and after) it
        assert invoke("jobs", "run", "demo", "--jobs", spec, "--quiet").exit_code == 0
    history = tmp_path / "demo" / "runs.jsonl"
    lines = history.read_text().splitlines()
    before = {run["run_id"]: run for run in json.loads(invoke("jobs", "status", "demo", "--jobs", spec, "--json").stdout)}
    assert len(before) == 3
    damage(history, how)
    status = invoke("jobs", "status", "demo", "--jobs", spec, "--json")
    if how == "unreadable":
        one_line_error(status, str(history), "cannot read the run history")
        one_line_error(invoke("jobs", "run", "demo", "--jobs", spec, "--quiet"), str(history))
        assert _hits(tmp_path / "demo")  # the published version is untouched
        return
    assert status.exit_code == 0, status.output
    after = {run["run_id"]: run for run in json.loads(status.stdout)}
    # the lines the damage spared are read: a run with every line spared as before, one with some of them listed
    kept = set(history.read_bytes().decode(errors="replace").splitlines()) if history.exists() else set()
    spared = {json.loads(line)["run_id"] for line in lines if line in kept}
    whole = spared - {json.loads(line)["run_id"] for line in lines if line not in kept}
    assert whole or how == "deleted", "the damage spared no run: the test proves nothing"
    assert spared <= after.keys() <= (before.keys() if kept else set()), (spared, after)
    assert all(after[run] == before[run] for run in whole), (before, after)
    assert list(after) == [run for run in before if run in after]  # newest first still
    again = invoke("jobs", "run", "demo", "--jobs", spec, "--quiet", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["status"] == "up-to-date"
    assert json.loads(invoke("jobs", "status", "demo", "--jobs", spec, "--json").stdout)[0]["status"] == "up-to-date"


# -- a full disk -------------------------------------------------------------------------------------------------

def _disk_full_at(monkeypatch, name: str) -> None:
    """Make the atomic write of any file named `name` fail as on a full disk."""
    real = tempfile.mkstemp

    def mkstemp(*args, prefix: str = "", **kwargs):
        if prefix.startswith(f".{name}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("target", ["chunk-000001.npy", "chunk-000001.rows.parquet", "chunk-000001.json",
                                    "index-64.faiss", "rows.parquet", "vectors.npy", "info.json", "runs.jsonl"])
def test_a_full_disk_at_any_write_is_one_line_and_the_published_version_stays(target, index_copy, pristine,
                                                                             sample_slice, tmp_path, monkeypatch):
    table = pq.read_table(sample_slice)
    texts = table.column("text").to_pylist()
    texts[250] = "a changed text in chunk one"  # chunk 1 is embedded again
    changed = tmp_path / "changed.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("text"), "text", [texts]), changed)
    args = ("index", changed, "--out", index_copy, "--model", "minilm", "--chunk-rows", 200, "--dims", "128,64",
            "--quiet")
    if target == "runs.jsonl":
        real_open = open

        def full(path, *a, **kw):
            if str(path).endswith("runs.jsonl") and a and "a" in a[0]:  # an append to the history
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_open(path, *a, **kw)

        monkeypatch.setattr("embedctl.pipeline.storage.open", full, raising=False)  # Storage.append
    else:
        _disk_full_at(monkeypatch, target)
    one_line_error(invoke(*args), "no space left on the device", "run the same command again")
    assert os.readlink(index_copy / "current") == "versions/v000001"
    assert _hits(index_copy) == pristine[1]  # still servable
    assert not list((index_copy / "versions").glob(".build-*"))  # nothing half-built left behind
    monkeypatch.undo()
    again = invoke(*args)  # space freed: the same command completes
    assert again.exit_code == 0 and again.stdout.startswith("published v000002"), again.output
    assert invoke("verify", index_copy).exit_code == 0


def test_a_real_full_disk_during_the_index_build(tmp_path, sample_slice, pristine):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "8m"):
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    try:
        out = disk / "idx"
        shutil.copytree(pristine[0], out, symlinks=True)
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - 300_000))  # room for less than one new index
        args = ("index", sample_slice, "--out", out, "--model", "minilm", "--chunk-rows", 200, "--dims", "256,128",
                "--quiet")
        one_line_error(invoke(*args), "no space left on the device", str(out))
        assert os.readlink(out / "current") == "versions/v000001" and _hits(out) == pristine[1]
        (disk / "filler").unlink()
        again = invoke(*args)
        assert again.exit_code == 0 and again.stdout.startswith("published v000002"), again.output
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_read_only_output_folder_is_one_line(tmp_path, sample_slice, pristine):
    disk = tmp_path / "ro"
    if not mount_tmpfs(disk, "16m"):
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    try:
        shutil.copytree(pristine[0], disk / "idx", symlinks=True)
        assert subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode == 0
        one_line_error(invoke("index", sample_slice, "--out", disk / "idx", "--model", "minilm", "--dims", "64"),
                       "read-only")
        assert _hits(disk / "idx") == pristine[1]  # readers need no write
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
