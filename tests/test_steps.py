"""The worker side of a run as a state machine, without Celery: each step (`jobs.steps`) joined to a run that
`lifecycle.begin` started, on a real Redis for the leases, called in this process. A run that is gone answers
`superseded`; a failing step is recorded and fails the run; a run that lost its lease beats in vain and does not
publish. And an embedded run never imports the broker module."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedctl.jobs import lifecycle, locks, state, steps
from embedctl.jobs.broker import Settings, redis_client
from embedctl.jobs.report import read_report
from embedctl.jobs.spec import JobSpec
from embedctl.pipeline import versions
from embedctl.pipeline.cache import EmbeddingCache
from embedctl.pipeline.errors import ModelError, WeightsLost
from embedctl.pipeline.plan import plan_job


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(24)],
                             "text": [f"text number {i} about dogs and cats" for i in range(24)]}), path)
    return path


def _spec(corpus: Path, tmp_path: Path) -> JobSpec:
    return JobSpec(corpus=str(corpus), out=str(tmp_path / "out"), model="minilm", chunk_rows=12, dims=(128,))


def _settings(redis_server, lease_seconds: int = 120) -> Settings:
    redis_server.flush()
    return Settings(broker_url=redis_server.url, lease_seconds=lease_seconds)


def _no_cache(plan):
    return EmbeddingCache([])


def _take_the_lease(run: lifecycle.Run, settings: Settings) -> None:
    """What a newer run does once the run's lease lapsed: the output folder's lease is its now."""
    redis_client(settings).set(locks.out_key(run.plan.out), json.dumps(locks.holder_record("newer0000001", "celery")))


def test_a_step_of_a_run_that_is_gone_answers_superseded_and_does_nothing(corpus, tmp_path, redis_server):
    plan = plan_job(_spec(corpus, tmp_path))
    plan.save()  # a work folder that no run owns (its run was replaced, or never recorded)
    settings = _settings(redis_server)

    def no_encoder(plan):
        raise AssertionError("a superseded step must not load a model")

    assert steps.run_chunk(plan.work_dir, 0, no_encoder, _no_cache, settings) == {"chunk": 0, "status": "superseded"}
    assert steps.run_build(plan.work_dir, settings) == {"status": "superseded"}
    assert steps.run_piece(plan.work_dir, "nokey", "s1", 128, settings) == {"status": "superseded"}
    assert steps.run_publish(plan.work_dir, "nokey", settings) == {"status": "superseded"}
    assert not plan.store.complete() and state.heartbeat_age(plan, "chunk-000000") is None
    assert state.failures(plan) == [] and read_report(plan.work_dir) is None


def test_a_failing_step_is_recorded_as_failed_and_ends_the_run(corpus, tmp_path, redis_server):
    settings = _settings(redis_server)
    run = lifecycle.begin(_spec(corpus, tmp_path), "celery", settings)
    plan = run.plan

    def lost(plan):
        raise WeightsLost("the exporter exited")

    with pytest.raises(WeightsLost):  # not a failure: the task retries the chunk
        steps.run_chunk(plan.work_dir, 0, lost, _no_cache, settings)
    assert state.failures(plan) == [] and read_report(plan.work_dir) is None

    def broken(plan):
        raise ModelError("no weights at /nowhere")

    with pytest.raises(ModelError):
        steps.run_chunk(plan.work_dir, 1, broken, _no_cache, settings)
    [failure] = state.failures(plan)
    assert failure["what"] == "chunk-000001" and failure["error"] == "chunk 1: no weights at /nowhere"
    report = read_report(plan.work_dir)
    assert report.status == "failed" and report.run_id == run.run_id and report.error == failure["error"]
    assert state.heartbeat_age(plan, "chunk-000001") is None  # the heartbeat ended with the step
    assert lifecycle.Run.load(plan.work_dir, settings).ended
    assert locks.RedisLease(settings, locks.out_key(plan.out), "{}").holder() is None  # the lease was given up
    # the ended run's build step does nothing
    assert steps.run_build(plan.work_dir, settings) == {"status": "ended"}


def test_a_build_step_waits_while_another_holds_the_build_lease(corpus, tmp_path, redis_server):
    settings = _settings(redis_server, lease_seconds=30)
    run = lifecycle.begin(_spec(corpus, tmp_path), "celery", settings)
    other = locks.RedisLease(settings, locks.build_key(run.plan.out, run.plan.plan_id), "{}")
    assert other.acquire()
    assert steps.run_build(run.plan.work_dir, settings) == {"status": "busy", "retry_in": 10.0}
    assert state.heartbeat_age(run.plan, "build") is None
    other.release()
    lifecycle.fail(run, "done with the test")


def test_a_run_that_lost_its_lease_beats_in_vain_and_does_not_publish(corpus, tmp_path, redis_server, caplog):
    from embedctl.pipeline.work import EncoderOnDemand

    settings = _settings(redis_server, lease_seconds=1)  # a beat every third of a second
    run = lifecycle.begin(_spec(corpus, tmp_path), "celery", settings)
    plan = run.plan
    encoder = EncoderOnDemand(plan)()
    for number in range(len(plan.corpus.chunks)):
        done = steps.run_chunk(plan.work_dir, number, lambda plan: encoder, _no_cache, settings)
        assert done["rows"] == 12 and done["build_due"] == (number == len(plan.corpus.chunks) - 1)
    planned = steps.run_build(plan.work_dir, settings)
    assert planned["status"] == "building" and {d for _s, d in planned["pieces"]} == {384, 128}
    _take_the_lease(run, settings)
    with caplog.at_level("WARNING", logger="embedctl.jobs.locks"), \
            steps.step(plan.work_dir, settings, "piece-x", "a slow piece") as s:
        assert s.answer is None
        time.sleep(1.0)  # the beats find the lease taken
    assert any("lost to another holder" in r.getMessage() for r in caplog.records)
    for segment, dim in planned["pieces"]:  # the pieces are built (immutable, harmless) ...
        built = steps.run_piece(plan.work_dir, planned["key"], segment, dim, settings)
        assert built["status"] == "built"
    assert built["publish_due"]
    # ... but the swap is refused: the run ends as failed, the folder keeps no version
    assert steps.run_publish(plan.work_dir, planned["key"], settings) == {"status": "superseded"}
    assert versions.current_version(plan.out) is None and not versions.version_dirs(plan.out)
    report = read_report(plan.work_dir)
    assert report.status == "failed" and "lost" in report.error and "does not publish" in report.error
    assert state.heartbeat_age(plan, "publish") is None
    assert locks.RedisLease(settings, locks.build_key(plan.out, plan.plan_id), "{}").holder() is None


def test_an_embedded_run_imports_no_broker_module(sample_slice, tmp_path):
    out = tmp_path / "idx"
    result = subprocess.run([sys.executable, "-X", "importtime", "-c",
                             "import sys; from embedctl.cli import main; sys.argv[0] = 'embedctl'; main()", "index",
                             str(sample_slice), "--out", str(out), "--model", "minilm", "--dims", "128", "--quiet"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "embedctl.jobs.lifecycle" in imported and "embedctl.pipeline.build" in imported
    assert not {m for m in imported if m == "embedctl.jobs.broker" or m.split(".")[0] in ("celery", "kombu", "redis")}
