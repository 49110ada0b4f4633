"""Every command block of README.md, run exactly as printed (human output included) from a folder that is not the
repository, with a real Redis and real workers where the block needs them (`tests/readme.py` says how)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests import readme
from tests.services import ROOT

BLOCKS, UNTESTED = readme.parse()
VENV_BIN = Path(sys.executable).parent
TRAP = "open({marker!r}, 'a').write(__name__ + '\\n')\nraise SystemExit('decoy imported')\n"


def test_every_command_block_has_a_directive():
    """Every command block is named for the tests (which must then run it: `test_every_block_ran`, or the module
    that `in=` names, which needs a service of its own) or skipped with a reason."""
    assert not UNTESTED, f"README.md lines {UNTESTED}: command blocks without a readme-test directive"
    assert all(b.options["skip"].strip() for b in BLOCKS.values() if "skip" in b.options)
    elsewhere = [b for b in BLOCKS.values() if "in" in b.options]  # that module runs them and checks that it did
    assert all((ROOT / b.options["in"]).is_file() for b in elsewhere), [b.options["in"] for b in elsewhere]


def _env(home: Path, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDCTL_", "CELERY_", "VIRTUAL_ENV"))}
    shm = Path("/dev/shm") / f"embedctl-readme-{uuid.uuid4().hex[:8]}"
    shm.mkdir(mode=0o700, exist_ok=True)
    env.update(HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", EMBEDCTL_SHM_DIR=str(shm), PYTHONUNBUFFERED="1", **(extra or {}))
    return env


@pytest.fixture
def tour(tmp_path):
    """The tour's folder, made by the README's own set-up block from the repository; it also holds decoys named
    like embedctl's packages that fail when imported (a worker started there must never load them)."""
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home)
    block = BLOCKS["tour-setup"]
    result = readme.run(dataclasses.replace(block, code=block.code + "\npwd\n"), ROOT, env, timeout=60)
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert folder != ROOT and ROOT not in folder.parents and (folder / "glosses.parquet").is_file()
    marker = tmp_path / "decoy-imported"
    for path in ("tasks.py", "pipeline/__init__.py", "jobs/__init__.py", "shm_loader/__init__.py"):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(TRAP.format(marker=str(marker)))
    yield folder, env, marker
    shutil.rmtree(env["EMBEDCTL_SHM_DIR"], ignore_errors=True)
    assert not marker.exists(), f"a decoy was imported: {marker.read_text()}"


@pytest.mark.slow
def test_tour(tour):
    folder, env, _ = tour
    for name in ("tour-index", "tour-rerun", "tour-eval", "tour-funnel", "tour-verify"):
        readme.check(BLOCKS[name], folder, env)
    result = readme.check(BLOCKS["tour-errors"], folder, env)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --dims 4096 is above the model's dim 384"), result.stderr
    readme.check(BLOCKS["cache-prune"], folder, env)


@pytest.mark.slow
@pytest.mark.parametrize("worker_block", ["worker", "celery-worker"])
def test_distributed_example(worker_block, tour, redis_server, tmp_path):
    folder, env, _ = tour
    redis_server.flush()
    env = {**env, "EMBEDCTL_BROKER_URL": redis_server.url}
    worker = readme.Background(BLOCKS[worker_block], folder, env, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        readme.check(BLOCKS["distributed"], folder, env)
        readme.check(BLOCKS["detached"], folder, env)
        status = subprocess.run(["embedctl", "status", "indexes/wordnet-detached", "--json"], cwd=folder, env=env,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
    finally:
        worker.stop()
    assert "Traceback" not in worker.text()
    assert redis_server.url.split("@")[0].split(":")[-1] not in worker.text()  # the password never shows


@pytest.mark.slow
def test_scheduled_jobs(tour, redis_server, tmp_path):
    folder, env, _ = tour
    readme.write(BLOCKS["jobs-toml"], folder)
    readme.check(BLOCKS["jobs"], folder, env)
    redis_server.flush()
    beat = readme.Background(BLOCKS["beat"], folder, {**env, "EMBEDCTL_BROKER_URL": redis_server.url},
                             tmp_path / "beat.log")
    try:
        beat.wait_ready()
    finally:
        beat.stop()
    assert "Traceback" not in beat.text()


@pytest.mark.slow
def test_serving(tour, tmp_path):
    folder, env, _ = tour
    readme.check(BLOCKS["tour-index"], folder, env)
    server = readme.Background(BLOCKS["serve"], folder, env, tmp_path / "serve.log")
    try:
        server.wait_ready()
        readme.write(BLOCKS["serve-client-py"], folder)
        readme.check(BLOCKS["serve-client"], folder, env)
        readme.check(BLOCKS["serve-search"], folder, env)
    finally:
        server.stop()
    assert "Traceback" not in server.text() and "my-secret-key" not in server.text()


def test_shared_memory_commands(tour):
    folder, env, _ = tour
    readme.check(BLOCKS["shm"], folder, env)
    assert not any(Path(env["EMBEDCTL_SHM_DIR"]).iterdir())  # released


@pytest.mark.slow
def test_quick_start_on_a_fresh_clone(tmp_path):
    """The first command of the README on a copy of the repository without its .venv: set-up from scratch."""
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    assert not (clone / ".venv").exists()
    env = _env(Path.home())  # the user's pip cache: a fresh clone, not a fresh download of every wheel
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != VENV_BIN)
    try:
        readme.check(BLOCKS["quickstart"], clone, env, timeout=1500)
    finally:
        shutil.rmtree(env["EMBEDCTL_SHM_DIR"], ignore_errors=True)
    assert (clone / ".venv" / "bin" / "embedctl").exists()


def _cases(module: dict) -> Counter:
    """Test name -> how many cases it has (its parametrizations multiplied)."""
    cases = Counter()
    for name, test in module.items():
        if name.startswith("test_") and callable(test):
            cases[name] = 1
            for mark in getattr(test, "pytestmark", []):
                if mark.name == "parametrize":
                    cases[name] *= len(mark.args[1])
    return cases


@pytest.mark.slow
def test_every_block_ran(request):
    """Last of the module: every block with a readme-test id and no skip= was run, started or written by the tests
    above, as they ran it (`readme.EXECUTED`). Only when every case of this module was selected."""
    here = [item for item in request.session.items if item.path == request.node.path]
    if Counter(item.originalname for item in here) != _cases(globals()) or here[-1] is not request.node:
        pytest.skip("checks the blocks that the other tests of this module ran: select them all")
    unrun = sorted(i for i, b in BLOCKS.items() if "skip" not in b.options and "in" not in b.options
                   and i not in readme.EXECUTED)
    assert not unrun, f"README blocks that no test ran: {[f'{i} (README.md:{BLOCKS[i].line})' for i in unrun]}"
