"""Several hosts, rehearsed on one machine: three worker "hosts" in Linux network namespaces (each its own
`embedctl worker`), one Redis, one shared folder. A multi-segment job runs; one host's link is cut in the middle
of the build; the job completes on the other two, every id exactly once in every index. Skipped (with the reason)
where namespaces cannot be made; the namespaces, links and processes are removed even when the test fails."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests import indexfiles
from tests.services import free_port, wait_until

EMBEDCTL = str(Path(sys.executable).parent / "embedctl")


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

    def down(self) -> None:
        for kind, name in reversed(self.made):
            if kind == "netns":
                _ip("netns", "del", name, check=False)
            else:
                _ip("link", "del", name, check=False)


@pytest.fixture
def hosts():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    made = Hosts(3)
    try:
        made.up()
    except subprocess.CalledProcessError as exc:
        made.down()
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.strip()}")
    yield made
    made.down()


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
