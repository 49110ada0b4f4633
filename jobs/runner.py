"""Planning a job and the embedded runner (in-process: no broker, no server).

`plan_job` turns a JobSpec into a WorkPlan (validating corpus and model before any embedding); `run_embedded`
embeds the missing chunks in this process, then builds and publishes the indexes. The Celery submitter uses
the same plan and the same `pipeline.work` steps.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

from jobs import state
from jobs.spec import JobSpec
from pipeline import work
from pipeline.cache import EmbeddingCache
from pipeline.corpus import iter_chunks, plan_corpus
from pipeline.index import index_dims
from pipeline.models import ModelRef, read_profile, resolve_model
from pipeline.plan import WorkPlan
from pipeline.work import ProgressFactory, no_progress

LOG = logging.getLogger(__name__)


def plan_job(spec: JobSpec) -> WorkPlan:
    """Validate the corpus and resolve the model of `spec` (reads no weights); raises EmbedctlError."""
    ref = resolve_model(spec.model)
    profile = read_profile(ref.path)
    corpus = plan_corpus(spec.corpus, spec.text_column, spec.id_column, spec.chunk_rows,
                         id_column_required=spec.id_column_required, validated=_validated_fingerprint(spec))
    return WorkPlan(
        out=str(spec.out), corpus=corpus, model=spec.model, model_path=str(ref.path),
        model_fingerprint=ref.fingerprint, model_type=profile.model_type, pooling=profile.pooling, dim=profile.dim,
        dtype=spec.dtype, device=spec.device, max_length=spec.max_length or profile.max_length,
        batch_tokens=spec.batch_tokens, document_prefix=profile.document_prefix(spec.instruction),
        query_prefix=profile.query_prefix(spec.query_instruction), dims=tuple(index_dims(profile.dim, spec.dims)),
        hnsw_m=spec.hnsw_m, ef_construction=spec.ef_construction, ef_search=spec.ef_search,
        index_type=spec.index_type, compile=spec.compile)


def _validated_fingerprint(spec: JobSpec) -> str | None:
    """Fingerprint of the corpus the current version was built from, when its ids were checked in this column."""
    from pipeline import versions
    from pipeline.fsutil import read_json

    current = versions.current_version(spec.out)
    if current is None:
        return None
    corpus = read_json(current / versions.INFO).get("corpus", {})
    return corpus.get("fingerprint") if corpus.get("id_column") == spec.id_column else None


def run_embedded(spec: JobSpec, progress: ProgressFactory = no_progress, encoder=None, overlap: bool = True) -> dict:
    """Run the job in this process: embed missing chunks, build and publish; returns the run report.

    A re-run skips complete chunks (resume after an interrupt); a job whose current version matches embeds and
    builds nothing. `overlap`: read and write chunks in threads beside the model (`pipeline.work.embed_stream`).
    """
    t0 = time.perf_counter()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    plan = plan_job(spec)
    chunks = plan.corpus.chunks
    report = {"started": started, "out": str(spec.out), "plan_id": plan.plan_id, "job_id": plan.plan_id,
              "mode": "embedded", "model": plan.model,
              "rows_total": plan.corpus.rows, "chunks_total": len(chunks), "dims": list(plan.dims)}
    info = state.published_info(plan)
    if info is not None:
        return {**report, "status": "up-to-date", "chunks_embedded": 0, "rows_embedded": 0, "rows_reused": 0,
                "rows_deleted": 0, "version": info["version"], "rows_indexed": info["rows"],
                "seconds": round(time.perf_counter() - t0, 3)}
    state.write_job(plan, mode="embedded", keep=spec.keep)
    missing = work.missing_chunks(plan)
    report["chunks_done_before"] = len(chunks) - len(missing)
    rows_embedded = rows_reused = 0
    if missing:
        loaded = [encoder]

        def lazy_encoder():  # the model is loaded only when some text is not in the cache
            if loaded[0] is None:
                loaded[0] = load_job_encoder(spec, plan)
            return loaded[0]

        cache = EmbeddingCache(plan.cache_sources())
        todo = sum(chunks[k].rows for k in missing)
        t_embed = time.perf_counter()
        with progress("embed", plan.corpus.rows, "rows", plan.corpus.rows - todo) as update:
            for chunk_report in work.embed_stream(plan, iter_chunks(plan.corpus, set(missing)), lazy_encoder,
                                                  update, cache, overlap=overlap):
                rows_embedded += chunk_report["embedded"]
                rows_reused += chunk_report["reused"]
        report["embed_seconds"] = round(time.perf_counter() - t_embed, 3)
    report["chunks_embedded"] = len(missing)
    report["rows_embedded"] = rows_embedded
    report["rows_reused"] = rows_reused
    info = work.build_and_publish(plan, progress)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if rows_embedded and report.get("embed_seconds"):
        report["rows_per_second"] = round(rows_embedded / report["embed_seconds"], 1)
    return state.finish(plan, info, report, keep=spec.keep)


def load_job_encoder(spec: JobSpec, plan: WorkPlan):
    """Load the encoder a job computes with (threads set first)."""
    import torch  # imported here: planning and status need no torch

    from pipeline.encoder import load_encoder

    if spec.threads:
        torch.set_num_threads(spec.threads)
    return load_encoder(ModelRef(plan.model, Path(plan.model_path)), device=plan.device, dtype=plan.dtype,
                        max_length=plan.max_length, batch_tokens=plan.batch_tokens, shm=spec.shm,
                        compile=plan.compile)

