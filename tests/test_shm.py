"""Shared-memory weights with real processes (fresh interpreters): publish once, attach zero-copy everywhere."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from embedctl.cli import main
from embedctl.pipeline.encoder import load_encoder
from embedctl.pipeline.models import ModelRef
from embedctl.shm_loader.errors import SegmentError
from embedctl.shm_loader.segment import attach, list_segments, publish, release, segment_name
from tests.services import mount_tmpfs
from tests.shm_worker import TEXTS

ROOT = Path(__file__).resolve().parent.parent
EMBEDCTL = str(Path(sys.executable).parent / "embedctl")


@pytest.fixture
def shm_dir(monkeypatch):
    """A private folder in /dev/shm (real POSIX shared memory) so tests never touch a user's segments."""
    path = Path("/dev/shm") / f"embedctl-test-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("EMBEDCTL_SHM_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _worker(folder, mode, out, then="exit", dtype="fp32", **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.shm_worker", str(folder), dtype, mode, str(out), then],
                            cwd=ROOT, env=dict(os.environ), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.parametrize("model", ["tiny_qwen3", "minilm_path"])
def test_publisher_exits_and_two_attachers_embed_exactly_like_a_normal_load(request, model, shm_dir, tmp_path):
    folder = request.getfixturevalue(model)
    if model == "tiny_qwen3":
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"  # bf16 checkpoint
    publisher = subprocess.run([EMBEDCTL, "shm", "publish", "--model", str(folder), "--dtype", "fp32", "--json"],
                               capture_output=True, text=True, timeout=120)
    assert publisher.returncode == 0, publisher.stderr
    name = json.loads(publisher.stdout)["name"]
    segment = shm_dir / name
    assert segment.exists()  # outlives its publisher
    assert stat.S_IMODE(segment.stat().st_mode) == 0o600
    procs = [_worker(folder, "require", tmp_path / f"w{i}.npy") for i in range(2)]
    procs.append(_worker(folder, "off", tmp_path / "loaded.npy"))  # the reference: a fresh process that loads
    results = [_finish(p) for p in procs]
    assert all(code == 0 for code, _, _ in results), results
    # in a process like the attachers (this one's thread pools may have been changed by other tests)
    reference = np.load(tmp_path / "loaded.npy")
    assert json.loads((tmp_path / "loaded.npy.json").read_text())["source"] == "disk"
    for i in range(2):
        report = json.loads((tmp_path / f"w{i}.npy.json").read_text())
        assert report["source"] == f"shm:{name}" and report["mapped"]
        assert np.abs(np.load(tmp_path / f"w{i}.npy") - reference).max() == 0.0
    assert segment.exists()  # children that exit leave it in place
    assert release([name]) == [name]
    assert not segment.exists()


def test_attached_weights_are_views_of_the_mapping(tiny_qwen3, shm_dir):
    publish(tiny_qwen3, torch.float32)
    encoder = load_encoder(ModelRef("m", tiny_qwen3), device="cpu", dtype="fp32", shm="require")
    attached = encoder.loaded.segment
    base = np.frombuffer(attached.mapping, dtype=np.uint8).ctypes.data
    size = len(attached.mapping)
    for name, param in encoder.model.named_parameters():
        assert base <= param.data_ptr() < base + size, name
    assert not any(p.is_meta for p in encoder.model.parameters())
    assert not any(b.is_meta for b in encoder.model.buffers())


def test_a_write_into_shared_weights_kills_only_the_writer(tiny_qwen3, shm_dir, tmp_path):
    publish(tiny_qwen3, torch.float32)
    code, out, err = _finish(_worker(tiny_qwen3, "require", tmp_path / "w.npy", then="write"))
    assert code in (-signal.SIGSEGV, -signal.SIGBUS), (code, out, err)
    assert "wrote into shared weights" not in out
    reference = load_encoder(ModelRef("m", tiny_qwen3), device="cpu", shm="off").encode(TEXTS).vectors
    again = load_encoder(ModelRef("m", tiny_qwen3), device="cpu", shm="require").encode(TEXTS).vectors
    assert np.abs(again - reference).max() == 0.0  # the weights were not corrupted


def test_changed_model_folder_is_refused(tiny_qwen3, shm_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_qwen3, folder)
    publish(folder, torch.float32)
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"rms_norm_eps" '))
    with pytest.raises(SegmentError, match="model files changed since") as info:
        attach(folder, torch.float32)
    assert "\n" not in str(info.value) and "embedctl shm publish" in str(info.value)
    result = CliRunner().invoke(main, ["shm", "status", "--json"])
    assert json.loads(result.stdout)[0]["state"] == "stale"
    proc = _worker(folder, "auto", tmp_path / "w.npy")
    code, _, err = _finish(proc)
    assert code != 0 and "model files changed since" in err  # never a silent use of the wrong weights
    again = publish(folder, torch.float32)  # publishing again replaces the stale segment
    assert again["published"] and attach(folder, torch.float32) is not None


def test_wrong_dtype_or_format_is_refused(tiny_qwen3, shm_dir):
    publish(tiny_qwen3, torch.float32)
    path = shm_dir / segment_name(tiny_qwen3, torch.float32)
    os.rename(path, shm_dir / segment_name(tiny_qwen3, torch.bfloat16))
    with pytest.raises(SegmentError, match="holds float32 weights, bfloat16 were asked for"):
        attach(tiny_qwen3, torch.bfloat16)


def test_too_small_shm_gives_one_line_with_the_remedy(minilm_path, tmp_path, monkeypatch):
    small = tmp_path / "small-shm"
    if not mount_tmpfs(small, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the size check is the same code either way")
    try:
        monkeypatch.setenv("EMBEDCTL_SHM_DIR", str(small))
        result = subprocess.run([EMBEDCTL, "shm", "publish", "--model", "minilm", "--dtype", "fp32"],
                                capture_output=True, text=True, timeout=120, env=dict(os.environ))
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "need" in lines[0] and "mount -o remount,size=" in lines[0] and "--shm-size=" in lines[0]
        assert list(small.iterdir()) == []  # nothing half-written left behind
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_status_counts_mappers_and_release_respects_them(tiny_qwen3, shm_dir, tmp_path):
    name = publish(tiny_qwen3, torch.float32)["name"]
    proc = _worker(tiny_qwen3, "require", tmp_path / "w.npy", then="wait")
    try:
        assert proc.stdout.readline().strip() == "ready"
        status = CliRunner().invoke(main, ["shm", "status", "--json"])
        [segment] = json.loads(status.stdout)
        assert segment["name"] == name and segment["processes"] == 1 and segment["pids"] == [proc.pid]
        assert segment["dtype"] == "float32" and segment["state"] == "ready" and segment["bytes"] > 0
        refused = CliRunner().invoke(main, ["shm", "release", name])
        assert refused.exit_code == 1 and "mapped by 1 processes" in refused.stderr
        forced = CliRunner().invoke(main, ["shm", "release", name, "--force"])
        assert forced.exit_code == 0 and not (shm_dir / name).exists()
        _, err = proc.communicate(input="", timeout=120)  # stdin closes: it embeds again on its old mapping
        assert proc.returncode == 0, err
        assert np.array_equal(np.load(tmp_path / "w.npy.again.npy"), np.load(tmp_path / "w.npy"))
    finally:
        proc.kill() if proc.poll() is None else None
    assert list_segments() == []


def test_require_without_a_segment_is_one_clear_line(sample_slice, tmp_path, shm_dir):
    result = CliRunner().invoke(main, ["index", str(sample_slice), "--out", str(tmp_path / "o"), "--model", "minilm",
                                       "--quiet"], env={"EMBEDCTL_REQUIRE_SHM": "1"})
    assert result.exit_code == 1
    assert "no shared-memory segment" in result.stderr and "embedctl shm publish" in result.stderr
    assert not (tmp_path / "o" / "current").exists()


def test_embedded_runner_and_query_attach_when_published(sample_slice, tmp_path, shm_dir):
    publish_result = CliRunner().invoke(main, ["shm", "publish", "--model", "minilm"])
    assert publish_result.exit_code == 0, publish_result.output
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["index", str(sample_slice), "--out", str(out), "--model", "minilm",
                                       "--quiet", "--json", "--dims", "128"])
    assert result.exit_code == 0, result.output
    chunk_report = json.loads(next(out.glob("work/*/chunks/chunk-000000.json")).read_text())
    assert chunk_report["weights"].startswith("shm:embedctl-")


def test_fork_children_attach_and_compute_with_threads(tiny_qwen3, shm_dir, tmp_path):
    """The parent imports torch but runs no torch op; forked children attach and use 2 threads each."""
    publish(tiny_qwen3, torch.float32)
    script = f"""
import os, sys, numpy as np, torch
from pathlib import Path
pids = []
for i in range(2):
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(2)
        from embedctl.pipeline.encoder import load_encoder
        from embedctl.pipeline.models import ModelRef
        enc = load_encoder(ModelRef("m", Path({str(tiny_qwen3)!r})), device="cpu", shm="require")
        np.save({str(tmp_path)!r} + f"/f{{i}}.npy", enc.encode(["dog cat"] * 64).vectors)
        os._exit(0)
    pids.append(pid)
sys.exit(max(os.waitpid(p, 0)[1] for p in pids))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert np.array_equal(np.load(tmp_path / "f0.npy"), np.load(tmp_path / "f1.npy"))


def test_abandoned_publish_is_listed_and_released(shm_dir):
    leftover = shm_dir / ".embedctl-0123456789ab-float32.999999999.tmp"
    leftover.write_bytes(b"x" * 100)
    [entry] = list_segments()
    assert entry["state"] == "abandoned"
    assert release() == [leftover.name] and not leftover.exists()


def test_import_model_code_imports_the_architecture_without_weights(tiny_qwen3):
    code = f"""
import sys
from pathlib import Path
from embedctl.pipeline.loader import import_model_code
import_model_code(Path({str(tiny_qwen3)!r}))
assert "transformers.models.qwen3.modeling_qwen3" in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
