"""Runs that meet each other or die, with real workers: one writer per output folder, leases that lapse with their
holder, a build that survives its pool children, a follower that re-queues the work of a dead worker, and the same
run report from every mode."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedctl.jobs.report import field_names
from embedctl.pipeline import versions
from tests import indexfiles
from tests.services import ROOT, wait_until

EMBEDCTL = str(Path(sys.executable).parent / "embedctl")


def embedctl(env: dict, *args, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([EMBEDCTL, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=cwd)


def _one_line_error(result: subprocess.CompletedProcess, code: int = 1) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _ids(out: Path) -> list:
    return indexfiles.live_ids(out)


def _assert_every_id_once(out: Path, corpus: Path) -> None:
    ids = _ids(out)
    expected = pq.read_table(corpus, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == set(expected)
    info = json.loads((out / "current" / "info.json").read_text())
    for dim in info["dims"]:
        assert indexfiles.live_count(out, dim) == len(expected)


@pytest.fixture(scope="module")
def doubled_sample(tmp_path_factory, sample_corpus) -> Path:
    """The 3,000-row sample twice over (6,000 rows, fresh ids): a build that takes a few seconds."""
    table = pq.read_table(sample_corpus)
    ids = table.column("id").to_pylist()
    path = tmp_path_factory.mktemp("corpus") / "doubled.parquet"
    pq.write_table(pa.table({"id": ids + [f"copy-{i}" for i in ids],
                             "text": table.column("text").to_pylist() * 2}), path)
    return path


# -- what every mode reports ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_same_run_report_from_index_index_broker_and_jobs_run(celery_env, start_worker, sample_slice, tmp_path):
    embedctl(celery_env, "shm", "publish", "--model", "minilm")
    start_worker(EMBEDCTL_MODEL="minilm")
    common = ["--model", "minilm", "--dims", "128", "--chunk-rows", "300", "--quiet", "--json"]
    embedded = embedctl({**celery_env, "EMBEDCTL_BROKER_URL": ""}, "index", sample_slice, "--out", tmp_path / "a",
                        *common)
    distributed = embedctl(celery_env, "index", sample_slice, "--out", tmp_path / "b", *common, "--broker",
                           celery_env["EMBEDCTL_BROKER_URL"])
    spec = tmp_path / "jobs.toml"
    spec.write_text(f'[jobs.demo]\ncorpus = "{sample_slice}"\nmodel = "minilm"\ndims = [128]\nchunk_rows = 300\n'
                    f'out = "c"\n[jobs.dist]\ncorpus = "{sample_slice}"\nmodel = "minilm"\ndims = [128]\n'
                    'chunk_rows = 300\nout = "d"\n')
    named = embedctl({**celery_env, "EMBEDCTL_BROKER_URL": ""}, "jobs", "run", "demo", "--jobs", spec, "--quiet",
                     "--json")
    named_broker = embedctl(celery_env, "jobs", "run", "dist", "--jobs", spec, "--quiet", "--json", "--broker",
                            celery_env["EMBEDCTL_BROKER_URL"])
    reports = {}
    for name, result in (("index", embedded), ("index --broker", distributed), ("jobs run", named),
                         ("jobs run --broker", named_broker)):
        assert result.returncode == 0, (name, result.stderr)
        reports[name] = json.loads(result.stdout)
    for name, report in reports.items():
        assert list(report) == field_names(), name
        assert report["status"] == "published" and report["rows_indexed"] == report["rows_embedded"] == 600, name
        assert report["chunks_embedded"] == 2 and report["chunks_done_before"] == 0, name
        assert report["embed_seconds"] > 0 and report["rows_per_second"] > 0, name
    assert [r["mode"] for r in reports.values()] == ["embedded", "celery", "embedded", "celery"]
    assert reports["jobs run"]["job"] == "demo" and reports["index"]["job"] is None
    # the run history records the same report (less the skipped rows)
    history = [json.loads(line) for line in (tmp_path / "d" / "runs.jsonl").read_text().splitlines()]
    assert history[-1]["run_id"] == reports["jobs run --broker"]["run_id"]
    assert set(history[-1]) == set(field_names()) - {"skipped"} | {"at"}


# -- one writer per output folder -------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_runs_of_different_corpora_on_one_out(celery_env, start_worker, sample_corpus, doubled_sample, tmp_path):
    embedctl(celery_env, "shm", "publish", "--model", "minilm")
    start_worker(EMBEDCTL_MODEL="minilm")
    out = tmp_path / "shared-out"
    args = ["--out", out, "--model", "minilm", "--dims", "128", "--chunk-rows", "500", "--quiet"]
    first = subprocess.Popen([EMBEDCTL, "index", str(doubled_sample), *map(str, args), "--json", "--broker",
                              celery_env["EMBEDCTL_BROKER_URL"]], env=celery_env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: list(out.glob("work/*/chunks/chunk-*.npy")), 120, "the first run's first chunk")
    # a second distributed run and an embedded run of another corpus: both refused in one line, nothing touched
    second = embedctl(celery_env, "index", sample_corpus, *args, "--broker", celery_env["EMBEDCTL_BROKER_URL"])
    line = _one_line_error(second)
    assert "is being written by run" in line and "(celery)" in line and "embedctl status" in line
    embedded = embedctl({**celery_env, "EMBEDCTL_BROKER_URL": ""}, "index", sample_corpus, *args)
    assert "is being written by run" in _one_line_error(embedded)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert json.loads(stdout)["status"] == "published"
    _assert_every_id_once(out, doubled_sample)
    assert len(list((out / "work").iterdir())) == 1  # the refused runs left no work folder
    # once the first run ended, the other corpus runs and publishes; the first version stays (retention: 3)
    again = embedctl(celery_env, "index", sample_corpus, *args, "--broker", celery_env["EMBEDCTL_BROKER_URL"])
    assert again.returncode == 0, again.stderr
    assert "published v000002" in again.stdout
    _assert_every_id_once(out, sample_corpus)
    assert len(versions.live_ids(out / "versions" / "v000001")) == 6000


def test_a_spec_file_with_two_jobs_on_one_out_is_refused(tmp_path, sample_slice):
    spec = tmp_path / "jobs.toml"
    spec.write_text(f'[jobs.a]\ncorpus = "{sample_slice}"\nout = "same"\n[jobs.b]\ncorpus = "{sample_slice}"\n'
                    'out = "same"\n')
    result = subprocess.run([EMBEDCTL, "jobs", "list", "--jobs", str(spec)], capture_output=True, text=True)
    line = _one_line_error(result)
    assert "jobs.b: out" in line and "also the output folder of jobs.a" in line


def test_build_folders_of_dead_runs_are_removed_by_the_next_run(tmp_path, sample_slice):
    out = tmp_path / "o"
    dead = out / "versions" / ".build-dead1234"
    dead.mkdir(parents=True)
    (dead / "index-128.faiss.tmp").write_bytes(b"half a file")
    old = time.time() - 3600
    for path in (dead / "index-128.faiss.tmp", dead):
        os.utime(path, (old, old))
    result = subprocess.run([EMBEDCTL, "index", str(sample_slice), "--out", str(out), "--model", "minilm", "--dims",
                             "128", "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not dead.exists() and sorted(p.name for p in (out / "versions").iterdir()) == ["v000001"]


# -- runs that die ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_both_pool_children_killed_during_the_build_then_it_publishes(celery_env, start_worker, doubled_sample,
                                                                      tmp_path):
    env = {**celery_env, "EMBEDCTL_LEASE_SECONDS": "4"}  # a dead build's lease lapses in 4 s
    embedctl(env, "shm", "publish", "--model", "minilm")
    worker = start_worker(EMBEDCTL_MODEL="minilm", EMBEDCTL_LEASE_SECONDS="4")
    out = tmp_path / "o"
    follower = subprocess.Popen([EMBEDCTL, "index", str(doubled_sample), "--out", str(out), "--model", "minilm",
                                 "--chunk-rows", "1500", "--segment-rows", "3000", "--ef-construction", "400",
                                 "--quiet", "--json",
                                 "--broker", env["EMBEDCTL_BROKER_URL"]], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: any(out.glob("work/*/running/piece-*.json")), 300, "a segment build to start")
    children = worker.children()
    assert len(children) == 2
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    stdout, stderr = follower.communicate(timeout=300)
    assert follower.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["status"] == "published" and report["version"] == "v000001"
    _assert_every_id_once(out, doubled_sample)
    log = worker.text()
    assert "WorkerLostError" in log and "embedctl.build_segment" in log


@pytest.mark.slow
def test_main_process_killed_then_a_new_worker_finishes_the_job(celery_env, start_worker, sample_corpus, tmp_path):
    env = {**celery_env, "EMBEDCTL_STALL_SECONDS": "8", "EMBEDCTL_LEASE_SECONDS": "6"}  # default visibility: 6 h
    embedctl(env, "shm", "publish", "--model", "minilm")
    worker = start_worker(EMBEDCTL_MODEL="minilm", EMBEDCTL_LEASE_SECONDS="6")
    out = tmp_path / "o"
    t0 = time.monotonic()
    follower = subprocess.Popen([EMBEDCTL, "index", str(sample_corpus), "--out", str(out), "--model", "minilm",
                                 "--chunk-rows", "100", "--dims", "128", "--json", "--broker",
                                 env["EMBEDCTL_BROKER_URL"]], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    wait_until(lambda: len(list(out.glob("work/*/chunks/chunk-*.npy"))) >= 3, 120, "three chunks")
    os.kill(worker.proc.pid, signal.SIGKILL)  # the main process only: its chunks stay unacknowledged in Redis
    for pid in worker.children():
        os.kill(pid, signal.SIGKILL)  # orphaned pool children would finish their chunk: kill them too
    done_at_kill = len(list(out.glob("work/*/chunks/chunk-*.npy")))
    assert done_at_kill < 30
    start_worker(EMBEDCTL_MODEL="minilm", EMBEDCTL_LEASE_SECONDS="6")
    stdout, stderr = follower.communicate(timeout=300)
    assert follower.returncode == 0, stderr
    assert time.monotonic() - t0 < 240  # minutes, not the 6-hour visibility time-out
    assert "made no progress" in stderr and "re-queued" in stderr  # the follower said what it did
    report = json.loads(stdout)
    assert report["status"] == "published" and report["rows_indexed"] == 3000
    _assert_every_id_once(out, sample_corpus)


# -- workers and brokers ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_embedctl_worker_imports_nothing_from_its_working_directory(celery_env, start_worker, sample_slice,
                                                                     tmp_path):
    decoys = tmp_path / "decoys"
    marker = tmp_path / "decoy-imported"
    trap = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\nraise SystemExit('decoy imported')\n"
    for path in (decoys / "tasks.py", decoys / "pipeline" / "__init__.py", decoys / "jobs" / "__init__.py",
                 decoys / "shm_loader" / "__init__.py", decoys / "celeryconfig.py"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(trap)
    worker = start_worker(command=[EMBEDCTL, "worker", "--model", "minilm", "-c", "1", "--", "--without-gossip",
                                   "--without-mingle"], cwd=decoys)
    result = embedctl(celery_env, "index", sample_slice, "--out", tmp_path / "o", "--model", "minilm", "--dims",
                      "128", "--broker", celery_env["EMBEDCTL_BROKER_URL"], "--quiet", cwd=decoys)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("published v000001 in ")
    assert not marker.exists(), marker.read_text()
    assert "decoy" not in worker.text()


def test_a_worker_without_a_broker_refuses_to_start(celery_env, tmp_path):
    env = {k: v for k, v in celery_env.items() if k not in ("EMBEDCTL_BROKER_URL", "CELERY_BROKER_URL")}
    line = _one_line_error(embedctl(env, "worker", "--model", "minilm", timeout=120, cwd=tmp_path))
    assert "no broker is configured" in line and "EMBEDCTL_BROKER_URL" in line
    plain = subprocess.run([sys.executable, "-m", "celery", "-A", "embedctl.tasks", "worker", "--loglevel", "INFO"],
                           capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert plain.returncode == 1 and "no broker is configured" in plain.stderr, plain.stdout + plain.stderr
    assert "Traceback" not in plain.stderr


def test_celery_broker_url_sets_the_broker_and_the_results_alike(celery_env):
    from embedctl.jobs.broker import Settings, celery_config

    env = {"CELERY_BROKER_URL": celery_env["EMBEDCTL_BROKER_URL"]}
    config = celery_config(Settings.from_env(env))
    assert config["broker_url"] == config["result_backend"] == celery_env["EMBEDCTL_BROKER_URL"]
    both = Settings.from_env({**env, "EMBEDCTL_BROKER_URL": "redis://other:6379/1"})
    assert both.broker_url == "redis://other:6379/1"  # EMBEDCTL_BROKER_URL wins


@pytest.mark.slow
def test_index_broker_says_when_no_worker_consumes_a_queue(celery_env, start_worker, sample_slice, tmp_path):
    args = ["index", sample_slice, "--out", tmp_path / "o", "--model", "minilm", "--broker",
            celery_env["EMBEDCTL_BROKER_URL"]]
    t0 = time.monotonic()
    line = _one_line_error(embedctl(celery_env, *args, timeout=120))
    assert "no live worker consumes the queue embedctl.embed" in line and "embedctl worker" in line
    assert time.monotonic() - t0 < 60
    start_worker(EMBEDCTL_MODEL="minilm", queues="embedctl.embed")
    line = _one_line_error(embedctl(celery_env, *args, timeout=120))
    assert "no live worker consumes the queue embedctl.build" in line
    assert not (tmp_path / "o" / "current").exists()
    history = [json.loads(x) for x in (tmp_path / "o" / "runs.jsonl").read_text().splitlines()]
    assert [h["status"] for h in history if h["status"] != "running"] == ["failed", "failed"]


@pytest.mark.slow
def test_a_corpus_replaced_during_a_distributed_job_fails_and_the_rerun_indexes_the_new_one(
        celery_env, start_worker, sample_corpus, tmp_path):
    env = {**celery_env, "EMBEDCTL_THREADS": "1"}
    embedctl(env, "shm", "publish", "--model", "minilm")
    start_worker(EMBEDCTL_MODEL="minilm", concurrency=1)  # one chunk at a time: the swap lands mid-job
    corpus = tmp_path / "corpus.parquet"
    shutil.copy(sample_corpus, corpus)
    out = tmp_path / "o"
    args = [EMBEDCTL, "index", str(corpus), "--out", str(out), "--model", "minilm", "--chunk-rows", "100", "--dims",
            "128", "--quiet", "--broker", env["EMBEDCTL_BROKER_URL"]]
    follower = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: len(list(out.glob("work/*/chunks/chunk-*.npy"))) >= 3, 120, "three chunks")
    table = pq.read_table(sample_corpus)
    reordered = table.take(list(range(table.num_rows - 1, -1, -1)))  # same rows, same count, another order
    tmp = tmp_path / "new.parquet"
    pq.write_table(reordered, tmp)
    os.replace(tmp, corpus)
    stdout, stderr = follower.communicate(timeout=300)
    line = _one_line_error(subprocess.CompletedProcess(args, follower.returncode, stdout, stderr))
    assert f"corpus file {corpus} changed since the job was planned" in line and "run the same command again" in line
    assert not (out / "current").exists()  # nothing was published from two versions of the corpus
    again = subprocess.run(args + ["--json"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    _assert_every_id_once(out, corpus)
    rows = pa.concat_tables(pq.read_table(p) for p in indexfiles.segment_files(out, "rows.parquet")).to_pydict()
    expected = dict(zip(reordered.column("id").to_pylist(), reordered.column("text").to_pylist(), strict=True))
    assert all(expected[i] == t for i, t in zip(rows["id"], rows["text"], strict=True))
    assert rows["row"] == sorted(rows["row"]) and rows["id"][0] == reordered.column("id")[0].as_py()
