"""Everything embedctl creates is private whatever the umask (folders 0700, files 0600), and the server's metrics
folder goes with the server however it stops. The runs below start the installed `embedctl` under umask 000, as a
careless shell or service manager would."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import indexfiles
from tests.services import free_port, stop_group

EMBEDCTL = str(Path(sys.executable).parent / "embedctl")


def _umask_000() -> None:
    os.umask(0)


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDCTL_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", EMBEDCTL_SHM="off", TMPDIR=str(tmp),
               XDG_RUNTIME_DIR=str(tmp / "run"))
    return env


def _cli(args: list, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([EMBEDCTL, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout,
                            preexec_fn=_umask_000)
    assert result.returncode == 0, result.stderr
    return result


def _offenders(root: Path) -> list[str]:
    """Every path under `root` (itself included) that another user could enter or read (folders: more than
    0750, or group-writable; files: more than 0600), as 'mode path'. Symlinks have no mode of their own."""
    found = []

    def check(path: Path) -> None:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            return
        bad = 0o027 if stat.S_ISDIR(st.st_mode) else 0o077
        if st.st_mode & bad:
            found.append(f"{stat.S_IMODE(st.st_mode):04o} {path}")

    check(root)
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            check(Path(folder) / name)
    return found


@pytest.fixture
def corpus(tmp_path, sample_corpus) -> tuple[Path, Path]:
    """200 glosses, and the same with 20 texts changed and 20 rows added (an incremental re-index)."""
    table = pq.read_table(sample_corpus, columns=["id", "text"])
    first = tmp_path / "first.parquet"
    pq.write_table(table.slice(0, 200), first)
    texts = table.column("text").to_pylist()[:220]
    texts[:20] = [f"a changed gloss number {i}" for i in range(20)]
    second = tmp_path / "second.parquet"
    pq.write_table(pa.table({"id": table.column("id").to_pylist()[:220], "text": texts}), second)
    return first, second


def test_every_folder_and_file_of_an_index_is_private_under_umask_000(tmp_path, corpus):
    first, second = corpus
    env = _env(tmp_path)
    mine = tmp_path / "mine"  # the user's own folder, made before embedctl runs: its mode is the user's business
    mine.mkdir()
    mine.chmod(0o755)
    out = mine / "indexes" / "u0"  # both missing: embedctl creates them
    index = ["--out", out, "--model", "minilm", "--dims", "128", "--chunk-rows", "100", "--quiet"]
    steps = [("index", ["index", first, *index]), ("re-index", ["index", second, *index]),
             ("cache prune", ["cache", "prune", out])]
    found = []
    for name, args in steps:
        _cli(args, env)
        found += [f"after {name}: {line}" for line in _offenders(mine / "indexes")]
    # damaged in place: the repair writes a new segment and a new version
    with open(indexfiles.segment_files(out, "index-128.faiss")[0], "r+b") as fh:
        fh.seek(64)
        fh.write(b"\0" * 64)
    _cli(["verify", out, "--repair", "--quiet"], env)
    found += [f"after verify --repair: {line}" for line in _offenders(mine / "indexes")]
    assert not found, "\n".join(found)
    assert stat.S_IMODE(mine.stat().st_mode) == 0o755
    # the lock, the history, the work folders, the versions and the segments were all looked at
    for name in (".embedctl.lock", "runs.jsonl", "work", "versions", "segments"):
        assert (out / name).exists(), name
    assert len(list(out.glob("versions/v*"))) >= 3


def test_the_socket_folder_and_its_missing_parents_are_private_under_umask_000(tmp_path):
    runtime = tmp_path / "run" / "user"  # XDG_RUNTIME_DIR missing: embedctl creates it and its parent
    code = "from embedctl.shm_loader.share import socket_dir; print(socket_dir())"
    env = dict(_env(tmp_path), XDG_RUNTIME_DIR=str(runtime))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                            preexec_fn=_umask_000)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(runtime / "embedctl")
    offenders = _offenders(tmp_path / "run")
    assert not offenders, "\n".join(offenders)


def _serve(tmp: Path, env: dict) -> tuple[subprocess.Popen, Path]:
    """`embedctl serve` with one worker under umask 000, once it answers /health; and its metrics folder."""
    port = free_port()
    log = open(tmp / "server.log", "ab")  # noqa: SIM115 - the server writes it while it runs
    proc = subprocess.Popen([EMBEDCTL, "serve", "--model", "minilm", "--workers", "1", "--shm", "off", "--port",
                             str(port), "--cache", "0"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_umask_000)
    log.close()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    else:
        stop_group(proc)
        pytest.fail("server not ready in 180s:\n" + (tmp / "server.log").read_text()[-3000:])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200  # the worker has written its samples into the folder
    [folder] = tmp.glob("embedctl-metrics-*")
    return proc, folder


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_metrics_folder_is_private_and_goes_with_the_server(sig, tmp_path):
    env = _env(tmp_path)
    proc, folder = _serve(tmp_path, env)
    try:
        offenders = _offenders(folder)  # the workers' sample files included
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        stop_group(proc)
    log = (tmp_path / "server.log").read_text()
    assert proc.returncode in (0, -sig), proc.returncode  # SIGTERM: ended by it, as without a handler
    assert not folder.exists(), f"{folder} left behind: {sorted(p.name for p in folder.iterdir())}\n{log[-2000:]}"
    assert "Traceback" not in log, log[-3000:]
    assert not offenders, "\n".join(offenders)
