"""Celery distribution against a real redis-server and real prefork workers (subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedctl.jobs.broker import Settings, celery_config, mask_url
from embedctl.pipeline.errors import ConfigError
from embedctl.pipeline.loader import process_device
from embedctl.tasks.worker import child_threads
from tests import indexfiles
from tests.services import wait_until as _wait

ROOT = Path(__file__).resolve().parent.parent
EMBEDCTL = str(Path(sys.executable).parent / "embedctl")


def embedctl(env: dict, *args, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([EMBEDCTL, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
                            cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _done(out: Path) -> int:
    return len(list(out.glob("work/*/chunks/chunk-*.npy")))


def _vectors(out: Path) -> tuple[list, np.ndarray]:
    work = next((out / "work").iterdir()) / "chunks"
    chunks = sorted(work.glob("chunk-*.npy"))
    ids = [i for c in chunks for i in pq.read_table(str(c).replace(".npy", ".rows.parquet")).column("id").to_pylist()]
    return ids, np.concatenate([np.load(c) for c in chunks]).astype(np.float32)


def _busiest_child(worker) -> int | None:
    """The pool child that used the most CPU over the last 0.3 s: the one embedding a chunk right now."""
    import psutil

    def cpu(pid: int) -> float:
        try:
            times = psutil.Process(pid).cpu_times()
            return times.user + times.system
        except psutil.NoSuchProcess:
            return -1.0

    pids = worker.children()
    before = {pid: cpu(pid) for pid in pids}
    time.sleep(0.3)
    return max(pids, key=lambda pid: cpu(pid) - before[pid]) if pids else None


def _assert_every_id_once(out: Path, corpus: Path) -> None:
    ids = indexfiles.live_ids(out)
    expected = pq.read_table(corpus).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == set(expected)
    info = json.loads((out / "current" / "info.json").read_text())
    for dim in info["dims"]:
        assert indexfiles.live_count(out, dim) == len(expected)


# -- unit level: settings and worker set-up --------------------------------------------------------------------

def test_settings_are_json_only_late_ack_and_time_out_everywhere():
    config = celery_config(Settings(broker_url="redis://:pw@h:1/0", visibility_timeout=7200))
    assert config["accept_content"] == ["json"] and config["task_serializer"] == "json"
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    assert config["broker_transport_options"]["visibility_timeout"] == 7200
    assert config["result_backend_transport_options"]["visibility_timeout"] == 7200
    assert config["task_routes"]["embedctl.build_index"]["queue"] == "embedctl.build"
    assert config["result_expires"] > 0


def test_password_is_masked_even_when_it_holds_reserved_characters():
    assert mask_url("redis://:secret@host:6379/0") == "redis://:**@host:6379/0"
    assert mask_url("redis://user:secret@host/0") == "redis://user:**@host/0"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"
    assert mask_url("redis://:p@ss@host:6379/0") == "redis://:**@host:6379/0"  # '@' in the password
    assert mask_url("redis://:pa%2Fss@host:6379/0") == "redis://:**@host:6379/0"  # '/' percent-encoded
    with pytest.raises(ConfigError, match="must be percent-encoded") as info:  # '/' as is: never echoed
        Settings(broker_url="redis://:zq8x/kv7@host:6379/0")
    for piece in ("zq8x/kv7", "zq8x", "kv7"):  # the secret, nor either side of the '/' a parser splits it at
        assert piece not in str(info.value), info.value


def test_child_threads_and_devices():
    assert child_threads(16, 4) == 4 and child_threads(2, 2) == 1 and child_threads(2, 8) == 1
    assert child_threads(16, 4, 3) == 3
    assert process_device("auto", 0, 0) == "cpu" and process_device("cpu", 3, 8) == "cpu"
    assert [process_device("auto", i, 2) for i in range(1, 5)] == ["cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert process_device("cuda:3", 1, 4) == "cuda:3"


# -- broker errors: one line, password masked -----------------------------------------------------------------

@pytest.mark.parametrize("case", ["wrong password", "no password", "unreachable", "password with @"])
def test_broker_errors_are_one_line_with_the_password_masked(case, celery_env, redis_server, sample_slice, tmp_path):
    if not hasattr(redis_server, "port"):
        pytest.skip("needs the test's own redis-server")
    url = {"wrong password": f"redis://:not-the-pw@127.0.0.1:{redis_server.port}/0",
           "no password": f"redis://127.0.0.1:{redis_server.port}/0",
           "unreachable": "redis://:not-the-pw@127.0.0.1:1/0",
           "password with @": f"redis://:not@the-pw@127.0.0.1:{redis_server.port}/0"}[case]
    for args in (["index", sample_slice, "--out", tmp_path / "o", "--model", "minilm", "--broker", url],
                 ["worker", "--model", "minilm", "--broker", url]):
        result = embedctl(celery_env, *args, check=False, timeout=60)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "not-the-pw" not in result.stderr + result.stdout and "the-pw" not in result.stderr + result.stdout
        assert f"127.0.0.1:{1 if case == 'unreachable' else redis_server.port}" in lines[0]
        assert {"wrong password": "refused the password", "no password": "requires a password",
                "unreachable": "cannot reach the broker", "password with @": "refused the password"}[case] in lines[0]
    assert not (tmp_path / "o" / "current").exists()


# -- real workers ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("model", ["minilm", "tiny_qwen3"])
def test_distributed_run_equals_embedded_run(request, model, celery_env, start_worker, sample_slice, tmp_path):
    model_arg = "minilm" if model == "minilm" else str(request.getfixturevalue(model))
    if model == "minilm":  # the convenience command: publishes the weights, then execs a prefork worker
        worker = start_worker(command=[EMBEDCTL, "worker", "--model", "minilm", "-c", "2", "--",
                                       "--without-gossip", "--without-mingle"])
        assert "published embedctl-" in worker.text()
    else:  # the plain Celery command, on weights published beforehand
        embedctl(celery_env, "shm", "publish", "--model", model_arg)
        worker = start_worker(EMBEDCTL_MODEL=model_arg)
    common = ["--model", model_arg, "--chunk-rows", "150", "--dims", "128,32" if model == "minilm" else "32",
              "--quiet", "--json"]
    embedded = json.loads(embedctl({**celery_env, "EMBEDCTL_SHM": "off"}, "index", sample_slice, "--out",
                                   tmp_path / "embedded", *common, "--broker", "").stdout)
    distributed = json.loads(embedctl(celery_env, "index", sample_slice, "--out", tmp_path / "dist", *common,
                                      "--broker", celery_env["EMBEDCTL_BROKER_URL"]).stdout)
    assert embedded["mode"] == "embedded" and distributed["mode"] == "celery"
    assert distributed["status"] == "published" and distributed["chunks_embedded"] == 4
    assert distributed["rows_indexed"] == embedded["rows_indexed"] == 600
    ids_a, vec_a = _vectors(tmp_path / "embedded")
    ids_b, vec_b = _vectors(tmp_path / "dist")
    assert ids_a == ids_b
    cos = (vec_a * vec_b).sum(1) / np.linalg.norm(vec_a, axis=1) / np.linalg.norm(vec_b, axis=1)
    assert cos.min() >= 0.9999
    [rows_a] = indexfiles.segment_files(tmp_path / "embedded", "rows.parquet")
    [rows_b] = indexfiles.segment_files(tmp_path / "dist", "rows.parquet")
    assert pq.read_table(rows_a).equals(pq.read_table(rows_b))
    reports = [json.loads(p.read_text()) for p in (tmp_path / "dist").glob("work/*/chunks/chunk-*.json")]
    assert all(r["weights"].startswith("shm:embedctl-") for r in reports)  # pool children attached
    status = json.loads(embedctl(celery_env, "status", tmp_path / "dist", "--json").stdout)
    assert status["state"] == "published" and status["chunks_done"] == 4 and status["mode"] == "celery"
    again = json.loads(embedctl(celery_env, "index", sample_slice, "--out", tmp_path / "dist", *common,
                                "--broker", celery_env["EMBEDCTL_BROKER_URL"]).stdout)
    assert again["status"] == "up-to-date" and again["rows_embedded"] == 0
    assert "s3cret-pw" not in worker.text()


@pytest.mark.slow
def test_kill9_of_a_pool_child_holding_a_chunk(celery_env, start_worker, sample_corpus, tmp_path):
    embedctl(celery_env, "shm", "publish", "--model", "minilm")
    worker = start_worker(EMBEDCTL_MODEL="minilm")
    out = tmp_path / "o"
    follower = subprocess.Popen([EMBEDCTL, "index", str(sample_corpus), "--out", str(out), "--model", "minilm",
                                 "--chunk-rows", "100", "--dims", "128", "--quiet", "--json", "--broker",
                                 celery_env["EMBEDCTL_BROKER_URL"]], env=celery_env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: _done(out) >= 2, 120, "two chunks")
    for _ in range(5):  # kill the child that is computing; an idle one (between chunks) would prove nothing
        if follower.poll() is not None:
            break
        victim = _busiest_child(worker)
        if victim is None:  # the pool is replacing a child right now
            continue
        os.kill(victim, signal.SIGKILL)
        try:
            _wait(lambda: "WorkerLostError" in worker.text(), 5, "the pool to report the lost chunk")
            break
        except AssertionError:
            continue
    stdout, stderr = follower.communicate(timeout=300)
    assert follower.returncode == 0, stderr
    assert "WorkerLostError" in worker.text() and "Job:" in worker.text()  # it held a chunk when killed
    report = json.loads(stdout)
    assert report["status"] == "published" and report["rows_indexed"] == 3000
    _assert_every_id_once(out, sample_corpus)


@pytest.mark.slow
def test_redis_restarted_mid_job_then_rerun_resumes(celery_env, start_worker, sample_corpus, tmp_path):
    from tests.services import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    env = {**celery_env, "EMBEDCTL_BROKER_URL": server.url}
    try:
        embedctl(env, "shm", "publish", "--model", "minilm")
        start_worker(EMBEDCTL_MODEL="minilm", EMBEDCTL_BROKER_URL=server.url)
        out = tmp_path / "o"
        args = ["index", sample_corpus, "--out", out, "--model", "minilm", "--chunk-rows", "100", "--dims", "128",
                "--quiet", "--json", "--broker", server.url]
        embedctl(env, *args, "--detach")
        _wait(lambda: _done(out) >= 3, 120, "three chunks")
        server.stop()  # --save "": the queue is gone
        done_while_down = _done(out)
        server.start()
        report = json.loads(embedctl(env, *args, timeout=600).stdout)
        assert report["status"] == "published" and report["rows_indexed"] == 3000
        assert report["chunks_done_before"] >= done_while_down >= 3
        assert report["chunks_embedded"] == 30 - report["chunks_done_before"]
        _assert_every_id_once(out, sample_corpus)
    finally:
        server.stop()


@pytest.mark.slow
def test_pickle_message_is_rejected(celery_env, start_worker, sample_slice, tmp_path):
    from kombu import Connection, Exchange, Producer

    from embedctl.jobs import lifecycle
    from embedctl.jobs.spec import JobSpec

    worker = start_worker()
    settings = Settings.from_env(celery_env)
    run = lifecycle.begin(JobSpec(corpus=str(sample_slice), out=str(tmp_path / "o"), model="minilm", chunk_rows=300),
                          "celery", settings)  # a run that owns the job, as the submitter begins it
    plan = run.plan
    body = ((str(plan.work_dir), 0), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
    with Connection(celery_env["EMBEDCTL_BROKER_URL"]) as conn:
        producer = Producer(conn)
        producer.publish(body, exchange=Exchange("embedctl.embed", type="direct"), routing_key="embedctl.embed",
                         serializer="pickle", headers={"task": "embedctl.embed_chunk", "id": "pickled-1",
                                                       "lang": "py", "argsrepr": "", "kwargsrepr": ""},
                         declare=[])
    _wait(lambda: "disallowed" in worker.text().lower() or "ContentDisallowed" in worker.text(), 60,
          "the worker to refuse the pickle message")
    assert not plan.store.is_complete(0) and "pickled-1" not in worker.text().split("disallowed")[-1]  # not run
    from embedctl.jobs.broker import EMBED_TASK, sender

    sender(settings).send_task(EMBED_TASK, (str(plan.work_dir), 0))  # the same task as JSON runs
    _wait(lambda: plan.store.is_complete(0), 120, "the JSON message to run")


@pytest.mark.slow
def test_plain_celery_cli_inspects_the_workers(celery_env, start_worker):
    start_worker()
    result = subprocess.run([sys.executable, "-m", "celery", "-A", "embedctl.tasks", "inspect", "ping", "--timeout", "5"],
                            capture_output=True, text=True, env=celery_env, cwd=ROOT, timeout=60)
    assert result.returncode == 0 and "pong" in result.stdout, result.stdout + result.stderr
    registered = subprocess.run([sys.executable, "-m", "celery", "-A", "embedctl.tasks", "inspect", "registered"],
                                capture_output=True, text=True, env=celery_env, cwd=ROOT, timeout=60)
    assert "embedctl.embed_chunk" in registered.stdout and "embedctl.build_index" in registered.stdout


@pytest.mark.slow
def test_one_weight_copy_per_device_and_an_exporter_killed_mid_job(celery_env, start_worker, sample_corpus,
                                                                   tmp_path):
    """`embedctl worker --device-share on` (what `auto` does on a GPU host, here with the CPU transport): both pool
    children map the one copy their exporter holds; SIGKILL of the exporter mid-job fails the chunks in flight,
    which are re-queued, the worker restarts the exporter, and the job completes with every row once."""
    import tempfile

    run_dir = Path(tempfile.mkdtemp(prefix="ec-"))  # a short folder: a Unix socket path holds 107 bytes
    env = {**celery_env, "XDG_RUNTIME_DIR": str(run_dir)}
    worker = start_worker(command=[EMBEDCTL, "worker", "--model", "minilm", "-c", "2", "--device-share", "on", "--",
                                   "--without-gossip", "--without-mingle"], XDG_RUNTIME_DIR=str(run_dir))
    _wait(lambda: worker.text().count("from its exporter") >= 2, 30, "both children to map the exporter's copy")
    exporter = int(worker.text().split("exporter pids ")[1].split(")")[0])
    celery_parent = next(p for p in worker.children() if p != exporter and _cmdline(p).count("celery"))

    def memfd_maps(pid: int) -> set[str]:
        return {line.split()[4] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                if "memfd:embedctl-weights" in line}

    children = [p for p in worker.children() if p not in (exporter, celery_parent)]
    inodes = [memfd_maps(p) for p in children]
    assert len(children) == 2 and inodes[0] and inodes[0] == inodes[1] == memfd_maps(exporter)  # one copy
    assert not memfd_maps(celery_parent)  # the parent that forks them maps no weights
    assert f"CUDA is off limits in this worker parent (pid {celery_parent})" in worker.text()
    out = tmp_path / "o"
    follower = subprocess.Popen([EMBEDCTL, "index", str(sample_corpus), "--out", str(out), "--model", "minilm",
                                 "--chunk-rows", "100", "--dims", "64", "--quiet", "--json", "--broker",
                                 env["EMBEDCTL_BROKER_URL"]], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    _wait(lambda: _done(out) >= 3, 120, "three chunks")
    os.kill(exporter, signal.SIGKILL)
    stdout, stderr = follower.communicate(timeout=300)
    assert follower.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["status"] == "published" and report["rows_indexed"] == 3000
    _assert_every_id_once(out, sample_corpus)
    log = worker.text()
    assert f"the weight exporter on cpu (pid {exporter}) exited with -9: restarting it" in log
    assert "the weight exporter on cpu is back" in log
    assert "(re-queued)" in log and "exited; this work fails and is retried" in log
    reports = [json.loads(p.read_text()) for p in out.glob("work/*/chunks/chunk-*.json")]
    assert all(r["weights"].startswith("exporter:embedctl-") for r in reports)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
