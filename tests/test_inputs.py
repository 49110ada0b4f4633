"""Inputs a user can get wrong or a producer can garble: text that is not UTF-8 (query arguments, --file, corpus
strings), dictionary-encoded text columns, schedules under a second, a full disk under a chunk write, and a
reader that closes the output pipe early (`embedctl info | head -1`)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from embedctl.cli import main
from embedctl.pipeline.corpus import plan_corpus, read_chunk
from embedctl.pipeline.errors import ConfigError, CorpusError
from tests.conftest import SAMPLE
from tests.services import mount_tmpfs

EMBEDCTL = str(Path(sys.executable).parent / "embedctl")
ENV = {**os.environ, "LC_ALL": "C.UTF-8", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def run(*args, **kw) -> subprocess.CompletedProcess:
    """The installed command with raw byte arguments (as a shell passes $'caf\\xe9'), not decoded by the test."""
    argv = [EMBEDCTL.encode()] + [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return subprocess.run(argv, capture_output=True, env=ENV, timeout=300, **kw)


def one_line(stderr: bytes | str, *fragments: str) -> str:
    text = stderr.decode("utf-8", "backslashreplace") if isinstance(stderr, bytes) else stderr
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), text
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """200 WordNet glosses."""
    path = tmp_path_factory.mktemp("inputs") / "glosses.parquet"
    pq.write_table(pq.read_table(SAMPLE, columns=["id", "text"]).slice(0, 200), path)
    return path


@pytest.fixture(scope="module")
def index(corpus, tmp_path_factory) -> Path:
    """An index of the 200 glosses in 20 segments (`info --json` prints more than a pipe and a write buffer
    hold)."""
    out = tmp_path_factory.mktemp("inputs") / "idx"
    result = invoke("index", corpus, "--out", out, "--model", "minilm", "--dims", "128", "--segment-rows", 10,
                    "--quiet")
    assert result.exit_code == 0, result.output
    return out


# -- 3. text that is not UTF-8 -----------------------------------------------------------------------------------

def test_a_query_argument_that_is_not_utf8_is_one_line(index):
    result = run("query", index, b"caf\xe9")  # Latin-1 bytes from a shell in a UTF-8 locale
    assert result.returncode == 1, result.stderr
    one_line(result.stderr, "query 1 is not valid UTF-8", "0xe9")
    second = run("query", index, "dog", b"\xff\xfebad")
    assert second.returncode == 1 and "query 2 is not valid UTF-8" in one_line(second.stderr)


def test_a_query_file_that_is_not_utf8_names_the_file_and_the_line(index, tmp_path):
    latin1 = tmp_path / "queries-latin1.txt"
    latin1.write_bytes("dog\ncaf\xe9 au lait\n".encode("latin-1"))
    result = run("query", index, "--file", latin1)
    assert result.returncode == 1, result.stderr
    one_line(result.stderr, str(latin1), "not UTF-8", "line 2", "0xe9")
    utf16 = tmp_path / "queries-utf16.txt"
    utf16.write_bytes("dog\ncat\n".encode("utf-16-le"))  # no BOM: valid UTF-8 bytes, but NULs between letters
    result = run("query", index, "--file", utf16)
    assert result.returncode == 1 and "NUL" in one_line(result.stderr, str(utf16))
    bom = tmp_path / "queries-bom.txt"
    bom.write_bytes("\ufeffa small dog\n".encode())  # a UTF-8 byte order mark (Windows editors) is not a query
    ok = run("query", index, "--file", bom, "-k", "1", "--json")
    assert ok.returncode == 0, ok.stderr


def test_a_parquet_file_given_as_query_file_is_one_line(index, corpus):
    result = run("query", index, "--file", corpus)
    assert result.returncode == 1, result.stderr
    one_line(result.stderr, str(corpus), "is a Parquet file", "one query a line")


def _with_texts(path: Path, texts: pa.Array, ids=None) -> Path:
    ids = ids if ids is not None else [f"r-{i}" for i in range(len(texts))]
    pq.write_table(pa.table({"id": ids, "text": texts}), path)
    return path


def _garbled(values: list[bytes | None], type_: pa.DataType | None = None) -> pa.Array:
    """A string array holding bytes that are not UTF-8 (pyarrow takes them unchecked through an unsafe cast)."""
    return pa.array(values, pa.binary()).cast(type_ or pa.string(), safe=False)


@pytest.mark.parametrize("bad", [b"caf\xe9", b"half a surrogate \xed\xb3\xa9", b"\xff"])
def test_a_corpus_text_that_is_not_utf8_refuses_the_corpus_before_any_embedding(tmp_path, bad):
    values = [f"gloss {i}".encode() for i in range(30)]
    values[17] = bad
    path = _with_texts(tmp_path / "garbled.parquet", _garbled(values))
    out = tmp_path / "out"
    result = invoke("index", path, "--out", out, "--model", "minilm", "--dims", "64")
    assert result.exit_code == 1, result.output
    one_line(result.stderr, "column 'text'", str(path), "row 17", "id 'r-17'", "not valid UTF-8")
    assert not list(out.glob("work/*/chunks/chunk-*"))  # refused before any chunk was embedded


def test_a_garbled_text_in_a_dictionary_or_large_column_is_refused_too(tmp_path):
    values = [b"fine", b"caf\xe9", None, b"fine"]
    for name, texts in {"dict": _garbled(values).dictionary_encode(),
                        "large": _garbled(values, pa.large_string())}.items():
        path = _with_texts(tmp_path / f"{name}.parquet", texts)
        with pytest.raises(CorpusError, match=r"not valid UTF-8 at row 1 \(id 'r-1'\)"):
            plan_corpus(str(path), "text", "id", chunk_rows=2)


def test_reading_a_chunk_with_a_garbled_text_is_one_error_not_a_decode_traceback(tmp_path):
    """A corpus checked before is not read again by the plan (the published version's fingerprint), so a switch to
    another text column of it meets the garbled row only when its chunk is read: one error, not a decode
    traceback."""
    texts = pa.array(["a", "b", "c"])
    path = tmp_path / "two-columns.parquet"
    pq.write_table(pa.table({"id": ["r-0", "r-1", "r-2"], "text": texts,
                             "other": _garbled([b"a", b"b", b"caf\xe9"])}), path)
    checked = plan_corpus(str(path), "text", "id", chunk_rows=2)
    with pytest.raises(CorpusError, match="column 'other'"):
        plan_corpus(str(path), "other", "id", chunk_rows=2)
    plan = plan_corpus(str(path), "other", "id", chunk_rows=2, validated=checked.fingerprint)
    assert read_chunk(plan, plan.chunks[0]).texts == ["a", "b"]
    with pytest.raises(CorpusError, match=r"column 'other' .* not valid UTF-8 at row 2 \(id 'r-2'\)"):
        read_chunk(plan, plan.chunks[1])


# -- 12. dictionary-encoded and large text columns ---------------------------------------------------------------

def _store(out: Path) -> tuple[np.ndarray, list, list]:
    """Every chunk's vectors, ids and texts, in chunk order."""
    [chunks] = list(out.glob("work/*/chunks"))
    vectors = [np.load(p) for p in sorted(chunks.glob("chunk-*.npy"))]
    rows = [pq.read_table(p) for p in sorted(chunks.glob("chunk-*.rows.parquet"))]
    table = pa.concat_tables(rows)
    return np.concatenate(vectors), table.column("id").to_pylist(), table.column("text").to_pylist()


def test_dictionary_encoded_and_large_text_columns_index_like_plain_strings(corpus, tmp_path):
    table = pq.read_table(corpus).slice(0, 60)
    texts = table.column("text").combine_chunks()
    texts = pa.concat_arrays([texts, texts.slice(0, 20)])  # repeated texts: what a dictionary is for
    ids = [f"d{i}" for i in range(len(texts))]
    kinds = {"plain": texts, "dictionary": texts.dictionary_encode(),
             "large-dictionary": texts.cast(pa.large_string()).dictionary_encode(),
             "large": texts.cast(pa.large_string()),
             "dictionary-ids": texts}
    stores = {}
    for kind, column in kinds.items():
        id_column = pa.array(ids).dictionary_encode() if kind == "dictionary-ids" else ids
        path = _with_texts(tmp_path / f"{kind}.parquet", column, id_column)
        if kind != "plain":
            assert pq.ParquetFile(path).schema_arrow.field("text" if kind != "dictionary-ids" else "id").type \
                != pa.string()
        out = tmp_path / f"out-{kind}"
        result = invoke("index", path, "--out", out, "--model", "minilm", "--dims", "128", "--chunk-rows", 50,
                        "--quiet")
        assert result.exit_code == 0, (kind, result.output)
        stores[kind] = _store(out)
    plain_vectors, plain_ids, plain_texts = stores.pop("plain")
    assert plain_ids == ids and plain_texts == texts.to_pylist()
    for kind, (vectors, got_ids, got_texts) in stores.items():
        assert got_ids == plain_ids and got_texts == plain_texts, kind
        np.testing.assert_array_equal(vectors, plain_vectors, err_msg=kind)


def test_files_that_encode_the_columns_differently_make_one_corpus(corpus, tmp_path):
    """A folder of files whose text and id columns are plain in one, dictionary-encoded or large in the next: one
    chunk spans them all, and the index holds every row as the plain corpus does."""
    table = pq.read_table(corpus).slice(0, 90)
    texts, ids = table.column("text").combine_chunks(), table.column("id").combine_chunks()
    folder = tmp_path / "mixed"
    folder.mkdir()
    encodings = [lambda a: a, lambda a: a.dictionary_encode(), lambda a: a.cast(pa.large_string())]
    for i, encode in enumerate(encodings):
        part = slice(30 * i, 30 * (i + 1))
        pq.write_table(pa.table({"id": encode(ids[part]), "text": encode(texts[part])}), folder / f"part-{i}.parquet")
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": ids, "text": texts}), plain)
    for source, out in ((folder, tmp_path / "out-mixed"), (plain, tmp_path / "out-plain")):
        result = invoke("index", source, "--out", out, "--model", "minilm", "--dims", "128", "--chunk-rows", 90,
                        "--quiet")
        assert result.exit_code == 0, result.output
    mixed, plain_store = _store(tmp_path / "out-mixed"), _store(tmp_path / "out-plain")
    assert mixed[1] == plain_store[1] and mixed[2] == plain_store[2]
    np.testing.assert_array_equal(mixed[0], plain_store[0])


# -- 11. schedules ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, ok", [("0.001s", False), ("0.5s", False), ("0.01m", False), ("0s", False),
                                          ("1s", True), ("1.5s", True), ("2h", True)])
def test_intervals_under_a_second_are_refused(tmp_path, schedule, ok):
    from embedctl.jobs.specfile import load_jobs, parse_schedule

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), tmp_path / "data" / "c.parquet")
    spec = tmp_path / "jobs.toml"
    spec.write_text(f'[jobs.fast]\ncorpus = "data"\nmodel = "minilm"\nschedule = "{schedule}"\n')
    result = invoke("jobs", "list", "--jobs", spec)
    if ok:
        assert result.exit_code == 0, result.output
        assert parse_schedule(schedule).total_seconds() >= 1 and "fast" in load_jobs(spec)
        return
    assert result.exit_code == 1
    one_line(result.stderr, f"schedule {schedule!r}", "at least 1s")
    with pytest.raises(ConfigError, match="at least 1s"):
        parse_schedule(schedule)


# -- 9. a full disk under a chunk write ---------------------------------------------------------------------------

def test_a_full_disk_under_a_chunk_write_says_no_space(tmp_path, corpus):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "2m"):
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    try:
        out = disk / "idx"
        free = shutil.disk_usage(disk).free
        # room for the plan, the job record, the first chunk's rows and report, not its 153,600-byte vectors
        (disk / "filler").write_bytes(b"\0" * (free - 110_000))
        args = ("index", corpus, "--out", out, "--model", "minilm", "--dims", "128", "--chunk-rows", 200, "--quiet")
        result = invoke(*args)
        assert result.exit_code == 1, result.output
        line = one_line(result.stderr, "no space left on the device", "chunk-000000.npy", "free space",
                        "run the same command again")
        assert "requested and" not in line
        assert not list(out.glob("work/*/chunks/.*.tmp"))  # the partial file is gone
        (disk / "filler").unlink()
        again = invoke(*args)
        assert again.exit_code == 0, again.output
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# -- 10. a reader that closes the pipe early ----------------------------------------------------------------------

def _first_line_then_close(args: list, close_first: bool = False) -> tuple[bytes, int, bytes]:
    """Run the installed command into a real pipe, read one line (byte by byte: no read-ahead) and close the read
    end, as `| head -1` does. The pipe holds one page, so a longer output is still being written when it closes.
    `close_first`: the reader is gone before the command writes anything (output too short to outlast a read)."""
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    if close_first:
        os.close(read_fd)
    proc = subprocess.Popen([EMBEDCTL, *map(str, args)], stdout=write_fd, stderr=subprocess.PIPE, env=ENV)
    os.close(write_fd)
    line = b""
    if not close_first:
        while not line.endswith(b"\n"):
            byte = os.read(read_fd, 1)
            if not byte:
                break
            line += byte
        os.close(read_fd)
    _, stderr = proc.communicate(timeout=300)
    return line, proc.returncode, stderr


def _quiet_exit(code: int, stderr: bytes) -> None:
    text = stderr.decode(errors="replace")
    assert "Error" not in text and "Traceback" not in text and "Exception ignored" not in text, text
    assert code == 0, (code, text)  # the same however the output was cut (see quiet_when_stdout_closes)


def test_info_into_a_closed_pipe_exits_quietly(index):
    assert len(invoke("info", index, "--json").stdout) > 4096 + 8192  # the pipe, then the write buffer
    line, code, stderr = _first_line_then_close(["info", index, "--json"])
    assert line == b"{\n"
    _quiet_exit(code, stderr)


def test_query_into_a_closed_pipe_exits_quietly(index):
    line, code, stderr = _first_line_then_close(["query", index, "a dog", "-k", "100", "--json"])
    assert line == b"[\n"
    _quiet_exit(code, stderr)


@pytest.mark.parametrize("args", [["info", "{out}"], ["status", "{out}"], ["status", "{out}", "--json"],
                                  ["jobs", "list", "--jobs", "{spec}"], ["query", "{out}", "dog", "-k", "3"],
                                  ["--help"]])
def test_every_command_into_a_pipe_closed_before_it_writes_exits_quietly(index, corpus, tmp_path, args):
    spec = tmp_path / "jobs.toml"
    spec.write_text(f'[jobs.docs]\ncorpus = "{corpus}"\nmodel = "minilm"\nschedule = "1h"\n')
    _, code, stderr = _first_line_then_close([a.format(out=index, spec=spec) for a in args], close_first=True)
    _quiet_exit(code, stderr)


def test_a_broken_pipe_to_a_server_is_still_an_error():
    """Only stdout's reader going away is quiet: the same error on another pipe or socket is reported."""
    import click

    from embedctl.cli.common import user_errors

    with pytest.raises(click.ClickException, match="Broken pipe"), user_errors():
        raise BrokenPipeError(32, "Broken pipe")


def test_json_output_is_unchanged_for_a_reader_that_reads_it_all(index):
    result = run("info", index, "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["rows"] == 200
