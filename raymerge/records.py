"""What the driver keeps of each finished item: enough to commit it, to resume it and to report
on it. Workers make them, the journal stores them, resume and the commit hand them to the writer,
the statistics read them. Neutral ground: execution and commit both import it, neither the other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from raymerge.planning.plan import Plan
from raymerge.storage.writers import Span, StagedItem


class TensorSums(NamedTuple):
    """One tensor's share of an item: sums of squares of the change and of the anchor, and its
    non-finite output elements (all of them, and those whose inputs were all finite)."""

    tensor: int
    ss_delta: float
    ss_anchor: float
    nonfinite: int = 0
    new_nonfinite: int = 0


@dataclass(frozen=True, slots=True)
class ItemRecord:
    item: int
    crc32: int  # of the item's output bytes
    etag: str | None  # S3 part ETag
    sums: tuple[TensorSums, ...] = ()


def staged_items(plan: Plan, shard: int, done: dict[int, ItemRecord]) -> list[StagedItem]:
    """What the writer is told of a shard's finished items, in the shard's order (resume and commit)."""
    items = (plan.items[i] for i in plan.shards[shard].items if i in done)
    return [StagedItem(it.id, Span(it.part, it.start, it.end), done[it.id].crc32, done[it.id].etag) for it in items]
