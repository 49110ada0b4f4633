"""The embedded runner: a whole run in this process (no broker, no server), through the run lifecycle.

Chunks are embedded with the model loaded here (only when some text is not in the embedding cache), then
`jobs.publishing` builds, publishes and reports exactly as a Celery run does.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from embedctl.jobs import lifecycle, locks, publishing, state
from embedctl.jobs.interrupts import InterruptedAfterPublish
from embedctl.jobs.report import RunReport, read_report
from embedctl.jobs.spec import JobSpec
from embedctl.jobs.verify import Check, check, damaged_chunks, damaged_segments, version_damaged
from embedctl.pipeline import work
from embedctl.pipeline.cache import EmbeddingCache
from embedctl.pipeline.corpus import iter_chunks
from embedctl.pipeline.errors import CorpusError, EmbedctlError, StorageError
from embedctl.pipeline.plan import WORK, load_plan
from embedctl.pipeline.progress import ProgressFactory, no_progress, stage
from embedctl.pipeline.storage import child, is_uri, location
from embedctl.pipeline.vectors import DamagedChunks
from embedctl.pipeline.work import EncoderOnDemand

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
    return _complete(run, progress, EncoderOnDemand(run.plan, spec.threads, spec.shm, encoder), overlap)


def run_named(job, progress: ProgressFactory = no_progress) -> RunReport:
    """Run a named job of a spec file in this process; a run that finds the folder busy is recorded as skipped."""
    try:
        return run_embedded(job.spec, progress=progress, job=job.name)
    except lifecycle.OutputBusy as busy:
        return lifecycle.skipped(job.spec, "embedded", job.name, busy)


def repair(out: Path, progress: ProgressFactory = no_progress, threads: int | None = None,
           shm: str = "auto") -> tuple[Check, RunReport | None]:
    """Check `out` (`jobs.verify.check`); when something is damaged, embed the damaged chunks again from the
    corpus (only those) and publish a new version built from sound vectors. Returns (the check, the run report
    of the repair or None when nothing was damaged)."""
    found = check(out)
    if found.ok:
        return found, None
    if found.job_id is None:
        raise StorageError(f"cannot repair {out}: the stored vectors it was built from are gone; run `embedctl index "
                           f"CORPUS --out {out}` to build it again")
    plan = load_plan(child(location(out), WORK, found.job_id))
    changed = [(f.path, change) for f in plan.corpus.files if (change := f.changes()) is not None]
    chunks = damaged_chunks(found)
    if chunks and changed:
        raise CorpusError(f"cannot embed the damaged chunks again: corpus file {changed[0][0]} changed since the "
                          f"version was built ({changed[0][1]}); run `embedctl index CORPUS --out {out}` to index "
                          "the corpus as it is now")
    previous = state.read_run(plan)
    run = lifecycle.begin_plan(plan, "embedded", keep=previous.keep if previous else None, force=True)
    lifecycle.discard_chunks(run, chunks)
    return found, _complete(run, progress, EncoderOnDemand(plan, threads, shm), overlap=True,
                            forced=damaged_segments(found), rebuild=version_damaged(found))


def _complete(run: lifecycle.Run, progress: ProgressFactory, encoder, overlap: bool,
              forced: frozenset[str] = frozenset(), rebuild: bool = False) -> RunReport:
    """Embed the run's missing chunks, build and publish; ends the run however it goes. `forced` / `rebuild`:
    segments of the current version to rewrite, or none to keep (a repair)."""
    try:
        with _beating(run):
            _embed_missing(run, progress, encoder, overlap)
            try:
                return publishing.publish(run, progress, forced, rebuild)
            except DamagedChunks as damaged:  # the stored vectors are the source of truth: embed those chunks again
                LOG.warning("%s: embedding them again", damaged)
                lifecycle.discard_chunks(run, damaged.chunks)
                _embed_missing(run, progress, encoder, overlap)
                return publishing.publish(run, progress, forced, rebuild)
    except EmbedctlError as exc:
        lifecycle.fail(run, str(exc))
        raise
    except KeyboardInterrupt:
        if run.ended and (report := read_report(run.plan.work_dir)) and report.status == "published":
            raise InterruptedAfterPublish(report) from None
        lifecycle.fail(run, "interrupted (complete chunks are kept: run again to resume)")
        raise
    finally:
        run.lease.release()


@contextmanager
def _beating(run: lifecycle.Run) -> Iterator[None]:
    """On an object store, a heartbeat of the run in its work folder (`running/run.json`) while it works: runs of
    other hosts cannot see this host's file lock, and a publish removes the work folders of runs that are not live
    (`lifecycle.live_celery_runs`)."""
    if not is_uri(run.plan.out):
        yield
        return
    beat = functools.partial(state.heartbeat, run.plan, "run", run.run_id)
    beat()
    try:
        with locks.keep_alive(beat, run.lease_seconds / 3, f"heartbeat of run {run.run_id}"):
            yield
    finally:
        with contextlib.suppress(EmbedctlError, OSError):
            state.end_heartbeat(run.plan, "run")


def _embed_missing(run: lifecycle.Run, progress: ProgressFactory, encoder: EncoderOnDemand, overlap: bool) -> None:
    """Embed the chunks not complete yet (`encoder` loads the model only when some text is not in the cache)."""
    plan = run.plan
    missing = work.missing_chunks(plan)
    if not missing:
        return
    cache = EmbeddingCache(plan.cache_sources())
    todo = sum(plan.corpus.chunks[k].rows for k in missing)
    with stage(progress, "embed", plan.corpus.rows, "rows", plan.corpus.rows - todo) as update:
        for _report in work.embed_stream(plan, iter_chunks(plan.corpus, set(missing)), encoder, update, cache,
                                         overlap=overlap, stamp={"run_id": run.run_id}):
            pass
