"""Scheduled re-indexing: job specs, change detection, incremental embedding, locks, retention, atomic swap."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedctl.jobs.history import history
from embedctl.jobs.locks import FileLease, holder_record
from embedctl.jobs.runner import run_named
from embedctl.jobs.schedule import beat_schedule
from embedctl.jobs.specfile import SpecFileError, load_jobs
from embedctl.pipeline.errors import ConfigError
from tests import indexfiles
from tests.services import wait_until as _wait

ROOT = Path(__file__).resolve().parent.parent
EMBEDCTL = str(Path(sys.executable).parent / "embedctl")
WORDS = ["dog", "cat", "house", "tree", "river", "stone", "light", "water", "fire", "city", "music", "paper"]


def _texts(n: int, salt: str = "") -> list[str]:
    return [" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(3 + i % 5)) + f" {salt}{i}" for i in range(n)]


def _write(path: Path, ids: list[str], texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "text": texts}), path)


def _spec_file(tmp_path: Path, model: str, schedule: str = "15m", keep: int = 3, extra: str = "") -> Path:
    path = tmp_path / "jobs.toml"
    path.write_text(f'''root = "indexes"
[jobs.docs]
corpus = "data/*.parquet"
model = "{model}"
dims = [32]
schedule = "{schedule}"
keep = {keep}
chunk_rows = 40
hnsw = {{ m = 16, ef_construction = 80 }}
{extra}''')
    return path


def _run(job) -> dict:
    return run_named(job).to_dict()


@pytest.fixture
def corpus(tmp_path):
    ids, texts = [f"d{i}" for i in range(100)], _texts(100)
    _write(tmp_path / "data" / "part-0.parquet", ids, texts)
    return ids, texts


def test_spec_file_resolves_paths_and_builds_the_beat_schedule(tmp_path, corpus, tiny_qwen3):
    path = _spec_file(tmp_path, str(tiny_qwen3), extra='[jobs.nightly]\ncorpus = "data"\nmodel = "minilm"\n'
                                                       'schedule = "0 3 * * *"\n[jobs.manual]\ncorpus = "data"\n')
    jobs = load_jobs(path)
    docs = jobs["docs"]
    assert docs.spec.out == str((tmp_path / "indexes" / "docs").resolve())
    assert docs.spec.corpus == str(tmp_path / "data/*.parquet")
    assert (docs.spec.hnsw_m, docs.spec.ef_construction, docs.spec.keep, docs.spec.dims) == (16, 80, 3, (32,))
    schedule = beat_schedule(jobs, "embedctl.build")
    assert set(schedule) == {"embedctl:docs", "embedctl:nightly"}  # a job without schedule runs only by hand
    assert schedule["embedctl:docs"]["schedule"] == timedelta(minutes=15)
    assert schedule["embedctl:docs"]["task"] == "embedctl.run_job" and schedule["embedctl:docs"]["args"] == ("docs",)
    nightly = schedule["embedctl:nightly"]["schedule"]
    assert nightly.hour == {3} and nightly.minute == {0}


def test_celery_app_reads_the_schedule_from_embedctl_jobs(tmp_path, corpus, tiny_qwen3):
    from embedctl.jobs.broker import Settings
    from embedctl.tasks.app import create_app

    app = create_app(Settings(jobs_path=str(_spec_file(tmp_path, str(tiny_qwen3), schedule="30s"))))
    assert app.conf.beat_schedule["embedctl:docs"]["schedule"] == timedelta(seconds=30)


def test_every_spec_error_is_one_line(tmp_path, corpus):
    path = tmp_path / "jobs.toml"
    path.write_text('''[jobs.bad]
corpus = "missing/*.parquet"
out = "../../elsewhere"
schedule = "61 * * * *"
colour = "blue"
[jobs."../up"]
corpus = "data"
[jobs.interval]
corpus = "data"
schedule = "every day"
''')
    with pytest.raises(SpecFileError) as info:
        load_jobs(path)
    text = "\n".join(info.value.errors)
    assert "unknown key 'colour'" in text and "61 * * * *" in text and "outside the output root" in text
    assert "no files match" in text and "no path separators" in text and "neither a crontab line" in text
    assert len(info.value.errors) == 6 and all("\n" not in e for e in info.value.errors)
    result = subprocess.run([EMBEDCTL, "jobs", "list", "--jobs", str(path)], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("Error: ") == 6 and "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match="does not exist"):
        load_jobs(tmp_path / "none.toml")


def test_incremental_runs_embed_only_changed_rows(tmp_path, corpus, tiny_qwen3):
    ids, texts = corpus
    job = load_jobs(_spec_file(tmp_path, str(tiny_qwen3)))["docs"]
    first = _run(job)
    assert first["status"] == "published" and first["rows_embedded"] == 100 and first["rows_reused"] == 0
    second = _run(job)
    assert second["status"] == "up-to-date" and second["rows_embedded"] == 0 and second["version"] == "v000001"
    # change 10 rows, add 5, delete 3
    new_texts = list(texts)
    for i in range(10, 20):
        new_texts[i] = f"changed text {i} about rivers and stone"
    new_ids = ids + [f"new{i}" for i in range(5)]
    new_texts += [f"added text {i} about music and paper" for i in range(5)]
    keep_rows = [i for i in range(len(new_ids)) if i not in (50, 60, 70)]
    _write(tmp_path / "data" / "part-0.parquet", [new_ids[i] for i in keep_rows], [new_texts[i] for i in keep_rows])
    third = _run(job)
    assert third["status"] == "published" and third["version"] == "v000002"
    assert third["rows_embedded"] == 15 and third["rows_reused"] == 87 and third["rows_deleted"] == 3
    current = Path(job.spec.out) / "current"
    indexed = indexfiles.live_ids(Path(job.spec.out))
    assert sorted(indexed) == sorted(new_ids[i] for i in keep_rows)
    assert not {"d50", "d60", "d70"} & set(indexed)
    assert indexfiles.live_count(Path(job.spec.out), 64) == 102
    assert len(json.loads((current / "info.json").read_text())["segments"]) == 2  # the first one kept
    runs = history(job.spec.out)
    assert [r["status"] for r in runs] == ["published", "up-to-date", "published"]
    status = subprocess.run([EMBEDCTL, "jobs", "status", "docs", "--jobs", str(tmp_path / "jobs.toml"), "--json"],
                            capture_output=True, text=True)
    listed = json.loads(status.stdout)
    assert [r["rows_embedded"] for r in listed] == [15, 0, 100]
    assert set(listed[0]) >= {"started", "status", "rows_embedded", "rows_reused", "rows_deleted", "seconds",
                              "version"}


def test_cached_vectors_equal_fresh_ones(tmp_path, corpus, tiny_qwen3):
    import numpy as np

    ids, texts = corpus
    job = load_jobs(_spec_file(tmp_path, str(tiny_qwen3)))["docs"]
    _run(job)
    _write(tmp_path / "data" / "part-0.parquet", ids[::-1], texts[::-1])  # same rows, new order: all reused
    again = _run(job)
    assert again["rows_embedded"] == 0 and again["rows_reused"] == 100
    (tmp_path / "fresh").mkdir()
    _write(tmp_path / "fresh" / "data" / "part-0.parquet", ids[::-1], texts[::-1])
    fresh_job = load_jobs(_spec_file(tmp_path / "fresh", str(tiny_qwen3)))
    _run(fresh_job["docs"])

    def vectors(out):  # the published plan's chunks, in order (a re-index's are overlays: read through the store)
        from embedctl.pipeline.manifest import read_info
        from embedctl.pipeline.plan import load_plan

        plan = load_plan(Path(out) / "work" / read_info((Path(out) / "current").resolve()).plan_id)
        return np.concatenate([plan.store.read_vectors(c.number) for c in plan.corpus.chunks])

    # Same row, same vector: fresh runs batch the texts with other neighbours (chunks are row ranges), so the
    # float32 sums round differently before the float16 store; a vector given to the wrong row would be far off.
    cached, fresh = vectors(job.spec.out).astype(np.float32), vectors(fresh_job["docs"].spec.out).astype(np.float32)
    assert np.abs(cached - fresh).max() <= 1e-4
    cos = (cached * fresh).sum(1) / np.linalg.norm(cached, axis=1) / np.linalg.norm(fresh, axis=1)
    assert cos.min() >= 0.9999


def test_overlapping_run_is_recorded_as_skipped(tmp_path, corpus, tiny_qwen3):
    job = load_jobs(_spec_file(tmp_path, str(tiny_qwen3)))["docs"]
    other = FileLease(job.spec.out, json.dumps(holder_record("otherrun1234", "embedded", "docs")))
    assert other.acquire()  # another run holds the job
    try:
        skipped = _run(job)
    finally:
        other.release()
    assert skipped["status"] == "skipped" and "being written by run otherrun1234" in skipped["reason"]
    assert _run(job)["status"] == "published"
    assert [r["status"] for r in history(job.spec.out)] == ["published", "skipped"]


def test_retention_keeps_the_newest_versions(tmp_path, corpus, tiny_qwen3):
    ids, texts = corpus
    job = load_jobs(_spec_file(tmp_path, str(tiny_qwen3), keep=2))["docs"]
    for n in range(4):
        _write(tmp_path / "data" / "part-0.parquet", ids, texts[:-1] + [f"last text version {n}"])
        assert _run(job)["status"] == "published"
    versions = sorted(p.name for p in (Path(job.spec.out) / "versions").iterdir())
    assert versions == ["v000003", "v000004"]
    assert (Path(job.spec.out) / "current").resolve().name == "v000004"
    # vectors of superseded plans are pruned, but those the current plan's overlay chunks point at (the unchanged
    # rows' vectors, stored by the first run)
    from embedctl.pipeline.manifest import read_info
    from embedctl.pipeline.plan import work_in_use
    from embedctl.pipeline.storage import LocalStorage

    out = Path(job.spec.out)
    kept = {p.name for p in (out / "work").iterdir()}
    assert len(kept) == 2 and kept == work_in_use(LocalStorage(out), [read_info((out / "current").resolve()).plan_id])


def test_cache_prune(tmp_path, corpus, tiny_qwen3):
    from click.testing import CliRunner

    from embedctl.cli import main

    ids, texts = corpus
    job = load_jobs(_spec_file(tmp_path, str(tiny_qwen3)))["docs"]
    _run(job)
    stale = Path(job.spec.out) / "work" / "0123456789ab"
    (stale / "chunks").mkdir(parents=True)
    (stale / "chunks" / "chunk-000000.npy").write_bytes(b"x" * 1000)
    import os

    os.utime(stale / "chunks" / "chunk-000000.npy", (time.time() - 7200, time.time() - 7200))
    result = CliRunner().invoke(main, ["cache", "prune", job.spec.out, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["removed"] == ["0123456789ab"]
    result = CliRunner().invoke(main, ["cache", "prune", job.spec.out, "--all", "--json"])
    assert len(json.loads(result.stdout)["removed"]) == 1
    assert CliRunner().invoke(main, ["info", job.spec.out]).exit_code == 0  # still servable
    _write(tmp_path / "data" / "part-0.parquet", ids, texts[:-1] + ["a new last text"])
    assert _run(job)["rows_embedded"] == 100  # nothing cached any more


@pytest.mark.slow
def test_queries_never_fail_while_reindexing(tmp_path, corpus, tiny_qwen3):
    ids, texts = corpus
    job = load_jobs(_spec_file(tmp_path, str(tiny_qwen3), keep=2))["docs"]
    _run(job)
    loop = f"""
import sys, time, json
import numpy as np, faiss
from embedctl.pipeline.index import IndexReader
rng = np.random.default_rng(0)
ok = bad = 0
errors = []
versions = set()
deadline = time.time() + 600
while time.time() < deadline:
    try:
        reader = IndexReader({job.spec.out!r})
        q = rng.normal(size=(1, 64)).astype(np.float32); q /= np.linalg.norm(q)
        for dim in reader.dims:
            hits = reader.search(q, k=5, dim=dim)[0]
            assert len(hits) == 5 and all(h.id for h in hits)
            reader.load(dim)
        versions.add(reader.dir.name)
        ok += 1
    except Exception as exc:
        bad += 1
        errors.append(repr(exc))
    if __import__("os").path.exists({str(tmp_path / "stop")!r}):
        break
print(json.dumps({{"ok": ok, "bad": bad, "errors": errors[:3], "versions": sorted(versions)}}))
"""
    reader = subprocess.Popen([sys.executable, "-c", loop], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for n in range(5):
            _write(tmp_path / "data" / "part-0.parquet", ids, [t if i % 7 else f"{t} v{n}" for i, t in enumerate(texts)])
            assert _run(job)["status"] == "published"
    finally:
        (tmp_path / "stop").touch()
    out, err = reader.communicate(timeout=120)
    result = json.loads(out)
    assert result["bad"] == 0, result["errors"]
    assert result["ok"] > 20 and len(result["versions"]) >= 2, result


@pytest.mark.slow
def test_celery_beat_runs_the_job_then_finds_it_unchanged(tmp_path, corpus, tiny_qwen3, celery_env, start_worker):
    spec = _spec_file(tmp_path, str(tiny_qwen3), schedule="4s")
    env = {**celery_env, "EMBEDCTL_JOBS": str(spec)}
    out = Path(load_jobs(spec)["docs"].spec.out)
    start_worker(EMBEDCTL_JOBS=str(spec))
    with open(tmp_path / "beat.log", "wb") as log:
        beat = subprocess.Popen([sys.executable, "-m", "celery", "-A", "embedctl.tasks", "beat", "--loglevel", "INFO",
                                 "--schedule", str(tmp_path / "beat-schedule"), "--max-interval", "1"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: (out / "current").exists(), 180, "beat's first run to publish")
        _wait(lambda: any(r["status"] == "up-to-date" for r in history(out)), 60, "a second, unchanged run")
    finally:
        beat.terminate()
        beat.wait(timeout=30)
    runs = history(out)
    published = [r for r in runs if r["status"] == "published"]
    assert len(published) == 1 and published[0]["rows_embedded"] == 100 and published[0]["mode"] == "celery"
    unchanged = [r for r in runs if r["status"] == "up-to-date"]
    assert all(r["rows_embedded"] == 0 for r in unchanged)
    assert "embedctl:docs" in (tmp_path / "beat.log").read_text()


@pytest.mark.slow
def test_overlapping_celery_runs_one_runs_one_is_skipped(tmp_path, corpus, tiny_qwen3, celery_env, start_worker):
    """A run that finds the output folder held by a run in progress is recorded as skipped, naming that run. The
    first run is queued before any worker starts, so it is still in progress when the second begins, however fast
    the machine."""
    spec = _spec_file(tmp_path, str(tiny_qwen3))
    out = Path(load_jobs(spec)["docs"].spec.out)
    env = {**celery_env, "EMBEDCTL_JOBS": str(spec)}

    def jobs_run(*options: str) -> dict:
        result = subprocess.run([EMBEDCTL, "jobs", "run", "docs", "--json", "--quiet", "--broker",
                                 env["EMBEDCTL_BROKER_URL"], *options], env=env, cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    first = jobs_run("--detach")  # queued: it holds the folder until a worker publishes it
    assert first["status"] == "submitted", first
    second = jobs_run()
    assert second["status"] == "skipped" and f"run {first['run_id']} (celery, job docs)" in second["reason"], second
    start_worker(EMBEDCTL_JOBS=str(spec))
    _wait(lambda: any(r["status"] == "published" for r in history(out)), 180, "the first run to publish")
    assert {r["run_id"]: r["status"] for r in history(out)} == {first["run_id"]: "published",
                                                                 second["run_id"]: "skipped"}
    assert jobs_run()["status"] == "up-to-date"  # the lock was released after the publish


def test_a_spec_file_may_put_its_outputs_under_a_bucket_prefix(tmp_path, sample_corpus):
    """`root` and `out` may be s3:// URIs (checked as text: nothing is asked of a store); an `out` outside a URI root,
    or a URI under a local root, is refused like a path outside the root."""
    path = tmp_path / "jobs.toml"
    path.write_text(f'''root = "s3://bucket/indexes/"
[jobs.default]
corpus = "{sample_corpus}"
[jobs.named]
corpus = "{sample_corpus}"
out = "s3://bucket/indexes/named/v2"
''')
    jobs = load_jobs(path)
    assert jobs["default"].spec.out == "s3://bucket/indexes/default"
    assert jobs["named"].spec.out == "s3://bucket/indexes/named/v2"
    for root, out in (('"s3://bucket/indexes"', '"s3://bucket/indexes-other/x"'), ('"out"', '"s3://bucket/x"'),
                      ('"s3://bucket/indexes"', '"local/x"')):
        path.write_text(f'root = {root}\n[jobs.j]\ncorpus = "{sample_corpus}"\nout = {out}\n')
        with pytest.raises(SpecFileError) as info:
            load_jobs(path)
        assert "outside the output root" in info.value.errors[0]
