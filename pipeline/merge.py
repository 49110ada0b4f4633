"""The merge policy: which segments of the current version a build rewrites, so that a corpus that changes a little
every night keeps a bounded number of segments and a bounded share of deleted rows.

A tiered policy after Lucene's TieredMergePolicy, simplified:
- a segment whose deleted share reaches `max_deleted` is rewritten (its live rows go into a new segment): deleted
  rows cost search time and recall, since HNSW walks through them;
- segments below half of `segment_rows` are grouped in tiers by size (tier t holds `floor_rows * per_tier**t` to
  `floor_rows * per_tier**(t+1)` live rows); when a tier holds more than `per_tier` segments, counting the segment
  of this build's new rows, its smallest segments are merged with the new rows into one. Larger segments are only
  rewritten for their deletions: a big corpus is many full segments, which merging would only copy;
- a build rewrites at most `max_rewrite_rows` live rows (default: one segment's worth): the work of a run stays
  bounded, and merges that do not fit wait for the next run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from embedctl.pipeline.defaults import DEFAULT_SEGMENT_ROWS


@dataclass(frozen=True)
class SegmentState:
    """A segment of the current version, with the deletions this build adds."""

    id: str
    rows: int
    deleted: int

    @property
    def live(self) -> int:
        return self.rows - self.deleted

    @property
    def deleted_share(self) -> float:
        return self.deleted / self.rows if self.rows else 1.0


@dataclass(frozen=True)
class MergePolicy:
    segment_rows: int = DEFAULT_SEGMENT_ROWS  # the most rows a segment holds
    max_deleted: float = 0.2
    per_tier: int = 4
    floor_rows: int = 1000
    max_rewrite_rows: int | None = None  # None: segment_rows

    def tier(self, rows: int) -> int:
        return int(math.log(max(rows, self.floor_rows) / self.floor_rows, self.per_tier) + 1e-9)

    def choose(self, segments: list[SegmentState], new_rows: int, forced: frozenset[str] = frozenset()) -> list[str]:
        """The ids of the segments to rewrite (their live rows join the new rows in new segments).

        `forced`: segments that must be rewritten whatever the policy says (a repair of damaged files)."""
        budget = self.max_rewrite_rows if self.max_rewrite_rows is not None else self.segment_rows
        chosen = [s.id for s in segments if s.id in forced or s.live == 0]
        budget -= sum(s.live for s in segments if s.id in chosen)
        rest = [s for s in segments if s.id not in chosen]
        for s in sorted(rest, key=lambda s: -s.deleted_share):
            if s.deleted_share >= self.max_deleted and s.live <= budget:
                chosen.append(s.id)
                budget -= s.live
        rest = [s for s in rest if s.id not in chosen and s.live < self.segment_rows / 2]
        tiers: dict[int, list[SegmentState]] = {}
        for s in rest:
            tiers.setdefault(self.tier(s.live), []).append(s)
        if new_rows:
            tiers.setdefault(self.tier(new_rows), []).append(SegmentState("", new_rows, 0))
        for tier in sorted(tiers):
            members = sorted(tiers[tier], key=lambda s: s.live)
            if len(members) <= self.per_tier:
                continue
            total = 0
            for s in members:  # the smallest first, the new rows included, within one segment and the budget
                if total + s.live > self.segment_rows or (s.id and s.live > budget):
                    break
                total += s.live
                if s.id:
                    chosen.append(s.id)
                    budget -= s.live
        return chosen
