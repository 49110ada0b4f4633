"""The embedded runner: a whole run in this process (no broker, no server), through the run lifecycle.

Chunks are embedded with the model loaded here (only when some text is not in the embedding cache), then the
lifecycle builds, publishes and reports exactly as a Celery run does.
"""

from __future__ import annotations

import logging
from pathlib import Path

from embedctl.jobs import lifecycle
from embedctl.jobs.report import RunReport
from embedctl.jobs.spec import JobSpec
from embedctl.pipeline import work
from embedctl.pipeline.cache import EmbeddingCache
from embedctl.pipeline.corpus import iter_chunks
from embedctl.pipeline.errors import EmbedctlError
from embedctl.pipeline.models import ModelRef
from embedctl.pipeline.plan import WorkPlan
from embedctl.pipeline.work import ProgressFactory, no_progress

LOG = logging.getLogger(__name__)


def run_embedded(spec: JobSpec, progress: ProgressFactory = no_progress, encoder=None, overlap: bool = True,
                 job: str | None = None) -> RunReport:
    """Run the job in this process: embed missing chunks, build and publish; returns the run report.

    A re-run skips complete chunks (resume after an interrupt); a job whose current version matches embeds and
    builds nothing. `overlap`: read and write chunks in threads beside the model (`pipeline.work.embed_stream`).
    Raises OutputBusy when another run holds the output folder (named jobs record that as `skipped`).
    """
    run = lifecycle.begin(spec, "embedded", job=job)
    if run.up_to_date:
        return lifecycle.finish_up_to_date(run)
    try:
        _embed_missing(run, spec, progress, encoder, overlap)
        return lifecycle.publish(run, progress)
    except EmbedctlError as exc:
        lifecycle.fail(run, str(exc))
        raise
    except KeyboardInterrupt:
        lifecycle.fail(run, "interrupted (complete chunks are kept: run again to resume)")
        raise
    finally:
        run.lease.release()


def run_named(job, progress: ProgressFactory = no_progress) -> RunReport:
    """Run a named job of a spec file in this process; a run that finds the folder busy is recorded as skipped."""
    try:
        return run_embedded(job.spec, progress=progress, job=job.name)
    except lifecycle.OutputBusy as busy:
        return lifecycle.skipped(job.spec, "embedded", job.name, busy)


def _embed_missing(run: lifecycle.Run, spec: JobSpec, progress: ProgressFactory, encoder, overlap: bool) -> None:
    plan = run.plan
    missing = work.missing_chunks(plan)
    if not missing:
        return
    loaded = [encoder]

    def lazy_encoder():  # the model is loaded only when some text is not in the cache
        if loaded[0] is None:
            loaded[0] = load_job_encoder(spec, plan)
        return loaded[0]

    cache = EmbeddingCache(plan.cache_sources())
    todo = sum(plan.corpus.chunks[k].rows for k in missing)
    with progress("embed", plan.corpus.rows, "rows", plan.corpus.rows - todo) as update:
        for _report in work.embed_stream(plan, iter_chunks(plan.corpus, set(missing)), lazy_encoder, update, cache,
                                         overlap=overlap, stamp={"run_id": run.run_id}):
            pass


def load_job_encoder(spec: JobSpec, plan: WorkPlan):
    """Load the encoder a job computes with (threads set first)."""
    import torch  # imported here: planning and status need no torch

    from embedctl.pipeline.encoder import load_encoder

    if spec.threads:
        torch.set_num_threads(spec.threads)
    return load_encoder(ModelRef(plan.model, Path(plan.model_path)), device=plan.device, dtype=plan.dtype,
                        max_length=plan.max_length, batch_tokens=plan.batch_tokens, shm=spec.shm,
                        compile=plan.compile)
