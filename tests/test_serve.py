"""`embedctl serve` as users run it: a real server process (two uvicorn workers attached to the shared-memory
weights) on a real index, asked by the official `openai` client, by `embedctl query/eval --server` and by a
search loop running while a re-index publishes a new version."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.services import Server

KEY = "test-key-1234"
EMBEDCTL = str(Path(sys.executable).parent / "embedctl")


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDCTL_")}
    shm = Path("/dev/shm") / f"embedctl-serve-{uuid.uuid4().hex[:8]}"
    shm.mkdir(mode=0o700)
    env.update(EMBEDCTL_SHM_DIR=str(shm), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               HOME=str(tmp))
    return env


def _cli(args: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([EMBEDCTL, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def served(tmp_path_factory, sample_slice):
    """A MiniLM index of 600 glosses (dims 384 and 128) and a server of it with an API key, two workers."""
    home = tmp_path_factory.mktemp("serve")
    env = _env(home)
    shutil.copy(sample_slice, home / "glosses.parquet")
    result = _cli(["index", "glosses.parquet", "--out", "wordnet", "--model", "minilm", "--dims", "128", "--quiet"],
                  home, env)
    assert result.returncode == 0, result.stderr
    server = Server(["wordnet", "--model", "minilm"], env, home / "server.log", home, api_key=KEY, workers=2)
    try:
        yield server.start(), home, env
    finally:
        server.stop()
        shutil.rmtree(env["EMBEDCTL_SHM_DIR"], ignore_errors=True)
    assert "Traceback" not in server.text(), server.text()[-3000:]


@pytest.fixture(scope="module")
def reference(minilm_path):
    """embedctl's own encoder, in this process, from disk."""
    from embedctl.pipeline.encoder import load_encoder
    from embedctl.pipeline.models import ModelRef

    return load_encoder(ModelRef("minilm", minilm_path), device="cpu", shm="off")


def _client(server, key=KEY):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _post(server, path: str, body, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_openai_client_gets_the_vectors_of_embedctls_encoder(served, reference):
    server, _, _ = served
    client = _client(server)
    texts = ["a domestic animal that barks", "the flow of water in a river", "a small bird"]
    expected = reference.encode(texts).vectors
    one = client.embeddings.create(model="minilm", input=texts[0])  # the client asks for base64 by default
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384 and one.usage.prompt_tokens > 0
    assert _cos(np.array(one.data[0].embedding), expected[0])[0] >= 0.9999
    many = client.embeddings.create(model="minilm", input=texts)
    assert [d.index for d in many.data] == [0, 1, 2]
    assert (_cos(np.array([d.embedding for d in many.data]), expected) >= 0.9999).all()
    assert many.usage.prompt_tokens == many.usage.total_tokens == sum(len(s) for s in reference.tokenize(texts)[0])
    sliced = client.embeddings.create(model="minilm", input=texts, dimensions=128)
    cut = expected[:, :128] / np.linalg.norm(expected[:, :128], axis=1, keepdims=True)
    got = np.array([d.embedding for d in sliced.data])
    assert got.shape == (3, 128) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert (_cos(got, cut) >= 0.9999).all()
    floats = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert np.allclose(np.array([d.embedding for d in floats.data]), np.array([d.embedding for d in many.data]),
                       atol=1e-6)
    # token ids are embedded as the text they came from
    ids, _ = reference.tokenize(texts[:2])
    by_ids = client.embeddings.create(model="minilm", input=ids)
    assert (_cos(np.array([d.embedding for d in by_ids.data]), expected[:2]) >= 0.9999).all()
    # the raw base64 is little-endian float32, as the client decodes it
    status, body = _post(server, "/v1/embeddings", {"model": "minilm", "input": texts[2],
                                                    "encoding_format": "base64"})
    assert status == 200
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert _cos(vector, expected[2])[0] >= 0.9999


def test_bad_requests_get_the_right_status_in_openais_error_shape(served):
    import openai

    server, _, _ = served
    client = _client(server)
    cases = [
        (openai.NotFoundError, dict(model="no-such-model", input="text"), "model"),
        (openai.BadRequestError, dict(model="minilm", input="text", dimensions=385), "dimensions"),
        (openai.BadRequestError, dict(model="minilm", input="text", dimensions=0), "dimensions"),
        (openai.BadRequestError, dict(model="minilm", input=""), "input"),
        (openai.BadRequestError, dict(model="minilm", input=[]), "input"),
        (openai.BadRequestError, dict(model="minilm", input=[[10, 10**9]]), "input"),
    ]
    for error, kwargs, param in cases:
        with pytest.raises(error) as caught:
            client.embeddings.create(**kwargs)
        body = caught.value.body
        assert set(body) == {"message", "type", "param", "code"} and body["param"] == param, body
        assert "Traceback" not in body["message"]
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong-key").embeddings.create(model="minilm", input="text")
    status, body = _post(server, "/v1/embeddings", {"model": "minilm", "input": "text"}, key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = _post(server, "/v1/embeddings", {"model": "minilm", "input": ["word " * 1000] * 1100})
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = _post(server, "/v1/embeddings", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(server, "/v1/search", {"index": "nowhere", "query": "x"})
    assert status == 404 and body["error"]["param"] == "index"
    status, body = _post(server, "/v1/search", {"index": "wordnet", "query": "x", "dim": 100})
    assert status == 400 and "384, 128" in body["error"]["message"]


def test_the_supervisor_loads_no_torch_and_each_worker_maps_the_shared_weights(served):
    import psutil

    server, _, env = served
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "libcuda" not in maps  # uvicorn's supervisor: it touches no CUDA
    workers = [c for c in psutil.Process(server.proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) == 2
    segment = next(Path(env["EMBEDCTL_SHM_DIR"]).glob("embedctl-*"))
    for worker in workers:  # attached, not loaded: the weights are the one published segment, mapped
        assert str(segment) in Path(f"/proc/{worker.pid}/maps").read_text()


def test_health_models_and_metrics(served):
    server, _, _ = served
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:  # no key needed
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["indexes"] == {"wordnet": "v000001"}
    assert [m.id for m in _client(server).models.list().data] == ["minilm"]
    status, _ = _post(server, "/metrics", None, key=None)
    assert status == 401
    request = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    for name in ("embedctl_requests_total", "embedctl_tokens_total", "embedctl_batch_sequences_bucket",
                 "embedctl_queue_wait_seconds_bucket", "embedctl_request_seconds_bucket",
                 "embedctl_errors_total", "embedctl_cache_lookups_total"):
        assert name in text, name


def test_query_and_eval_through_the_server_match_the_local_ones(served, tmp_path):
    server, home, env = served
    local = _cli(["query", "wordnet", "a domestic animal that barks", "-k", "5"], home, env)
    remote = _cli(["query", "wordnet", "a domestic animal that barks", "-k", "5", "--server", server.url,
                   "--api-key", KEY], home, env)
    assert local.returncode == remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout and remote.stdout.count("\n") == 6
    queries = pq.read_table(Path(__file__).resolve().parent.parent / "examples/wordnet/queries.parquet")
    rows = set(pq.read_table(home / "glosses.parquet", columns=["id"]).column("id").to_pylist())
    mask = [r in rows for r in queries.column("relevant_id").to_pylist()]
    pq.write_table(queries.filter(mask), tmp_path / "queries.parquet")
    args = ["eval", "wordnet", "--queries", str(tmp_path / "queries.parquet"), "--json"]
    local = _cli(args, home, env)
    remote = _cli([*args, "--server", server.url], home, {**env, "EMBEDCTL_API_KEY": KEY})
    assert local.returncode == remote.returncode == 0, remote.stderr
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert a["queries"] == b["queries"] > 0
    for dim in a["dims"]:
        assert a["dims"][dim]["exact"] == pytest.approx(b["dims"][dim]["exact"], abs=1e-9)
    down = _cli(["query", "wordnet", "dog", "--server", "http://127.0.0.1:9"], home, env)
    assert down.returncode == 1 and down.stderr.count("\n") == 1 and "cannot reach the server" in down.stderr


def test_funnel_search_through_the_server_matches_the_local_one(served):
    """/v1/search's `funnel` and `shortlist` (a request's, or the server's `--funnel` default) answer what a local
    `embedctl query --funnel` answers; a funnel the index cannot run is a 400 naming the field."""
    server, home, env = served
    args = ["query", "wordnet", "a domestic animal that barks", "-k", "5", "--funnel", "128", "--shortlist", "40"]
    local = _cli([*args, "--json"], home, env)
    remote = _cli([*args, "--json", "--server", server.url, "--api-key", KEY], home, env)
    assert local.returncode == remote.returncode == 0, remote.stderr
    hits = json.loads(local.stdout)
    assert [h["id"] for h in json.loads(remote.stdout)] == [h["id"] for h in hits]
    assert [h["score"] for h in json.loads(remote.stdout)] == pytest.approx([h["score"] for h in hits], abs=1e-5)
    human = _cli(args + ["--server", server.url, "--api-key", KEY], home, env)
    assert human.returncode == 0 and human.stdout.splitlines()[0].split() == ["rank", "score", "id", "text"]
    status, body = _post(server, "/v1/search", {"index": "wordnet", "query": "barking dog", "k": 5, "funnel": 128,
                                                "shortlist": 40})
    assert status == 200 and (body["dim"], body["funnel"], body["shortlist"]) == (384, 128, 40), body
    for request, param, fragment in (
            ({"funnel": 64}, "funnel", "not indexed"),
            ({"funnel": 384}, "funnel", "not below the full dim"),
            ({"funnel": 128, "dim": 128}, "funnel", "not both"),
            ({"shortlist": 40}, "shortlist", "needs funnel"),
            ({"funnel": 128, "shortlist": 3}, "shortlist", "")):
        status, body = _post(server, "/v1/search", {"index": "wordnet", "query": "x", "k": 5, **request})
        assert status == 400 and body["error"]["param"] == param and fragment in body["error"]["message"], body
    refused = _cli(["serve", "wordnet", "--model", "minilm", "--funnel", "64", "--port", "9"], home, env)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "--funnel 64 cannot run" in refused.stderr
    default = Server(["wordnet", "--model", "minilm", "--funnel", "128", "--shortlist", "40"], env,
                     home / "funnel-server.log", home, api_key=KEY)
    try:
        default.start()
        status, body = _post(default, "/v1/search", {"index": "wordnet", "query": "barking dog", "k": 5})
        assert status == 200 and (body["dim"], body["funnel"], body["shortlist"]) == (384, 128, 40), body
        funnel_hits = [h["id"] for h in body["data"][0]["hits"]]
        status, plain = _post(default, "/v1/search", {"index": "wordnet", "query": "barking dog", "k": 5, "dim": 128})
        assert status == 200 and plain["dim"] == 128 and "funnel" not in plain  # a named dim: that dim's HNSW
        status, body = _post(server, "/v1/search", {"index": "wordnet", "query": "barking dog", "k": 5, "funnel": 128,
                                                    "shortlist": 40})
        assert [h["id"] for h in body["data"][0]["hits"]] == funnel_hits  # the default is the request's funnel
    finally:
        default.stop()


def test_a_reindex_during_searches_fails_none_and_each_answer_is_one_version(served):
    server, home, env = served
    stop, answers, failures = threading.Event(), [], []

    def search_loop():
        while not stop.is_set():
            try:
                status, body = _post(server, "/v1/search", {"index": "wordnet", "query": "water", "k": 5})
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(repr(exc))
                continue
            if status != 200:
                failures.append(body)
            else:
                answers.append(body)

    threads = [threading.Thread(target=search_loop) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        table = pq.read_table(home / "glosses.parquet")
        texts = [f"{t} (revised)" for t in table.column("text").to_pylist()]
        pq.write_table(table.set_column(table.schema.get_field_index("text"), "text", [texts]),
                       home / "glosses.parquet")
        result = _cli(["index", "glosses.parquet", "--out", "wordnet", "--model", "minilm", "--dims", "128",
                       "--quiet"], home, env)
        assert result.returncode == 0, result.stderr
        seen_new = threading.Event()

        def new_version_served() -> bool:
            return any(a["version"] == "v000002" for a in answers[-6:])

        for _ in range(300):
            if new_version_served():
                seen_new.set()
                break
            stop.wait(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not failures, failures[:3]
    assert seen_new.is_set() and {a["version"] for a in answers} == {"v000001", "v000002"}
    for answer in answers:  # the hits of one answer all come from the version it names
        revised = {h["text"].endswith("(revised)") for item in answer["data"] for h in item["hits"]}
        assert revised == {answer["version"] == "v000002"}, answer


@pytest.mark.slow
def test_serve_workers_share_one_copy_and_survive_the_exporter(tmp_path):
    """`embedctl serve --device-share on` (what `auto` does on a GPU host; here the CPU transport): two workers map
    their exporter's one copy; after a SIGKILL of the exporter the supervisor restarts it and requests keep being
    answered with the same vectors (the worker maps the new copy and runs the batch again)."""
    import signal
    import tempfile

    from openai import OpenAI

    env = _env(tmp_path)
    env["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="ec-")  # short: a Unix socket path holds 107 bytes
    server = Server(["--model", "minilm", "--device-share", "on", "--cache", "0"], env, tmp_path / "server.log", tmp_path,
                    workers=2)
    try:
        server.start()
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        texts = ["a river flows to the sea", "the dog barks"]
        before = np.array([d.embedding for d in client.embeddings.create(model="minilm", input=texts).data])
        exporter = int(server.text().split("exporter pids ")[1].split(")")[0])
        assert server.text().count("weights from exporter:embedctl-") == 2
        os.kill(exporter, signal.SIGKILL)
        answered = _each_worker_embeds(server, texts)  # on the restarted exporter's copy
        assert answered.keys() == _worker_pids(server), (answered.keys(), _worker_pids(server))
        for after in answered.values():
            assert np.allclose(before, after, atol=1e-6)
        log = server.text()
        assert f"the weight exporter on cpu (pid {exporter}) exited with -9: restarting it" in log
        assert "mapping the restarted exporter's weights, then running the batch again" in log
    finally:
        server.stop()
        shutil.rmtree(env["EMBEDCTL_SHM_DIR"], ignore_errors=True)
        shutil.rmtree(env["XDG_RUNTIME_DIR"], ignore_errors=True)
    assert "Traceback" not in server.text(), server.text()[-3000:]


def _worker_pids(server) -> set[int]:
    """The pids of the server's uvicorn workers (children of its supervisor, beside the exporters)."""
    import psutil

    pids = set()
    for child in psutil.Process(server.proc.pid).children():
        with contextlib.suppress(psutil.ZombieProcess):  # the killed exporter, until the supervisor reaps it
            if "spawn_main" in " ".join(child.cmdline()):
                pids.add(child.pid)
    return pids


def _each_worker_embeds(server, texts: list[str], timeout: float = 120) -> dict[int, np.ndarray]:
    """The vectors of `texts` from every worker: on one connection (one worker) /health says whose it is, then
    /v1/embeddings runs there; new connections until each worker answered once (the kernel spreads them)."""
    import http.client

    answered: dict[int, np.ndarray] = {}
    deadline = time.monotonic() + timeout
    while answered.keys() != _worker_pids(server) and time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            connection.request("GET", "/health")
            pid = json.loads(connection.getresponse().read())["pid"]
            if pid in answered:
                continue
            connection.request("POST", "/v1/embeddings", json.dumps({"model": "minilm", "input": texts}),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            body = json.loads(response.read())
            assert response.status == 200, (pid, body)
            answered[pid] = np.array([d["embedding"] for d in body["data"]])
        finally:
            connection.close()
    return answered
