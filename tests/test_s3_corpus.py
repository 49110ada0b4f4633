"""A corpus on S3 (a real SeaweedFS server): listing, planning, ranged chunk reads, change detection, errors."""

from __future__ import annotations

import io
import json
import random
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedctl.pipeline import s3
from embedctl.pipeline.corpus import CorpusPlan, discover_files, plan_corpus, read_chunk
from embedctl.pipeline.errors import CorpusError, StorageError
from tests.services import s3_client_env, start_s3

BUCKET = "corpora"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One S3 server for the module, with the AWS_* variables of its client set and the cached client dropped."""
    found = start_s3(tmp_path_factory, BUCKET)
    with s3_client_env(found):
        yield found
    found.stop()


def _table(first: int, n: int) -> pa.Table:
    return pa.table({"id": list(range(first, first + n)), "text": [f"text number {i}" for i in range(first, first + n)]})


def _put(key: str, table: pa.Table, row_group_size: int | None = None, **options) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_size, **options)
    data = sink.getvalue()
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=data)
    return data


@pytest.fixture(scope="module")
def corpus(server, tmp_path_factory):
    """The same three Parquet files under a local folder and under s3://corpora/c/ (plus an object that is not
    Parquet and one in another folder); "b/c" sorts before "b-2" as paths, after it as keys."""
    local = tmp_path_factory.mktemp("local")
    for name, (first, n) in {"a.parquet": (0, 7), "b/c.parquet": (7, 5), "b-2.parquet": (12, 4)}.items():
        data = _put(f"c/{name}", _table(first, n), row_group_size=3)
        (local / name).parent.mkdir(exist_ok=True)
        (local / name).write_bytes(data)
    s3.client().put_object(Bucket=BUCKET, Key="c/notes.txt", Body=b"not parquet")
    _put("other/d.parquet", _table(100, 2))
    return local


def _shape(plan: CorpusPlan) -> list:
    return [(f.rows, f.size, f.row_offset, f.footer) for f in plan.files]


def test_prefix_and_glob_plan_like_the_local_files(corpus):
    local = plan_corpus(str(corpus), "text", "id", chunk_rows=5)
    prefix = plan_corpus("s3://corpora/c/", "text", "id", chunk_rows=5)
    assert [f.path for f in prefix.files] == ["s3://corpora/c/a.parquet", "s3://corpora/c/b/c.parquet",
                                              "s3://corpora/c/b-2.parquet"]
    assert prefix.rows == local.rows == 16 and prefix.chunks == local.chunks and _shape(prefix) == _shape(local)
    assert all(f.etag for f in prefix.files)
    glob = plan_corpus("s3://corpora/c/*.parquet", "text", "id", chunk_rows=5)  # `*` stays in one folder
    assert [f.path for f in glob.files] == ["s3://corpora/c/a.parquet", "s3://corpora/c/b-2.parquet"]
    deep = plan_corpus("s3://corpora/c/**/*.parquet", "text", "id", chunk_rows=5)
    assert deep.fingerprint == prefix.fingerprint == plan_corpus("s3://corpora/c", "text", "id", 5).fingerprint
    assert deep.fingerprint != local.fingerprint  # path and ETag are inputs, not mtimes
    for chunk in prefix.chunks:
        alone, there = read_chunk(prefix, chunk), read_chunk(local, chunk)
        assert alone.ids == there.ids == list(range(chunk.start, chunk.stop)) and alone.texts == there.texts
    single = plan_corpus("s3://corpora/c/b-2.parquet", "text", "id", chunk_rows=5)
    assert single.rows == 4 and discover_files("s3://corpora/c/b-2.parquet") == ["s3://corpora/c/b-2.parquet"]
    assert CorpusPlan.from_dict(prefix.to_dict()) == prefix


def test_a_chunk_reads_only_its_row_groups(server):
    rng = random.Random(7)
    rows = 60_000
    texts = ["".join(rng.choices(string.ascii_letters, k=100)) for _ in range(rows)]
    size = len(_put("big/big.parquet", pa.table({"id": list(range(rows)), "text": texts}), row_group_size=4_000))
    plan = plan_corpus("s3://corpora/big/", "text", "id", chunk_rows=4_000)
    before = s3.requests()
    rows_read = read_chunk(plan, plan.chunks[7])
    after = s3.requests()
    assert rows_read.ids == list(range(28_000, 32_000)) and rows_read.texts == texts[28_000:32_000]
    downloaded = after["bytes_down"] - before["bytes_down"]
    assert downloaded < size / 4, (downloaded, size)
    assert after.get("GET", 0) - before.get("GET", 0) <= 4 and after.get("HEAD", 0) - before.get("HEAD", 0) == 1


def test_a_replaced_object_is_detected(server):
    table = _table(0, 4)
    _put("changing/x.parquet", table, compression="none")
    plan = plan_corpus("s3://corpora/changing/", "text", "id", chunk_rows=2)
    assert plan.files[0].changes() is None
    upper = table.set_column(1, "text", pa.array([t.upper() for t in table["text"].to_pylist()]))
    same_size = _put("changing/x.parquet", upper, compression="none")  # other bytes: only the ETag tells
    assert len(same_size) == plan.files[0].size
    assert "replaced" in plan.files[0].changes()
    assert plan_corpus("s3://corpora/changing/", "text", "id", chunk_rows=2).fingerprint != plan.fingerprint
    with pytest.raises(CorpusError, match="changed since the job was planned"):
        read_chunk(plan, plan.chunks[0])
    s3.client().delete_object(Bucket=BUCKET, Key="changing/x.parquet")
    assert plan.files[0].changes() == "it is gone"


def test_an_object_replaced_between_two_ranged_reads_is_an_error_not_a_mix(server):
    """Every ranged GET of a planned object is pinned to the plan's ETag (If-Match): a replacement that lands after
    the change check (a HEAD) and between two GETs fails the next GET instead of handing over the other bytes."""
    from embedctl.pipeline.s3files import ObjectFile

    table = _table(0, 4)
    _put("pinned/x.parquet", table, compression="none")
    [planned] = plan_corpus("s3://corpora/pinned/", "text", "id", chunk_rows=2).files
    reader = ObjectFile(planned.path, planned.size, read_ahead=8, etag=planned.etag)
    assert reader.read(4) == b"PAR1"  # a GET of the planned version
    upper = table.set_column(1, "text", pa.array([t.upper() for t in table["text"].to_pylist()]))
    _put("pinned/x.parquet", upper, compression="none")
    reader.seek(64)
    with pytest.raises(CorpusError, match="pinned/x.parquet was replaced since the job was planned") as caught:
        reader.read(8)
    assert "\n" not in str(caught.value)
    unpinned = ObjectFile(planned.path, planned.size, read_ahead=8)
    unpinned.seek(64)
    assert len(unpinned.read(8)) == 8  # (the same read without the pin: the new bytes, unnoticed)


@pytest.mark.parametrize("uri, error, message", [
    ("s3://no-such-bucket/corpus/", StorageError, r"the bucket 'no-such-bucket' does not exist .*s3://no-such-bucket"),
    ("s3://corpora/other/d.parquet/x/", CorpusError, r"no \*\.parquet objects .*'s3://corpora/other/d.parquet/x/'"),
    ("s3://corpora/c/*.csv", CorpusError, r"no objects match 's3://corpora/c/\*\.csv'"),
    ("s3://corpora/nothing", CorpusError, r"no \*\.parquet objects at or below 's3://corpora/nothing'"),
    ("s3://corpora/c/*.txt", CorpusError, r"cannot read 's3://corpora/c/notes.txt' as Parquet"),
])
def test_errors_are_one_line_naming_the_uri(server, uri, error, message):
    with pytest.raises(error, match=message) as caught:
        plan_corpus(uri, "text", "id", chunk_rows=5)
    assert "\n" not in str(caught.value) and type(caught.value) is error
    assert caught.value.__cause__ is None


def test_wrong_credentials_are_one_line_without_the_secret(server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-123")
    monkeypatch.setattr(s3, "_client", None)
    with pytest.raises(StorageError, match="credentials were refused") as caught:
        plan_corpus("s3://corpora/c/", "text", "id", chunk_rows=5)
    assert "s3://corpora/c" in str(caught.value) and "not-the-secret-123" not in str(caught.value)


def test_an_unreachable_endpoint_is_one_line(server, monkeypatch):
    from tests.services import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(s3, "_client", None)
    monkeypatch.setattr(s3, "_answered", False)  # a store never reached is not waited for
    with pytest.raises(StorageError, match="does not answer") as caught:
        plan_corpus("s3://corpora/c/", "text", "id", chunk_rows=5)
    assert "s3://corpora/c" in str(caught.value) and "\n" not in str(caught.value)


def test_a_job_spec_file_keeps_an_s3_corpus_as_is(corpus, tmp_path):
    from embedctl.jobs.specfile import SpecFileError, load_jobs

    path = tmp_path / "jobs.toml"
    path.write_text('[jobs.docs]\ncorpus = "s3://corpora/c/"\n')
    assert load_jobs(path)["docs"].spec.corpus == "s3://corpora/c/"
    path.write_text('[jobs.docs]\ncorpus = "s3://corpora/nothing/"\n')
    with pytest.raises(SpecFileError) as info:
        load_jobs(path)
    assert len(info.value.errors) == 1
    assert info.value.errors[0].endswith("jobs.docs: no *.parquet objects at or below 's3://corpora/nothing/'; point "
                                         "the corpus at Parquet objects (s3://BUCKET/PREFIX/, s3://BUCKET/FILE.parquet "
                                         "or s3://BUCKET/DIR/*.parquet)")


def test_index_an_s3_corpus_end_to_end(corpus, tmp_path, tiny_qwen3):
    from click.testing import CliRunner

    from embedctl.cli import main

    args = ["index", "s3://corpora/c/", "--out", str(tmp_path / "idx"), "--model", str(tiny_qwen3),
            "--chunk-rows", "5", "--quiet", "--json"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows_indexed"] == 16, report
    missing = CliRunner().invoke(main, ["index", "s3://no-such-bucket/c/", *args[2:]], catch_exceptions=False)
    assert missing.exit_code == 1 and "the bucket 'no-such-bucket' does not exist" in missing.output
    assert "Traceback" not in missing.output and missing.output.count("\n") == 1
