"""Retention and garbage collection: what a publish leaves behind, removed once the new version is current.

After the swap, in this order: the versions beyond `keep` (`versions.prune`), the work folders of other plans
(their vectors no longer match the corpus or settings; the published plan's own are the embedding cache of the
next run), the job's build plans, then the segments that no kept version and no build plan refers to. The caller
holds the output folder's lock; it names the work folders that live runs of the other mode still write in.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from embedctl.pipeline import versions
from embedctl.pipeline.compose import remove_builds, segments_in_use
from embedctl.pipeline.plan import WORK, WorkPlan, work_in_use
from embedctl.pipeline.segments import collect_garbage
from embedctl.pipeline.storage import parent, storage_of

LOG = logging.getLogger(__name__)


def apply_retention(plan: WorkPlan, keep: int | None, live_work: Collection[str] = ()) -> list[str]:
    """Clean up after `plan` was published (see the module docstring); returns the versions removed.

    `keep`: how many versions to keep (None or 0: all); `live_work`: names of work folders that a live run of the
    other mode writes in (kept)."""
    removed = versions.prune(plan.out, keep) if keep else []
    remove_stale_work(plan, live_work)
    remove_builds(plan)
    used = versions.segments_of_kept_versions(plan.out)
    if used is not None:
        collect_garbage(plan.out, used | segments_in_use(storage_of(parent(plan.work_dir))))
    return removed


def remove_stale_work(plan: WorkPlan, live_work: Collection[str] = ()) -> list[str]:
    """Remove the work folders of plans other than `plan` (but those named in `live_work`, and those whose vectors
    files the chunks of these point at: `plan.work_in_use`); returns their names."""
    storage = plan.storage
    removed = []
    kept = work_in_use(storage, [plan.plan_id])
    live = work_in_use(storage, live_work)
    for entry in storage.list(WORK):
        if not entry.folder or entry.name in kept:
            continue
        if entry.name in live:
            LOG.info("kept %s: a live run is writing there (or reads vectors there)", storage.describe(entry.key))
            continue
        storage.delete(entry.key)
        removed.append(entry.name)
    return removed
