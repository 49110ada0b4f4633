"""What `embedctl serve` refuses and whom it stops waiting for: texts that are not Unicode (a lone surrogate escape),
numbers that are not JSON integers (booleans, floats, numeric strings), and clients that never finish sending
their request (half the headers, half the body, one byte at a time), which must neither hold a connection forever
nor keep real clients from being answered, even where the server answers without reading the body (no API key,
/health). One real server process with an API key, its limits set through EMBEDCTL_* variables."""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from embedctl.cli import main
from tests.services import Server
from tests.test_serve import _cli, _env

TIMEOUT = 2.0  # --header-timeout and --body-timeout of the server under test
CAP = 250  # its --max-connections
SLOW = 200  # half-sent connections in the slow-client test
SLACK = 30.0  # what a loaded machine may add to a deadline: a connection the server never closes still fails
KEY = "sesame"  # the server's --api-key
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, sample_slice):
    """A MiniLM index of 60 glosses and a one-worker server of it with short read timeouts."""
    home = tmp_path_factory.mktemp("serve-input")
    env = _env(home)
    pq.write_table(pq.read_table(sample_slice).slice(0, 60), home / "glosses.parquet")
    result = _cli(["index", "glosses.parquet", "--out", "wordnet", "--model", "minilm", "--quiet"], home, env)
    assert result.returncode == 0, result.stderr
    env.update(EMBEDCTL_HEADER_TIMEOUT=str(TIMEOUT), EMBEDCTL_BODY_TIMEOUT=str(TIMEOUT),
               EMBEDCTL_MAX_CONNECTIONS=str(CAP))
    served = Server(["wordnet", "--model", "minilm"], env, home / "server.log", home, api_key=KEY)
    try:
        yield served.start()
    finally:
        served.stop()
        shutil.rmtree(env["EMBEDCTL_SHM_DIR"], ignore_errors=True)
    log = served.text()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def _post(server, path: str, body: bytes, timeout: float = 30) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=body,
                                     headers={"Content-Type": "application/json", **AUTH})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _assert_openai_error(status: int, body: dict, expected: int, param: str | None = None) -> dict:
    assert status == expected, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# --- texts that are not Unicode ------------------------------------------------------------------------------

SURROGATES = [  # json.dumps writes a lone surrogate as the escape \ud800 (as JSON.stringify does), raw HTTP sends it
    ("/v1/embeddings", {"model": "minilm", "input": "a\ud800b"}),
    ("/v1/embeddings", {"model": "minilm", "input": ["fine", "x\udc00"]}),
    ("/v1/embeddings", {"model": "minilm", "input": "text", "instruction": "find \ud800"}),
    ("/v1/embeddings", {"model": "minilm", "input": "text", "prefix": "\udfff: "}),
    ("/v1/embeddings", {"model": "mini\ud800lm", "input": "text"}),
    ("/v1/search", {"index": "wordnet", "query": "a\ud800b"}),
    ("/v1/search", {"index": "wordnet", "query": ["water", "\udc00"]}),
    ("/v1/search", {"index": "wordnet", "query": "water", "instruction": "\ud800"}),
    ("/v1/search", {"index": "word\ud800net", "query": "water"}),
]


@pytest.mark.parametrize(("path", "body"), SURROGATES, ids=lambda v: v if isinstance(v, str) else None)
def test_a_lone_surrogate_is_a_400_in_openais_error_shape(server, path, body):
    raw = json.dumps(body).encode()
    assert b"\\ud" in raw
    error = _assert_openai_error(*_post(server, path, raw), 400)
    assert "not valid JSON" in error["message"] and "Unicode" in error["message"], error


def test_a_surrogate_pair_is_one_character_and_is_served(server):
    status, body = _post(server, "/v1/embeddings", json.dumps({"model": "minilm", "input": "dog \U0001F415"}).encode())
    assert status == 200 and len(body["data"]) == 1  # json.dumps wrote the dog as the pair \ud83d\udc15


# --- numbers that are not integers ---------------------------------------------------------------------------

TEXT = {"model": "minilm", "input": "a domestic animal"}
QUERY = {"index": "wordnet", "query": "water"}
NOT_INTEGERS = [  # (path, body, param): each was accepted (coerced) before
    ("/v1/embeddings", {"model": "minilm", "input": [True, False]}, "input"),
    ("/v1/embeddings", {"model": "minilm", "input": [[2000, True]]}, "input"),
    ("/v1/embeddings", {"model": "minilm", "input": [2000.0, 2001.0]}, "input"),
    ("/v1/embeddings", {"model": "minilm", "input": [[2000, 2001], [2002.0]]}, "input"),
    ("/v1/embeddings", {**TEXT, "dimensions": "12"}, "dimensions"),
    ("/v1/embeddings", {**TEXT, "dimensions": True}, "dimensions"),
    ("/v1/embeddings", {**TEXT, "dimensions": 12.0}, "dimensions"),
    ("/v1/search", {**QUERY, "k": "5"}, "k"),
    ("/v1/search", {**QUERY, "k": True}, "k"),
    ("/v1/search", {**QUERY, "k": 5.0}, "k"),
    ("/v1/search", {**QUERY, "dim": "384"}, "dim"),
    ("/v1/search", {**QUERY, "dim": 384.0}, "dim"),
    ("/v1/search", {**QUERY, "ef": "64"}, "ef"),
    ("/v1/search", {**QUERY, "ef": True}, "ef"),
    ("/v1/search", {**QUERY, "ef": 64.0}, "ef"),
    # integers too large for any use (an ef of 2**63 or more was an OverflowError in the index, and a 500)
    ("/v1/search", {**QUERY, "ef": 10**400}, "ef"),
    ("/v1/search", {**QUERY, "ef": 2**63}, "ef"),
    ("/v1/search", {**QUERY, "k": 10**400}, "k"),
    ("/v1/search", {**QUERY, "dim": 10**400}, "dim"),
    ("/v1/embeddings", {**TEXT, "dimensions": 10**400}, "dimensions"),
    # strings are not coerced either way
    ("/v1/embeddings", {"model": "minilm", "input": "text", "instruction": 5}, "instruction"),
    ("/v1/embeddings", {"model": "minilm", "input": "text", "prefix": True}, "prefix"),
    ("/v1/search", {**QUERY, "query": [True]}, "query"),
]


@pytest.mark.parametrize(("path", "body", "param"), NOT_INTEGERS,
                         ids=[f"{p[4:]}-{json.dumps(b)[:60]}" for p, b, _ in NOT_INTEGERS])
def test_a_number_that_is_not_an_integer_is_a_400(server, path, body, param):
    error = _assert_openai_error(*_post(server, path, json.dumps(body).encode()), 400, param)
    assert error["message"].startswith("invalid request: ") and param in error["message"], error


def test_the_same_fields_as_integers_are_served(server):
    for path, body in [("/v1/embeddings", {"model": "minilm", "input": [2000, 2001]}),
                       ("/v1/embeddings", {"model": "minilm", "input": [[2000, 2001], [2002]]}),
                       ("/v1/embeddings", {**TEXT, "dimensions": 12}),
                       ("/v1/search", {**QUERY, "k": 5, "dim": 384, "ef": 64})]:
        status, answer = _post(server, path, json.dumps(body).encode())
        assert status == 200, answer
    error = _assert_openai_error(*_post(server, "/v1/embeddings", json.dumps([1]).encode()), 400)
    assert error["message"] == "the request body must be a JSON object"


# --- slow clients --------------------------------------------------------------------------------------------

def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _answer(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection (fails the test at `deadline`)."""
    data = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the server kept a slow connection open past the deadline (got {data!r})") \
                from None
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _timed_request(server, i: int) -> float:
    started = time.perf_counter()
    status, body = _post(server, "/v1/embeddings", json.dumps({"model": "minilm", "input": f"request {i}: a "
                                                                "river flows to the sea"}).encode(), timeout=5)
    assert status == 200, body
    return time.perf_counter() - started


HEAD = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n")


def _drip(sock: socket.socket, data: bytes, every: float, stop: threading.Event) -> threading.Thread:
    """A thread sending `data` to `sock` one byte every `every` s, until `stop` is set or the server hangs up."""
    def drip():
        for byte in data:
            if stop.wait(every):
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=drip)
    thread.start()
    return thread


def _one_response(sock: socket.socket) -> bytes:
    """Exactly one response of a kept-alive connection: its headers, then Content-Length bytes of body (a recv may
    return the headers alone; what it left would be read as the start of the next answer)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, data
        body += chunk
    assert len(body) == length, (head, body)
    return head + b"\r\n\r\n" + body


def test_slow_clients_are_timed_out_and_do_not_starve_real_ones(server):
    """200 connections that send their headers and part of a 1,000-byte body, a few that stop inside the headers or
    send nothing, one that sends a byte every 0.4 s, one that announces a body over --max-body, and a keep-alive
    one that stops in its second request's headers: real requests are answered meanwhile, and within the timeout each slow one is answered 408 and closed (a
    silent one closed)."""
    quiet = [_timed_request(server, i) for i in range(20)]
    opened = time.monotonic()
    half_body = [_connect(server) for _ in range(SLOW)]
    for sock in half_body:
        sock.sendall(HEAD + b'{"model": "minilm", "input": "a river')
    half_headers = [_connect(server) for _ in range(5)]
    for sock in half_headers:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Le")
    silent = [_connect(server) for _ in range(5)]
    second = _connect(server)  # one request answered, then half the headers of the next on the same connection
    second.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _one_response(second).startswith(b"HTTP/1.1 200")
    second.sendall(b"GET /health HTTP/1.1\r\nHo")
    oversized = _connect(server)  # declares more than --max-body: the server reads it away before its 413
    oversized.sendall(HEAD.replace(b"1000", b"5000000") + b"x" * 1000)
    dripping, stop = _connect(server), threading.Event()
    dripping.sendall(HEAD)
    # under the body timeout between any two bytes, far over it in all
    dripper = _drip(dripping, b'{"model": "minilm", "input": "' + b"x" * 900, 0.4, stop)
    try:
        loaded = [_timed_request(server, 100 + i) for i in range(20)]
        deadline = opened + TIMEOUT + SLACK
        for sock in [*half_body, oversized, dripping]:
            answer = _answer(sock, deadline)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
            assert error["code"] == "request_timeout" and "--body-timeout" in error["message"], error
        for sock in [*half_headers, second]:
            answer = _answer(sock, deadline)
            assert answer.startswith(b"HTTP/1.1 408") and b"--header-timeout" in answer, answer
        for sock in silent:  # nothing asked, nothing answered
            assert _answer(sock, deadline) == b""
        closed = time.monotonic() - opened
    finally:
        stop.set()
        dripper.join()
        for sock in [*half_body, *half_headers, *silent, second, oversized, dripping]:
            sock.close()
    after = [_timed_request(server, 200 + i) for i in range(5)]
    print(f"\nreal request latency, median / max of 20: alone {statistics.median(quiet) * 1000:.1f} / "
          f"{max(quiet) * 1000:.1f} ms, beside {SLOW} half-sent connections "
          f"{statistics.median(loaded) * 1000:.1f} / {max(loaded) * 1000:.1f} ms; every slow connection "
          f"answered 408 or closed {closed:.2f} s after it opened (timeout {TIMEOUT} s); afterwards "
          f"{statistics.median(after) * 1000:.1f} ms")
    assert max(loaded) < 3.0


def _until(deadline: float, request, status: int) -> tuple[int, dict]:
    """`request()` again until it is answered `status` or `deadline` passes; its last answer."""
    while True:
        answer = request()
        if answer[0] == status or time.monotonic() >= deadline:
            return answer
        time.sleep(0.05)


def test_connections_above_the_cap_get_a_503_in_openais_error_shape(server):
    def embed() -> tuple[int, dict]:
        return _post(server, "/v1/embeddings", json.dumps(TEXT).encode())

    opened = time.monotonic()
    idle = [_connect(server) for _ in range(CAP + 10)]
    try:
        # the server accepts them in the order they came, and holds each for --header-timeout from then: a request
        # behind them is refused until then (a 200 meanwhile: the server has not accepted them all yet)
        status, body = _until(opened + TIMEOUT, embed, 503)
        error = _assert_openai_error(status, body, 503)
        assert error["code"] == "overloaded" and "--max-connections" in error["message"], error
    finally:
        for sock in idle:
            sock.close()
    status, body = _until(time.monotonic() + SLACK, embed, 200)  # until the server has let the closed ones go
    assert status == 200, body


DRIPPED = [  # (request head, answer) of routes that answer without reading the body
    (b"GET /health HTTP/1.1\r\nHost: x\r\n", b"HTTP/1.1 200"),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n", b"HTTP/1.1 401"),  # no API key
    (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n", b"HTTP/1.1 401"),
    (b"GET /nowhere HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n", b"HTTP/1.1 404"),
]


@pytest.mark.parametrize(("head", "status"), DRIPPED, ids=lambda v: v.split(b"\r\n")[0].decode())
def test_a_body_dripped_to_a_route_that_does_not_read_it_does_not_hold_the_connection(server, head, status):
    """Every byte a client sends put uvicorn's keep-alive timer off, and the app's body deadline applied only when
    it read the body: a byte a second to /health or to a 401 held the connection forever."""
    sock, stop = _connect(server), threading.Event()
    started = time.monotonic()
    sock.sendall(head + b"Content-Length: 1000\r\n\r\n")
    dripper = _drip(sock, b"x" * 1000, 0.3, stop)
    try:
        answer = _answer(sock, started + TIMEOUT + SLACK)
    finally:
        stop.set()
        dripper.join()
        sock.close()
    assert answer.startswith(status), answer
    assert time.monotonic() - started < TIMEOUT + SLACK


def test_a_client_that_hangs_up_mid_body_costs_no_error(server):
    for _ in range(3):
        sock = _connect(server)
        sock.sendall(HEAD + b'{"model": "minilm", "inp')
        time.sleep(0.1)
        sock.close()
    time.sleep(0.3)
    assert _post(server, "/v1/embeddings", json.dumps(TEXT).encode())[0] == 200
    assert "Traceback" not in server.text() and "internal error" not in server.text(), server.text()[-3000:]


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--header-timeout", "0", "--header-timeout must be a finite number of seconds > 0, got 0.0"),
    ("--body-timeout", "inf", "--body-timeout must be a finite number of seconds > 0, got inf"),
    ("--max-connections", "0", "--max-connections must be >= 1, got 0"),
    ("--workers", "0", "--workers must be >= 1, got 0"),
    ("--batch-wait-ms", "-1", "--batch-wait-ms must be >= 0, got -1.0"),
    ("--port", "70000", "--port must be between 1 and 65535, got 70000"),
    ("--api-key", " ", "--api-key is empty; give a key or leave the option out"),
])
def test_serve_refuses_limits_out_of_range(option, value, message):
    result = CliRunner().invoke(main, ["serve", "--model", "minilm", option, value])
    assert result.exit_code == 1 and message in result.output, result.output
