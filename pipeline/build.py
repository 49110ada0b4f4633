"""Build and publish: a version's new segments are built from the stored vectors, then the version (its segments
and deletion sets) is published by swapping `current`.

The full-dim vectors in the chunk store are the source of truth: every index (the full dim and each Matryoshka
slice, re-normalised) is derived from them, never by running the model again. A build is a plan
(`pipeline.compose`), pieces (one index file of one segment and dim; any process, any host, in any order) and a
publish (`staged_version`); every step is idempotent, and a failed build leaves the previous version current.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from embedctl.pipeline import versions
from embedctl.pipeline.compose import BuildPlan, PlanRows, compose, gather_rows, gather_vectors, plan_rows
from embedctl.pipeline.errors import CorpusError, StorageError
from embedctl.pipeline.manifest import (
    CorpusInfo,
    SegmentRef,
    VersionInfo,
    damaged_files,
    read_info,
    write_deletions,
    write_info,
)
from embedctl.pipeline.merge import MergePolicy
from embedctl.pipeline.plan import WorkPlan
from embedctl.pipeline.progress import ProgressFactory, no_progress, stage
from embedctl.pipeline.segments import (
    ROWS_FILE,
    VECTORS_FILE,
    build_index_file,
    index_file,
    segment_dir,
    write_rows,
    write_vectors,
)
from embedctl.pipeline.storage import Folder
from embedctl.pipeline.vectors import DamagedChunks
from embedctl.pipeline.work import chunk_reports, missing_chunks

LOG = logging.getLogger(__name__)


def policy_of(plan: WorkPlan) -> MergePolicy:
    return MergePolicy(segment_rows=plan.segment_rows)


def plan_build(plan: WorkPlan, forced: frozenset[str] = frozenset(), rebuild: bool = False) -> BuildPlan:
    """The build plan of a complete job's next version (checking every stored chunk first: the vectors are the
    source of truth, never built from when damaged). `forced`: segments of the current version to rewrite;
    `rebuild`: keep none of them."""
    missing = missing_chunks(plan)
    if missing:
        raise StorageError(f"cannot build: {len(missing)} chunks are not embedded yet (first: {missing[0]}); "
                           "run the job again to finish them")
    damage = plan.store.damaged()
    if damage:
        raise DamagedChunks(damage, f"`embedctl verify {plan.out} --repair`")
    while True:  # the base and the version the publish expects to find current, from one state of the pointer
        after = versions.current_name(plan.out)
        now = versions.current_version(plan.out)
        if now is None or now.name == after:
            break
    base = None if rebuild else now
    try:
        base_info = read_info(base) if base is not None else None
    except StorageError as exc:
        LOG.warning("%s: building every segment anew", exc)
        base, base_info = None, None
    if base_info is not None:
        damaged = damaged_files(base, base_info)  # files changed since written (verify also reads the rest)
        if any(ref is None for ref, _path, _problem in damaged):
            LOG.warning("%s: building every segment anew", "; ".join(f"{p}: {m}" for _r, p, m in damaged))
            base, base_info = None, None
        for ref, path, problem in damaged:
            if ref is not None and ref.id not in forced:
                LOG.warning("%s is damaged (%s): rewriting segment %s from the stored vectors", path, problem, ref.id)
                forced = forced | {ref.id}
    build = compose(plan, base, base_info, policy_of(plan), forced, current=after)
    if not build.new and not build.kept:
        raise CorpusError(f"nothing to index: all {plan.corpus.rows} texts of the corpus are null or empty")
    return build


def build_piece(plan: WorkPlan, build: BuildPlan, segment: str, dim: int, rows: PlanRows | None = None,
                progress: ProgressFactory = no_progress) -> None:
    """Build one index file of one new segment (and the segment's rows and full vectors files, when no piece wrote
    them yet: the vectors file holds the segment's full-dim float16 vectors for the funnel's re-rank).

    Idempotent: a piece already done is skipped; files are written atomically. Memory: the segment's full-dim
    float16 vectors, their float32 slice and the index (see README, "Segments")."""
    if build.done(segment, str(dim)) is not None:
        return
    rows = rows or plan_rows(plan)
    sources = build.sources(segment)
    folder = segment_dir(plan.out, segment)
    if build.done(segment, "rows") is None:
        build.mark_done(segment, "rows", write_rows(folder, gather_rows(plan, rows, sources)))
    vectors = gather_vectors(plan, rows, sources)
    if build.done(segment, "vectors") is None:
        build.mark_done(segment, "vectors", write_vectors(folder, vectors))
    with stage(progress, f"index {dim}d {segment}", len(sources), "vec") as update:
        written = build_index_file(folder, dim, vectors, plan.hnsw_m, plan.ef_construction, plan.ef_search,
                                   plan.index_type, update)
    build.mark_done(segment, str(dim), written)


def build_pieces(plan: WorkPlan, build: BuildPlan, progress: ProgressFactory = no_progress) -> None:
    """Every missing piece, in turn, in this process (the embedded runner; FAISS uses all threads)."""
    missing = build.missing()
    if missing:
        rows = plan_rows(plan)
        for segment, dim in missing:
            build_piece(plan, build, segment, dim, rows, progress)


@dataclass
class StagedVersion:
    """A version written into its build folder, not yet current (`staged_version`)."""

    plan: WorkPlan
    info: VersionInfo
    folder: Path | Folder
    after: str | None = ""  # the version current when the build was planned (`versions.publish`)
    target: Path | Folder | None = None  # the version folder, once published

    def publish(self) -> Path | Folder:
        """Swap `current` to this version (atomically); returns its folder."""
        self.target = versions.publish(self.plan.out, self.folder, self.after)
        return self.target


@contextmanager
def staged_version(plan: WorkPlan, build: BuildPlan) -> Iterator[StagedVersion]:
    """Write the version of a complete build (its manifest and deletion sets) into a new build folder and hand it
    to the block, which publishes it (`StagedVersion.publish`) once it has checked that it still may (the run
    lifecycle checks that the run still owns the output folder). A version the block leaves unpublished, by
    raising or not, is removed: the previous one stays current."""
    t0 = time.perf_counter()
    missing = build.missing()
    if missing:
        raise StorageError(f"cannot publish: {len(missing)} index pieces are not built yet (first: segment "
                           f"{missing[0][0]}, dim {missing[0][1]}); run the job again to finish them")
    folder = versions.new_build_dir(plan.out)
    staged = None
    try:
        staged = StagedVersion(plan, _write_version(plan, build, folder), folder, build.current)
        yield staged
    finally:
        if staged is None or staged.target is None:
            versions.discard(folder)
    if staged.target is not None:
            LOG.info("published %s (%d rows in %d segments) in %.1fs", staged.target, staged.info.rows,
                 len(staged.info.segments), time.perf_counter() - t0)


def _write_version(plan: WorkPlan, build: BuildPlan, folder: Path) -> VersionInfo:
    """The manifest of a complete build's version and its kept segments' deletion sets, written into `folder`."""
    dtypes = sorted({d for r in chunk_reports(plan) for d in r.get("dtypes", [])})
    segments, checksums = [], {}
    for kept in build.kept:
        ref, files = write_deletions(folder, SegmentRef(**kept.ref), build.deletions(kept.ref["id"]))
        segments.append(ref)
        checksums.update(files)
    for new in build.new:
        files = {ROWS_FILE: build.done(new.id, "rows"), VECTORS_FILE: build.done(new.id, "vectors"),
                 **{index_file(d): build.done(new.id, str(d)) for d in build.dims}}
        segments.append(SegmentRef(id=new.id, rows=new.rows, files=files))
    info = VersionInfo(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        model=plan.model, model_path=plan.model_path, model_fingerprint=plan.model_fingerprint,
        model_type=plan.model_type, pooling=plan.pooling, dim=plan.dim,
        dtype="+".join(dtypes) or plan.dtype, max_length=plan.max_length,
        instruction_format=plan.instruction_format, document_prefix=plan.document_prefix,
        query_prefix=plan.query_prefix, dims=tuple(plan.dims), rows=sum(s.live for s in segments),
        hnsw={"m": plan.hnsw_m, "ef_construction": plan.ef_construction, "ef_search": plan.ef_search},
        index_type=plan.index_type,
        corpus=CorpusInfo(source=plan.corpus.source, fingerprint=plan.corpus.fingerprint,
                          rows=plan.corpus.rows, text_column=plan.corpus.text_column,
                          id_column=plan.corpus.id_column, files=len(plan.corpus.files)),
        index_key=plan.index_key, segments=tuple(segments), segment_key=build.segment_key,
        segment_rows=plan.segment_rows, checksums=checksums)
    write_info(folder, info)
    return info


def build_all(plan: WorkPlan, progress: ProgressFactory = no_progress, forced: frozenset[str] = frozenset(),
              rebuild: bool = False) -> BuildPlan:
    """Plan the build and build every piece in this process; returns the build plan, ready to publish."""
    build = plan_build(plan, forced, rebuild)
    build_pieces(plan, build, progress)
    return build
