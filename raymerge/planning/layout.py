"""Output layout: which tensors go in which shard, the exact header bytes, and the work items.

Pure functions on plain numbers; the planner turns their results into plan dataclasses.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from raymerge.planning.plan import HEADER, Piece
from raymerge.safetensors.header import serialize_header
from raymerge.safetensors.index import shard_name


@dataclass(frozen=True, slots=True)
class Slot:
    """A tensor placed in a shard: absolute byte range [start, start + nbytes) and element size.
    `unit`: the bytes an item boundary inside it is a multiple of (from its start): an element's by
    default, a row's for a method that needs whole rows in a piece (`Method.whole_rows`)."""

    start: int
    nbytes: int
    itemsize: int
    unit: int = 0

    @property
    def step(self) -> int:
        return self.unit or self.itemsize


def split_into_shards(sizes: list[int], max_shard_size: int) -> list[list[int]]:
    """Group tensor indices into shards of at most `max_shard_size` bytes, keeping their order.

    raymerge's rule: one pass in tensor order; a tensor larger than the limit gets a shard of its
    own, and a new shard starts whenever the next tensor would not fit. With a 5 GB limit, tensors
    of 6, 6, 2, 6, 2, 2 GB give [6], [6], [2], [6], [2, 2]: every shard holds consecutive tensors.
    Hugging Face's `split_state_dict_into_shards_factory` differs: it gives an oversized tensor a
    shard of its own without closing the shard being filled, which then takes tensors from both
    sides of it: [6], [6], [6], [2, 2], [2] (tests/planning/test_layout.py checks both rules, the
    other one on the installed huggingface_hub).
    """
    shards: list[list[int]] = []
    current: list[int] = []
    current_size = 0
    for i, size in enumerate(sizes):
        if size > max_shard_size:
            if current:
                shards.append(current)
                current, current_size = [], 0
            shards.append([i])
            continue
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(i)
        current_size += size
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(n: int) -> list[str]:
    return [shard_name(i, n) for i in range(n)]


def layout_shard(tensors: list[tuple[str, str, tuple[int, ...], int]]) -> tuple[bytes, list[int]]:
    """Header bytes and each tensor's absolute start for (name, dtype, shape, nbytes), packed in order."""
    entries, pos = [], 0
    for name, dtype, shape, nbytes in tensors:
        entries.append((name, dtype, shape, pos, pos + nbytes))
        pos += nbytes
    header = serialize_header(entries)
    return header, [len(header) + begin for _, _, _, begin, _ in entries]


def cut_points(size: int, header_len: int, slots: list[Slot], item_size: int) -> list[int]:
    """Item boundaries in [0, size]: every `item_size` bytes, moved up to the next element (or row:
    `Slot.unit`) boundary.

    Rounding up (never down) keeps every item but the last at least `item_size` bytes, which is
    what S3 asks of multipart parts.
    """
    starts = [s.start for s in slots]
    cuts, pos = [0], 0
    while size - pos > item_size:
        c = pos + item_size
        if c >= header_len:
            j = bisect.bisect_right(starts, c) - 1
            s = slots[j]
            c = min(s.start + -(-(c - s.start) // s.step) * s.step, s.start + s.nbytes)
        if c >= size:
            break
        cuts.append(c)
        pos = c
    cuts.append(size)
    return cuts


def pieces_of(start: int, end: int, header_len: int, slots: list[Slot], first: int) -> tuple[Piece, ...]:
    """The header bytes and tensor elements inside bytes [start, end) of a shard.

    `slots` are the shard's tensors in byte order; `first` is the plan index of slots[0].
    """
    pieces = []
    if start < header_len:
        pieces.append(Piece(HEADER, start, min(end, header_len)))
    j = max(bisect.bisect_right([s.start for s in slots], start) - 1, 0)
    for k in range(j, len(slots)):
        s = slots[k]
        if s.start >= end:
            break
        lo, hi = max(start, s.start), min(end, s.start + s.nbytes)
        if lo < hi:
            pieces.append(Piece(first + k, (lo - s.start) // s.itemsize, (hi - s.start) // s.itemsize))
    return tuple(pieces)
