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
    """Remove the work folders of plans other than `plan` and those whose vectors files its chunks point at
    (`plan.work_in_use`); returns their names. While a run of another plan is live (`live_work`) none is removed:
    its chunks may point into any folder its embedding cache read, written or not yet (the next publish removes
    them)."""
    storage = plan.storage
    live = set(live_work) - {plan.plan_id}
    if live:
        LOG.info("kept the work folders of %s: live runs are writing in %s", storage.describe(WORK), sorted(live))
        return []
    kept = work_in_use(storage, [plan.plan_id])
    removed = []
    for entry in storage.list(WORK):
        if not entry.folder or entry.name in kept:
            continue
        storage.delete(entry.key)
        removed.append(entry.name)
    return removed
