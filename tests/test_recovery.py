"""Recovery from what dies under a distributed run: Redis restarted mid-job (the follower reconnects and
finishes), a follower killed (its lease is taken over at once by the next run on its host), and the Celery parent
of `embedctl worker` killed (logged and restarted; given up in one line when it keeps dying)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from embedctl.jobs import locks
from embedctl.jobs.broker import Settings
from tests import indexfiles
from tests.services import ROOT, RedisServer, wait_until

EMBEDCTL = str(Path(sys.executable).parent / "embedctl")


def _done(out: Path) -> int:
    return len(list(out.glob("work/*/chunks/chunk-*.npy")))


def _assert_every_id_once(out: Path, corpus: Path) -> None:
    ids = indexfiles.live_ids(out)
    expected = pq.read_table(corpus, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == set(expected)


def _follow(env: dict, corpus: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([EMBEDCTL, "index", str(corpus), "--out", str(out), "--model", "minilm", "--dims", "128",
                             "--quiet", "--json", *extra, "--broker", env["EMBEDCTL_BROKER_URL"]], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- item 6: Redis restarted under a follower ------------------------------------------------------------------

@pytest.mark.slow
def test_follower_reconnects_after_redis_restarts_mid_job_and_finishes(celery_env, start_worker, sample_corpus,
                                                                        tmp_path):
    """SIGKILL of Redis (it keeps nothing: the queue and the lease are lost) in the middle of a 30-chunk job, then
    Redis again on the same port: the follower says what happened, re-queues what is missing and finishes, instead
    of blaming the worker that is running."""
    server = RedisServer(tmp_path / "redis").start()
    knobs = {"EMBEDCTL_STALL_SECONDS": "8", "EMBEDCTL_LEASE_SECONDS": "6"}
    env = {**celery_env, "EMBEDCTL_BROKER_URL": server.url, **knobs}
    try:
        subprocess.run([EMBEDCTL, "shm", "publish", "--model", "minilm"], env=env, check=True, capture_output=True)
        worker = start_worker(EMBEDCTL_MODEL="minilm", EMBEDCTL_BROKER_URL=server.url, concurrency=1, **knobs)
        out = tmp_path / "o"
        t0 = time.monotonic()
        follower = _follow(env, sample_corpus, out, "--chunk-rows", "100")
        wait_until(lambda: _done(out) >= 3, 180, "three chunks")
        server.proc.kill()  # SIGKILL: nothing saved, no goodbye to the clients
        server.proc.wait(timeout=20)
        done_while_down = _done(out)
        time.sleep(3)
        server.start()  # the same port, empty
        stdout, stderr = follower.communicate(timeout=420)
        assert follower.returncode == 0, stderr
        assert "cannot ask the workers" not in stderr and "start a worker" not in stderr
        assert "restarted" in stderr and "re-queued" in stderr, stderr  # it said what happened and what it did
        assert "s3cret-pw" not in stderr + worker.text()
        report = json.loads(stdout)
        assert report["status"] == "published" and report["rows_indexed"] == 3000
        assert done_while_down < 30 and report["chunks_embedded"] + report["chunks_done_before"] == 30
        _assert_every_id_once(out, sample_corpus)
        assert time.monotonic() - t0 < 400
    finally:
        server.stop()


# -- item 6: a dead follower's lease ----------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lease(settings: Settings, key: str, run_id: str, **holder) -> locks.RedisLease:
    record = {**locks.holder_record(run_id, "celery"), **holder}
    return locks.RedisLease(settings, key, json.dumps(record))


@pytest.mark.parametrize("case", ["pid gone", "pid reused", "alive", "other host", "not followed"])
def test_a_lease_held_by_a_dead_follower_on_this_host_is_taken_over_at_once(case, redis_server, caplog):
    settings = Settings(broker_url=redis_server.url, lease_seconds=120)
    key = f"embedctl:lock:out:test-{case.replace(' ', '-')}"
    redis_server.flush()
    me = locks.holder_record("x", "celery")
    holder = {"pid gone": {"pid": _dead_pid()},
              "pid reused": {"pid": os.getpid(), "pid_start": (me.get("pid_start") or 0) + 1},
              "alive": {},
              "other host": {"pid": _dead_pid(), "host": socket.gethostname() + "-elsewhere"},
              "not followed": {"pid": _dead_pid()}}[case]
    old = _lease(settings, key, "oldrun000001", **holder)
    assert old.acquire()
    if case != "not followed":  # a detached run has no follower: its workers keep its lease, not its submitter
        old.mark_followed()
    new = _lease(settings, key, "newrun000002")
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="embedctl.jobs.locks"):
        taken = new.acquire()
    assert time.monotonic() - t0 < 2
    if case in ("pid gone", "pid reused"):
        assert taken and new.holder()["run_id"] == "newrun000002"
        [line] = [r.getMessage() for r in caplog.records]
        assert "took over" in line and "oldrun000001" in line and f"pid {holder['pid']}" in line
        assert not old.renew()  # the dead run's workers find it taken
        new.release()
    else:
        assert not taken and new.holder()["run_id"] == "oldrun000001" and not caplog.records
        old.release()


def _a_followed_job_under_way(celery_env, start_worker, corpus: Path, tmp_path: Path):
    """(env, out, follower) of a 12-chunk job on one worker, once its first chunk is done (the lease has 120 s)."""
    env = {**celery_env, "EMBEDCTL_LEASE_SECONDS": "120"}
    subprocess.run([EMBEDCTL, "shm", "publish", "--model", "minilm"], env=env, check=True, capture_output=True)
    start_worker(EMBEDCTL_MODEL="minilm", concurrency=1)
    out = tmp_path / "o"
    first = _follow(env, corpus, out, "--chunk-rows", "50")
    wait_until(lambda: _done(out) >= 1, 180, "a chunk")
    return env, out, first


@pytest.mark.slow
def test_a_rerun_after_a_killed_follower_takes_its_lease_over_at_once(celery_env, start_worker, sample_slice,
                                                                      tmp_path):
    """The follower of a job is killed; the same command, run again at once (the lease has 120 s to go and the
    worker renews it), takes the run over, says so in one line and publishes."""
    env, out, first = _a_followed_job_under_way(celery_env, start_worker, sample_slice, tmp_path)
    first.kill()
    first.communicate(timeout=20)
    t0 = time.monotonic()
    again = subprocess.run([EMBEDCTL, "index", str(sample_slice), "--out", str(out), "--model", "minilm", "--dims",
                            "128", "--quiet", "--json", "--chunk-rows", "50", "--broker", env["EMBEDCTL_BROKER_URL"]],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "took over" in lines[0] and f"pid {first.pid}" in lines[0], again.stderr
    assert json.loads(again.stdout)["status"] == "published"
    assert time.monotonic() - t0 < 100  # not the lease's 120 s
    _assert_every_id_once(out, sample_slice)
    history = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    ends = {h["run_id"]: h for h in history if h["status"] != "running"}
    assert len(ends) == len({h["run_id"] for h in history}) == 2, history  # the dead run is closed too
    dead = next(h for h in ends.values() if h["status"] == "failed")
    assert "its follower died" in dead["error"], dead


@pytest.mark.slow
def test_a_follower_stopped_by_ctrl_c_leaves_a_run_that_is_never_taken_over(celery_env, start_worker, sample_slice,
                                                                           tmp_path):
    """Ctrl-C stops following, not the job: the run lives on in its workers, so a re-run is refused (busy), not
    handed the lease of a live run."""
    env, out, first = _a_followed_job_under_way(celery_env, start_worker, sample_slice, tmp_path)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 130 and "keeps running on the workers" in stderr, stderr
    again = subprocess.run([EMBEDCTL, "index", str(sample_slice), "--out", str(out), "--model", "minilm", "--dims",
                            "128", "--quiet", "--chunk-rows", "50", "--broker", env["EMBEDCTL_BROKER_URL"]],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    published = (out / "current").exists()
    if not published:  # the job may have finished meanwhile; while it runs, a re-run is refused
        assert again.returncode == 1 and "is being written by run" in again.stderr, again.stderr
    assert "took over" not in again.stderr, again.stderr


# -- item 7: the Celery parent of `embedctl worker` dies -------------------------------------------------------

def _celery_parent(bootstrap: int) -> int | None:
    import psutil

    try:
        kids = psutil.Process(bootstrap).children()
    except psutil.NoSuchProcess:
        return None
    return next((p.pid for p in kids if "celery" in " ".join(p.cmdline())), None)


@pytest.mark.slow
def test_a_killed_celery_parent_is_logged_and_restarted_and_repeated_deaths_end_the_worker(
        celery_env, start_worker, sample_slice, tmp_path):
    import tempfile

    run_dir = Path(tempfile.mkdtemp(prefix="ec-"))  # a short folder: a Unix socket path holds 107 bytes
    env = {**celery_env, "XDG_RUNTIME_DIR": str(run_dir), "EMBEDCTL_WORKER_DEATHS": "3"}
    worker = start_worker(command=[EMBEDCTL, "worker", "--model", "minilm", "-c", "1", "--device-share", "on", "--",
                                   "--without-gossip", "--without-mingle"], XDG_RUNTIME_DIR=str(run_dir),
                          EMBEDCTL_WORKER_DEATHS="3")
    exporter = int(worker.text().split("exporter pids ")[1].split(")")[0])
    celery = _celery_parent(worker.proc.pid)
    assert celery is not None
    os.kill(celery, signal.SIGKILL)
    wait_until(lambda: worker.text().count(" ready.") >= 2 or worker.proc.poll() is not None, 120,
               "Celery to start again")
    assert worker.proc.poll() is None, f"embedctl worker exited with {worker.proc.returncode}:\n{worker.text()[-2000:]}"
    log = worker.text()
    assert f"the Celery worker (pid {celery}) was killed by signal 9 (SIGKILL)" in log and "restarting it" in log
    again = _celery_parent(worker.proc.pid)
    assert again not in (None, celery) and worker.proc.poll() is None
    assert Path(f"/proc/{exporter}").exists()  # the exporter kept its copy
    result = subprocess.run([EMBEDCTL, "index", str(sample_slice), "--out", str(tmp_path / "o"), "--model", "minilm",
                             "--dims", "128", "--chunk-rows", "300", "--quiet", "--json", "--broker",
                             env["EMBEDCTL_BROKER_URL"]], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "published"
    # two more deaths within the window (EMBEDCTL_WORKER_DEATHS=3): the worker gives up in one line
    os.kill(again, signal.SIGKILL)
    wait_until(lambda: worker.text().count(" ready.") >= 3, 120, "Celery to start a third time")
    os.kill(_celery_parent(worker.proc.pid), signal.SIGKILL)
    worker.proc.wait(timeout=60)
    assert worker.proc.returncode == 1
    last = [line for line in worker.text().splitlines() if line.strip()][-1]
    assert last.startswith("Error: ") and "died 3 times" in last and "signal 9" in last, last
    wait_until(lambda: not Path(f"/proc/{exporter}").exists(), 30, "the exporter to stop")


def test_deaths_back_off_and_give_up_only_within_the_window():
    from embedctl.shm_loader.supervise import Deaths, describe_exit

    now = [0.0]
    deaths = Deaths(limit=3, window=100, clock=lambda: now[0])
    assert deaths.record() == 1.0
    now[0] = 10
    assert deaths.record() == 2.0
    now[0] = 150  # the first two are out of the window: a worker that dies now and then runs for ever
    assert deaths.record() == 1.0
    now[0] = 160
    assert deaths.record() == 2.0
    now[0] = 170
    assert deaths.record() is None  # three within 100 s: give up
    assert describe_exit(-9) == "was killed by signal 9 (SIGKILL)" and describe_exit(3) == "exited with code 3"


def test_a_follower_whose_broker_stays_down_gives_up_in_one_line(monkeypatch):
    """While Redis is down the follower follows from disk; past BROKER_PATIENCE x EMBEDCTL_STALL_SECONDS it ends
    (a cron or CI run must not hang for ever), naming the broker (masked) and what to do."""
    from types import SimpleNamespace

    from embedctl.jobs import distributed
    from embedctl.jobs.broker import Settings
    from tests.services import free_port

    settings = Settings.from_env({"EMBEDCTL_BROKER_URL": f"redis://:s3cret@127.0.0.1:{free_port()}/0",
                                  "EMBEDCTL_STALL_SECONDS": "1"})
    run = SimpleNamespace(plan=SimpleNamespace(plan_id="p1"))
    watchdog = distributed.Watchdog(run, settings, every=0.0)
    clock = [time.monotonic() + 1000.0]
    monkeypatch.setattr(distributed.time, "monotonic", lambda: clock[0])
    assert watchdog.check() == []  # lost: followed from disk
    clock[0] += distributed.BROKER_PATIENCE * 1 - 0.5
    assert watchdog.check() == []  # still within its patience
    clock[0] += 1.0
    with pytest.raises(distributed.JobFailed) as failed:
        watchdog.check()
    message = str(failed.value)
    assert "has not answered for 5 s" in message and "run the same command again" in message
    assert "s3cret" not in message
