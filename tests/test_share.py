"""One device copy of the weights per device (shm_loader/share.py, exporter.py, supervise.py), on the CPU
transport (a memfd passed over the exporter's socket), which runs every step of the CUDA IPC path but its two
device calls: the importer's vectors equal a load from disk, the exporter refuses other users, a stale exporter is
refused, a dead one is noticed before the next batch, and the Celery parent cannot touch CUDA."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from embedctl.pipeline.encoder import Encoder, load_encoder
from embedctl.pipeline.errors import ModelError, WeightsLost
from embedctl.pipeline.loader import LoadedModel
from embedctl.pipeline.models import ModelRef, read_profile
from embedctl.shm_loader.errors import SegmentError
from embedctl.shm_loader.model import attach_shared_model
from embedctl.shm_loader.segment import publish
from embedctl.shm_loader.share import socket_path
from embedctl.shm_loader.supervise import Exporters
from tests.services import wait_until

TEXTS = ["a river flows to the sea", "the dog barks", "light " * 20]


@pytest.fixture
def shared(tiny_qwen3, tmp_path, monkeypatch):
    """A copy of the tiny Qwen3 published in a private shm folder, with its exporter on `cpu` running."""
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen3, model)
    run_dir = Path(tempfile.mkdtemp(prefix="ec-"))
    monkeypatch.setenv("EMBEDCTL_SHM_DIR", str(tmp_path / "shm"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run_dir))
    (tmp_path / "shm").mkdir()
    folder = read_profile(model).transformer_path
    publish(folder, torch.bfloat16)
    exporters = Exporters(folder, torch.bfloat16, ["cpu"])
    exporters.start(timeout=120)
    yield model, folder, exporters
    exporters.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


def test_the_mapped_copy_gives_the_vectors_of_a_load_from_disk(shared):
    model, folder, exporters = shared
    disk = load_encoder(ModelRef("m", model), device="cpu", dtype="bf16", shm="off")
    ours = _mapped_encoder(folder, exporters, disk)
    assert np.array_equal(ours.encode(TEXTS).vectors, disk.encode(TEXTS).vectors)
    loaded = load_encoder(ModelRef("m", model), device="cpu", dtype="bf16")  # auto: only CUDA maps an exporter
    assert loaded.source.startswith("shm:")
    os.environ.update(exporters.environment())  # what `embedctl worker` gives its pool children
    try:
        required = load_encoder(ModelRef("m", model), device="cpu", dtype="bf16")
    finally:
        for name in exporters.environment():
            del os.environ[name]
    assert required.source.startswith("exporter:embedctl-")


def test_a_dead_exporter_fails_the_next_batch_and_its_restart_is_mapped_again(shared):
    model, folder, exporters = shared
    disk = load_encoder(ModelRef("m", model), device="cpu", dtype="bf16", shm="off")
    encoder = _mapped_encoder(folder, exporters, disk)
    encoder.encode(TEXTS)
    old = exporters.procs["cpu"].pid
    exporters.procs["cpu"].kill()
    exporters.procs["cpu"].wait()
    with pytest.raises(WeightsLost, match=f"pid {old}\\) exited; this work fails and is retried"):
        encoder.encode(TEXTS)
    assert exporters.watch() == ["cpu"] and exporters.procs["cpu"].pid != old
    wait_until(lambda: exporters.watch() == [] and exporters.exporters["cpu"].ready, 120, "the restarted exporter")
    again = _mapped_encoder(folder, exporters, disk)
    assert again.loaded.lease.exporter_pid == exporters.procs["cpu"].pid
    assert np.array_equal(again.encode(TEXTS).vectors, disk.encode(TEXTS).vectors)


def _mapped_encoder(folder: Path, exporters: Exporters, disk: Encoder) -> Encoder:
    """An encoder over the exporter's copy of the weights (mapped here), with the tokenizer of a load from disk."""
    model, lease = attach_shared_model(folder, torch.bfloat16, "cpu", exporters.key, wait=5)
    return Encoder(LoadedModel(model, disk.tokenizer, disk.profile, disk.device, torch.bfloat16,
                               f"exporter:{lease.segment}", lease=lease))


def test_an_exporter_of_weights_changed_since_is_refused(shared):
    model, folder, exporters = shared
    weights = next(Path(folder).glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.raises(SegmentError, match="not .* as it is now; restart the worker"):
        attach_shared_model(folder, torch.bfloat16, "cpu", exporters.key, wait=5)


def test_no_exporter_is_one_line_after_the_wait(tiny_qwen3, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="ec-"))
    with pytest.raises(SegmentError, match="no weight exporter of embedctl-.* on cuda:3 answered in 0 s"):
        attach_shared_model(read_profile(tiny_qwen3).transformer_path, torch.bfloat16, "cuda:3", "1", wait=0.3)
    monkeypatch.setenv("EMBEDCTL_DEVICE_SHARE", "on")
    monkeypatch.delenv("EMBEDCTL_EXPORTER_KEY", raising=False)
    with pytest.raises(ModelError, match="EMBEDCTL_EXPORTER_KEY is not set"):
        load_encoder(ModelRef("m", tiny_qwen3), device="cpu")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_the_exporter_hands_nothing_to_another_user(shared):
    """Two walls: the socket (0600 in a 0700 folder) is out of another user's reach; opened up, the exporter still
    checks the peer's credentials and answers with a refusal instead of the handle."""
    _model, folder, _exporters = shared
    path = socket_path(_segment(folder), "cpu", _exporters.key)
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin")  # one the other user may run
    if python is None:
        pytest.skip("no system python3 for the other user")
    probe = ("import json, socket, struct, sys\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('EACCES'); sys.exit()\n"
             "data, fds, _, _ = socket.recv_fds(s, 65536, 4)\n"
             "print(json.loads(data[4:]).get('error', 'HANDLE'), len(fds))\n")

    def as_nobody() -> str:
        return subprocess.run([python, "-c", probe, str(path)], capture_output=True, text=True, timeout=30,
                              preexec_fn=lambda: (os.setgid(65534), os.setuid(65534))).stdout.strip()

    assert as_nobody() == "EACCES"
    os.chmod(path.parent.parent, 0o711)  # the test's XDG_RUNTIME_DIR
    os.chmod(path.parent, 0o711)
    os.chmod(path, 0o666)
    try:
        assert as_nobody() == f"the weight exporter (pid {_exporters.procs['cpu'].pid}) serves only uid " \
                              f"{os.getuid()} 0"
    finally:
        os.chmod(path.parent, 0o700)


def _segment(folder: Path) -> str:
    from embedctl.shm_loader.segment import segment_name

    return segment_name(folder, torch.bfloat16)


def test_the_celery_parent_cannot_touch_cuda():
    """`worker_init` ends with every CUDA entry point of torch raising (a CUDA context inherited through fork is
    unusable); a pool child lifts the guard first thing."""
    code = ("import torch\n"
            "from celery.concurrency import prefork, solo\n"
            "from embedctl.tasks import worker\n"
            "def answers():  # what torch says of CUDA without initialising it, or the error it raises\n"
            "    try:\n        return f'{torch.cuda.is_available()} {torch.cuda.device_count()}'\n"
            "    except Exception as exc:\n        return f'{type(exc).__name__}: {exc}'\n"
            "print(answers())\n"  # before any worker set-up: torch's own answers
            "worker._parent_init(sender=type('W', (), {'pool_cls': solo.TaskPool, 'concurrency': 1})())\n"
            "print(answers())\n"  # solo: tasks run here, CUDA stays usable
            "worker._parent_init(sender=type('W', (), {'pool_cls': prefork.TaskPool, 'concurrency': 2})())\n"
            "for call in (torch.cuda.is_available, torch.cuda.device_count, lambda: torch.zeros(1, device='cuda')):\n"
            "    try:\n        call(); print('ALLOWED')\n"
            "    except Exception as exc:\n        print(type(exc).__name__, 'worker parent touched CUDA' in str(exc))\n"
            "worker.lift_cuda_guard()\n"
            "print(answers())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDCTL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    own = out.stdout.split("\n")[0]
    assert re.fullmatch(r"(True|False) \d+", own), out.stdout
    assert out.stdout.split("\n")[1:6] == [own] + ["EmbedctlError True"] * 3 + [own], out.stdout


class _StoppedClock:
    """The supervisor's monotonic clock, stopped at `now` (which the test moves)."""

    def __init__(self, monkeypatch):
        from embedctl.shm_loader import supervise

        self.now = time.monotonic()
        monkeypatch.setattr(supervise, "time", SimpleNamespace(monotonic=lambda: self.now, sleep=time.sleep))


def test_an_exporter_that_cannot_start_is_retried_with_growing_pauses(shared, tmp_path, monkeypatch):
    """The host segment released under a running worker: the restarted exporter fails, and the supervisor tries
    again after 1, 2, 4 ... s (not in a tight loop), saying so; a start with no segment is one line."""
    _model, folder, exporters = shared
    lines = []
    exporters.log = lines.append
    for segment in (tmp_path / "shm").iterdir():
        segment.unlink()
    clock = _StoppedClock(monkeypatch)
    exporters.procs["cpu"].kill()
    exporters.procs["cpu"].wait()
    assert exporters.watch() == ["cpu"]  # restarted at once: it was serving
    for pause in (1, 2):  # each failed start is noticed at `noticed` and started again once its pause is over
        exporters.procs["cpu"].wait(timeout=60)  # no segment: the exporter fails
        noticed = clock.now
        assert exporters.watch() == [] and lines[-1].endswith(f"failed to start (1); trying again in {pause} s")
        clock.now = noticed + pause - 0.001
        assert exporters.watch() == []  # paused, not retried
        clock.now = noticed + pause
        assert exporters.watch() == ["cpu"]
    fresh = Exporters(folder, torch.bfloat16, ["cpu"])
    with pytest.raises(SegmentError, match="exited \\(1\\) before it was ready"):
        fresh.start(timeout=60)


@pytest.mark.parametrize("command", [["worker", "--model", "minilm", "--broker", "redis://127.0.0.1:1/0"],
                                     ["serve", "--model", "minilm"]])
def test_device_share_on_without_the_segment_is_refused(command, tmp_path):
    """`--device-share on` with the shared-memory segment off cannot be honoured: refused before anything starts."""
    embedctl = str(Path(sys.executable).parent / "embedctl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDCTL_")}
    out = subprocess.run([embedctl, *command, "--device-share", "on", "--shm", "off"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "needs the shared-memory segment it copies to the devices" in out.stderr
