"""Publishing a run: the new version is built, swapped in while the run still holds its output folder, cleaned
up after (`pipeline.retention`), and the run ends with its report.

The embedded runner publishes in its own process (`publish`); on workers the build is spread over tasks and the
last one publishes (`publish_build`, called by `jobs.steps`).
"""

from __future__ import annotations

from embedctl.jobs import interrupts, lifecycle, state, tally
from embedctl.jobs.lifecycle import Run, still_ours
from embedctl.jobs.report import RunReport
from embedctl.pipeline import versions
from embedctl.pipeline.build import build_all, staged_version
from embedctl.pipeline.compose import BuildPlan
from embedctl.pipeline.manifest import VersionInfo, read_info
from embedctl.pipeline.progress import ProgressFactory, no_progress
from embedctl.pipeline.retention import apply_retention
from embedctl.pipeline.storage import is_uri


def publish(run: Run, progress: ProgressFactory = no_progress, forced: frozenset[str] = frozenset(),
            rebuild: bool = False) -> RunReport:
    """Build the new version in this process (plan, every piece, publish), swap it in, apply retention, and end
    the run. `forced` / `rebuild`: segments to rewrite, or none to keep (a repair)."""
    build = build_all(run.plan, progress, forced, rebuild)
    with interrupts.held() as hold:  # from the swap on, Ctrl-C waits until the run is recorded as published
        with staged_version(run.plan, build) as staged:
            still_ours(run)
            hold.start()
            staged.publish()
        return published(run, staged.target.name, staged.info, build)


def publish_build(run: Run, build: BuildPlan) -> RunReport:
    """Publish a run whose pieces are all built (the caller holds the job's build lease), or finish a publish
    whose worker died between the swap and the report; then retention and the end of the run."""
    done = state.published_version(run.plan)
    if done:
        return published(run, done[0], read_info(versions.current_version(run.plan.out)), None)
    with staged_version(run.plan, build) as staged:
        still_ours(run)
        staged.publish()
    return published(run, staged.target.name, staged.info, build)


def published(run: Run, version: str, info: VersionInfo, build: BuildPlan | None) -> RunReport:
    """After the swap: the report, retention (versions, the work of superseded plans, the segments no kept version
    uses; never the work of a live run of the other mode), and the end of the run."""
    report = tally.published_report(run.plan, run.record, version, info, build)
    # on an object store, embedded runs of other hosts too: they hold no lock this host can see, but they beat
    live = lifecycle.live_celery_runs(run.plan.out, run.lease_seconds, embedded=is_uri(run.plan.out))
    removed = apply_retention(run.plan, run.record.keep, live_work=set(live))
    if run.record.keep:
        report.versions_removed = removed
    return lifecycle.end(run, report)
