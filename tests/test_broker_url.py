"""Broker URLs whose password holds reserved characters: masked whole, or refused in one line; never printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from embedctl.jobs.broker import Settings, mask_url
from embedctl.pipeline.errors import ConfigError
from tests.services import ROOT, RedisServer

EMBEDCTL = str(Path(sys.executable).parent / "embedctl")

# a raw '/', '?' or '#' ends the host part of a URL: these cannot be read back as the user meant them. Each
# password maps to the pieces of it that must never be shown.
AMBIGUOUS = {
    "p@ss/w0rd": ("redis://:p@ss/w0rd@127.0.0.1:1/0", ["p@ss", "ss/w0rd", "w0rd"]),  # kombu: 'redis://:**@ss/w0rd@'
    "hunter/wobble": ("redis://:hunter/wobble@127.0.0.1:1/0", ["hunter", "wobble"]),
    "hunter?wobble": ("redis://:hunter?wobble@127.0.0.1:1/0", ["hunter", "wobble"]),
    "hunter#wobble": ("redis://:hunter#wobble@127.0.0.1:1/0", ["hunter", "wobble"]),
    "alice:hunter/wobble": ("redis://alice:hunter/wobble@127.0.0.1:1/0", ["hunter", "wobble"]),
    "hunter?x@wobble": ("rediss://default:hunter?x@wobble@127.0.0.1:1/0", ["hunter", "wobble"]),
}


def _pieces(password: str) -> list[str]:
    """Parts of a password long enough to identify it (what a careless mask leaves visible)."""
    return [password, *AMBIGUOUS.get(password, ("", []))[1]]


@pytest.mark.parametrize(("url", "masked"), [
    ("redis://:secret@host:6379/0", "redis://:**@host:6379/0"),
    ("redis://user:secret@host/0", "redis://user:**@host/0"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("redis://:p@ss@host:6379/0", "redis://:**@host:6379/0"),  # a raw '@' is unambiguous: the last one ends it
    ("redis://:p%40ss%2Fw0rd@host:6379/0", "redis://:**@host:6379/0"),  # percent-encoded: fine
    ("rediss://:secret@[::1]:6380/2?ssl_cert_reqs=none", "rediss://:**@[::1]:6380/2?ssl_cert_reqs=none"),
    ("redis://host:6379/0?password=secret", "redis://host:6379/0?password=**"),
    ("redis+socket://:secret@/tmp/redis.sock?virtual_host=1", "redis+socket://:**@/tmp/redis.sock?virtual_host=1"),
])
def test_mask_url_hides_the_whole_password(url, masked):
    assert mask_url(url) == masked


@pytest.mark.parametrize("password", sorted(AMBIGUOUS))
def test_a_password_with_a_raw_slash_question_mark_or_hash_is_refused_without_echoing_it(password):
    url = AMBIGUOUS[password][0]
    shown = mask_url(url)
    assert not any(piece in shown for piece in _pieces(password)), shown
    with pytest.raises(ConfigError, match="percent-encode") as info:
        Settings(broker_url=url)
    message = str(info.value)
    assert "\n" not in message and "%2F" in message and "%40" in message
    assert not any(piece in message for piece in _pieces(password)), message
    encoded = password.replace("/", "%2F").replace("?", "%3F").replace("#", "%23").replace("@", "%40")
    fine = Settings(broker_url=f"redis://:{encoded}@h:1/0")  # percent-encoded, it is taken
    assert encoded not in repr(fine) and mask_url(fine.broker_url) == "redis://:**@h:1/0"


def _quiet_env(**values: str) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDCTL_", "CELERY_"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **values)
    return env


@pytest.mark.parametrize("how", ["--broker", "EMBEDCTL_BROKER_URL", "CELERY_BROKER_URL"])
def test_every_command_refuses_an_ambiguous_broker_url_in_one_line(how, sample_slice, tmp_path):
    """`embedctl index`, `jobs run`, `worker` and the plain `celery worker` / `celery inspect`: one line, exit 1,
    no piece of the password (kombu's sanitiser printed 'ss/w0rd', redis-py 'connecting to ss:6379')."""
    url = AMBIGUOUS["p@ss/w0rd"][0]
    env = _quiet_env(**({} if how == "--broker" else {how: url}))
    given = ["--broker", url] if how == "--broker" else []
    spec = tmp_path / "jobs.toml"
    spec.write_text(f'[jobs.demo]\ncorpus = "{sample_slice}"\nmodel = "minilm"\nout = "o2"\n')
    commands = [
        [EMBEDCTL, "index", str(sample_slice), "--out", str(tmp_path / "o"), "--model", "minilm", *given],
        [EMBEDCTL, "jobs", "run", "demo", "--jobs", str(spec), *given],
        [EMBEDCTL, "worker", "--model", "minilm", *given],
    ]
    if how != "--broker":  # the plain Celery commands read the environment only
        commands += [[sys.executable, "-m", "celery", "-A", "embedctl.tasks", "worker", "--loglevel", "INFO"],
                     [sys.executable, "-m", "celery", "-A", "embedctl.tasks", "inspect", "ping"]]
    for argv in commands:
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
        shown = result.stdout + result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1, (argv, shown)
        assert len(lines) == 1 and "Traceback" not in shown, (argv, shown)
        assert "percent-encode" in lines[0], (argv, shown)
        assert not any(piece in shown for piece in _pieces("p@ss/w0rd")), (argv, shown)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_worker_on_a_password_with_reserved_characters_logs_it_masked(tmp_path, start_worker, celery_env):
    """A password holding '@', '/', ':' and '?', percent-encoded: Celery's banner, its connection log lines and
    embedctl's own messages and records show '**', never a piece of it; a job runs on it."""
    import shutil

    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    password = "p@ss/w0rd:x?y"
    server = _EncodedRedis(tmp_path / "redis", password=password).start()
    try:
        env = {**celery_env, "EMBEDCTL_BROKER_URL": server.url}
        worker = start_worker(command=[EMBEDCTL, "worker", "--model", "minilm", "-c", "1", "--shm", "off", "--",
                                       "--without-gossip", "--without-mingle"], EMBEDCTL_BROKER_URL=server.url)
        result = subprocess.run([EMBEDCTL, "index", str(sample_600(tmp_path)), "--out", str(tmp_path / "o"),
                                 "--model", "minilm", "--dims", "128", "--shm", "off", "--broker", server.url, "--json"],
                                capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        log = worker.text()
        assert f"redis://:**@127.0.0.1:{server.port}/0" in log  # the banner
        shown = log + result.stdout + result.stderr + (tmp_path / "o" / "runs.jsonl").read_text()
        shown += "".join(p.read_text() for p in (tmp_path / "o").glob("work/*/job.json"))
        assert not any(piece in shown for piece in [*_pieces(password), "p%40ss", "w0rd"]), shown[-3000:]
    finally:
        server.stop()


def sample_600(tmp_path: Path) -> Path:
    import pyarrow.parquet as pq

    path = tmp_path / "sample600.parquet"
    pq.write_table(pq.read_table(ROOT / "examples" / "wordnet" / "glosses.parquet").slice(0, 600), path)
    return path


class _EncodedRedis(RedisServer):
    """The test Redis, its URL with the password percent-encoded (as the README tells users to write it)."""

    @property
    def url(self) -> str:
        from urllib.parse import quote

        return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"
