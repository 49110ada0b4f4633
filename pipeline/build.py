"""Build and publish: the indexes of a complete plan go into a new version folder, then `current` is swapped.

The full-dim vectors in the chunk store are the source of truth: every index (the full dim and each Matryoshka
slice, re-normalised) is derived from them, never by running the model again. A failed build removes its
folder and leaves the previous version current.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedctl.pipeline import versions
from embedctl.pipeline.errors import CorpusError, StorageError
from embedctl.pipeline.index import (
    ROWS_FILE,
    build_hnsw,
    index_file,
    slice_normalise,
    write_index,
    write_rows,
)
from embedctl.pipeline.manifest import CorpusInfo, VersionInfo, write_info
from embedctl.pipeline.plan import WorkPlan
from embedctl.pipeline.vectors import DamagedChunks
from embedctl.pipeline.work import ProgressFactory, chunk_reports, missing_chunks, no_progress

LOG = logging.getLogger(__name__)


def build_and_publish(plan: WorkPlan, progress: ProgressFactory = no_progress,
                      before_publish: Callable[[], None] | None = None) -> tuple[VersionInfo, Path]:
    """Build the indexes of a complete plan into a new version folder and publish it; returns (info, folder).

    `before_publish` runs just before the swap and may raise to stop it (the run lifecycle checks that the run
    still owns the output folder).
    """
    missing = missing_chunks(plan)
    if missing:
        raise StorageError(f"cannot build: {len(missing)} chunks are not embedded yet (first: {missing[0]}); "
                           "run the job again to finish them")
    t0 = time.perf_counter()
    damage = plan.store.damaged()  # the stored vectors are the source of truth: never build from a damaged one
    if damage:
        raise DamagedChunks(damage, f"`embedctl verify {plan.out} --repair`")
    store = plan.store
    numbers = [c.number for c in plan.corpus.chunks]
    rows = pa.concat_tables([store.read_rows(k) for k in numbers], promote_options="permissive")
    n = rows.num_rows
    if n == 0:
        raise CorpusError(f"nothing to index: all {plan.corpus.rows} texts of the corpus are null or empty")
    vectors = np.empty((n, plan.dim), dtype=np.float16)
    pos = 0
    for k in numbers:
        part = store.read_vectors(k)
        vectors[pos:pos + len(part)] = part
        pos += len(part)
    dtypes = sorted({d for r in chunk_reports(plan) for d in r.get("dtypes", [])})
    build = versions.new_build_dir(plan.out)
    try:
        checksums = {ROWS_FILE: write_rows(rows, build / ROWS_FILE)}
        timings = {}
        for dim in plan.dims:
            t_dim = time.perf_counter()
            with progress(f"index {dim}d", n, "vec", 0) as update:
                index = build_hnsw(slice_normalise(vectors, dim), plan.hnsw_m, plan.ef_construction,
                                   plan.ef_search, update, plan.index_type)
            checksums[index_file(dim)] = write_index(index, build / index_file(dim))
            del index
            timings[str(dim)] = round(time.perf_counter() - t_dim, 3)
        info = VersionInfo(
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            model=plan.model, model_path=plan.model_path, model_fingerprint=plan.model_fingerprint,
            model_type=plan.model_type, pooling=plan.pooling, dim=plan.dim,
            dtype="+".join(dtypes) or plan.dtype, max_length=plan.max_length,
            instruction_format=plan.instruction_format, document_prefix=plan.document_prefix,
            query_prefix=plan.query_prefix, dims=tuple(plan.dims), rows=n,
            files={str(d): index_file(d) for d in plan.dims}, rows_file=ROWS_FILE,
            hnsw={"m": plan.hnsw_m, "ef_construction": plan.ef_construction, "ef_search": plan.ef_search},
            index_type=plan.index_type,
            corpus=CorpusInfo(source=plan.corpus.source, fingerprint=plan.corpus.fingerprint,
                              rows=plan.corpus.rows, text_column=plan.corpus.text_column,
                              id_column=plan.corpus.id_column, files=len(plan.corpus.files)),
            index_key=plan.index_key, build_seconds=timings, checksums=checksums)
        write_info(build, info)
        if before_publish is not None:
            before_publish()
        target = versions.publish(plan.out, build)
    except BaseException:
        versions.discard(build)
        raise
    LOG.info("published %s (%d rows, dims %s) in %.1fs", target, n, plan.dims, time.perf_counter() - t0)
    return info, target
