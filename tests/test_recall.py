"""HNSW recall@10 vs exact search on 20,000 real WordNet glosses with MiniLM, at the default efSearch."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from embedctl.jobs.runner import run_embedded
from embedctl.jobs.spec import JobSpec
from embedctl.pipeline.defaults import DEFAULT_EF_SEARCH
from embedctl.pipeline.encoder import load_encoder
from embedctl.pipeline.index import IndexReader, slice_normalise
from embedctl.pipeline.models import ModelRef

ROWS = 20_000
QUERIES = 1_000


@pytest.mark.slow
def test_hnsw_recall_at_10_vs_exact_on_wordnet(tmp_path, wordnet_glosses, wordnet_queries, minilm_path):
    corpus = tmp_path / "glosses20k.parquet"
    pq.write_table(pq.read_table(wordnet_glosses).slice(0, ROWS), corpus)
    out = tmp_path / "idx"
    report = run_embedded(JobSpec(corpus=str(corpus), out=str(out), model="minilm"))  # default dims
    assert report.rows_indexed == ROWS
    full = np.concatenate([np.load(p) for p in sorted(out.glob("work/*/chunks/chunk-*.npy"))]).astype(np.float32)
    queries = pq.read_table(wordnet_queries).column("query").to_pylist()[:QUERIES]
    qvec = load_encoder(ModelRef("minilm", minilm_path), device="cpu").encode(queries).vectors
    reader = IndexReader(out)
    assert reader.dims == [384, 256, 128]
    recalls = {}
    for dim in reader.dims:
        exact = faiss.IndexFlatIP(dim)
        exact.add(slice_normalise(full, dim))
        _, truth = exact.search(slice_normalise(qvec, dim), 10)
        [segment] = reader.segments  # 20,000 rows: one segment
        index = segment.index(dim)
        assert faiss.downcast_index(index).hnsw.efSearch == DEFAULT_EF_SEARCH
        _, found = index.search(slice_normalise(qvec, dim), 10)
        recalls[dim] = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    print(f"HNSW recall@10 vs exact, {ROWS} WordNet glosses, MiniLM, efSearch={DEFAULT_EF_SEARCH}: "
          + ", ".join(f"{d}d {r:.4f}" for d, r in recalls.items()))
    assert min(recalls.values()) >= 0.98, recalls
