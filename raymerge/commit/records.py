"""What the driver keeps of each finished item: enough to commit it, to resume it and to report
on it. Workers make them, the journal stores them, the commit and the statistics read them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


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
