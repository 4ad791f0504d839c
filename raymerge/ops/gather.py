"""A vocabulary tensor's elements gathered by row (planning.plan.RowMap), on the host: the byte
ranges an element range needs, and the bytes assembled from them in the Source's dtype.

A copied row is cast to that dtype as torch's `.to()` casts (half to even); a mean row is
mergekit's `embed = zeros; embed = embed + row_i ...; embed /= count` in that dtype: each
operation in float32, rounded to it (torch's CPU arithmetic on bfloat16 and float16).

Rows past a map's `mean_of` (mergekit's pad_to_multiple_of) are `torch.mean(rows[:mean_of], dim=0)`:
`ColumnMean`, fed every earlier row in order by the one worker that needs it (so it does not
depend on items), sums each column in torch's CPU order (a cascade of float32 partial sums) and
divides in float32, rounded once to the dtype.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

import numpy as np

from raymerge.ops.numpy_kernel import NumpyKernel, widened
from raymerge.planning.plan import Source
from raymerge.ops.kernel import NUMPY_DTYPES, nan_bits
from raymerge.safetensors.dtypes import ITEMSIZE

_K = NumpyKernel()


def _overlaps(src: Source, begin: int, end: int) -> Iterator[tuple[int, int, int, tuple]]:
    """(lo, hi, run's first element, parts) of each run over elements [begin, end)."""
    rm = src.rows
    n = rm.row_elements
    first = max(bisect.bisect_right([r[0] for r in rm.runs], begin // n) - 1, 0)
    for row, count, parts in rm.runs[first:]:
        if row * n >= end:
            return
        lo, hi = max(begin, row * n), min(end, (row + count) * n)
        if lo < hi:
            yield lo, hi, row * n, parts


def _range(part: tuple[int, int, str], at: int, lo: int, hi: int) -> tuple[int, tuple[int, int]]:
    """(file, byte range) of elements [lo, hi) of a run starting at element `at`, in `part`."""
    file, start, dtype = part
    size = ITEMSIZE[dtype]
    return file, (start + (lo - at) * size, start + (hi - at) * size)


def reads(src: Source, begin: int, end: int) -> list[tuple[int, tuple[int, int]]]:
    """Every (file, byte range) that elements [begin, end) of a gathered source read."""
    return [_range(part, at, lo, hi) for lo, hi, at, parts in _overlaps(src, begin, end) for part in parts]


def pads(src: Source, end: int) -> bool:
    """Whether elements before `end` of a gathered source reach its mean rows."""
    return src.rows.mean_of is not None and end > src.rows.mean_of * src.rows.row_elements


def assemble(src: Source, begin: int, end: int, fetch: Callable[[int, tuple[int, int]], memoryview],
             mean: np.ndarray | None = None) -> memoryview:
    """Elements [begin, end) of a gathered source as bytes of its dtype; `fetch(file, range)`:
    the bytes `reads` named; `mean`: the mean row (of the dtype) where they reach it (`pads`)."""
    out = np.zeros(end - begin, NUMPY_DTYPES[src.dtype])
    if pads(src, end):  # every column's mean, from element lo's column on, repeated
        lo = max(begin, src.rows.mean_of * src.rows.row_elements)
        out[lo - begin:] = np.resize(np.roll(mean, -(lo % src.rows.row_elements)), end - lo)
    for lo, hi, at, parts in _overlaps(src, begin, end):
        dst = out[lo - begin:hi - begin]
        if len(parts) == 1:
            _cast(dst, _K.view(fetch(*_range(parts[0], at, lo, hi)), parts[0][2]), src.dtype)
        elif parts:
            acc = np.zeros(hi - lo, np.float32)
            for part in parts:
                row = widened(_K.view(fetch(*_range(part, at, lo, hi)), part[2]))
                if part[2] != src.dtype:
                    _round(row, src.dtype)  # cast to the gather's dtype first, as every model is
                acc += row
                _round(acc, src.dtype)
            acc /= np.float32(len(parts))
            _round(acc, src.dtype)
            _cast(dst, acc, src.dtype, arithmetic=True)
    return memoryview(out.view(np.uint8))


def as_float32(mem: memoryview, dtype: str) -> np.ndarray:
    """Assembled bytes of `dtype` as float32 values (exact: every gather dtype widens exactly)."""
    x = _K.view(mem, dtype)
    return x if dtype == "F32" else widened(x)


def _round(x: np.ndarray, dtype: str) -> None:
    if dtype in ("BF16", "F16"):
        _K.round_to(x, dtype)


def _cast(dst: np.ndarray, src: np.ndarray, dtype: str, arithmetic: bool = False) -> None:
    """dst (of `dtype`) = src, rounded half to even where it narrows; a NaN gets the bits torch
    gives it: a conversion's (kernel.nan_bits), or where `arithmetic` (a bfloat16 operation's
    result) the quiet NaN 0x7FC0."""
    if src.dtype == dst.dtype:
        np.copyto(dst, src)
        return
    wide = src if src.dtype == np.float32 else widened(src)
    if dtype == "BF16":
        wide = wide.copy() if wide is src else wide
        _K.round_to(wide, "BF16")
        np.copyto(dst, (wide.view(np.uint32) >> 16).astype(np.uint16))
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            np.copyto(dst, wide, casting="unsafe")
    nan = np.isnan(wide)
    if nan.any():
        bits = dst.view(f"u{dst.itemsize}")
        bits[nan] = 0x7FC0 if arithmetic and dtype == "BF16" else nan_bits(wide[nan], dtype)


class _Cascade:
    """torch's CPU sum of a column's values in order (its `multi_row_sum`), in float32, over
    `width` columns at once: values are added one by one into level 0 in blocks of 2**power
    (power = max(4, ceil(log2(rows)) // 4)); after a block, level 0 is added into level 1, and that
    into the next while the count so far is a multiple of the level's span; values past the last
    whole block go into level 0; the levels are added up last."""

    LEVELS = 4

    def __init__(self, rows: int, width: int) -> None:
        self.rows, self.seen = rows, 0
        self.power = max(4, (rows - 1).bit_length() // self.LEVELS if rows > 1 else 0)
        self.step = 1 << self.power
        self.acc = np.zeros((self.LEVELS, width), np.float32)

    def add(self, x: np.ndarray) -> None:
        """The next values (float32, (k, width)); every call but the last a whole number of blocks."""
        if self.seen % self.step:
            raise ValueError("ColumnMean: rows fed past a partial block")
        whole = x.shape[0] // self.step * self.step
        for at in range(0, whole, self.step):
            self.acc[0] += np.add.reduce(x[at:at + self.step], axis=0)  # value after value, as level 0
            self.seen += self.step
            for j in range(1, self.LEVELS):
                self.acc[j] += self.acc[j - 1]
                self.acc[j - 1] = 0
                if self.seen & ((self.step - 1) << (j * self.power)):
                    break
        if whole < x.shape[0]:
            self.acc[0] += np.add.reduce(x[whole:], axis=0)
            self.seen += x.shape[0] - whole

    def result(self) -> np.ndarray:
        if self.seen != self.rows:
            raise ValueError(f"ColumnMean: {self.seen} rows fed of {self.rows}")
        total = self.acc[0].copy()
        for j in range(1, self.LEVELS):
            total += self.acc[j]
        return total


class ColumnMean:
    """`torch.mean(x, dim=0)` of a (rows, width) float tensor on the CPU, fed x's rows in order:
    the column sums in torch's order, divided in float32 and rounded once to the dtype.

    torch's outer-dimension sum takes the columns 32 at a time (four vectors of eight floats),
    each column one `_Cascade` over the rows. The columns past the last 32 (a width not a multiple
    of 32) are each summed as torch's `row_sum` sums: four interleaved cascades (rows 4i + k) over
    rows // 4 rows each, the last rows % 4 rows added to the first, then the other three added to
    it in turn. A width under 8 is summed as the 32s are. (Checked bit for bit against torch 2.x
    on this x86 machine for widths from 4 to 1000 and bfloat16, float16 and float32:
    tests/ops/test_gather.py. Another CPU's vector width may group other columns.)"""

    GROUP, VECTOR, ILP = 32, 8, 4

    def __init__(self, rows: int, width: int) -> None:
        self.rows, self.width = rows, width
        self.split = width if width < self.VECTOR else width // self.GROUP * self.GROUP
        self.main = _Cascade(rows, self.split)
        self.rest = [_Cascade(rows // self.ILP, width - self.split) for _ in range(self.ILP)]
        self.left = np.zeros((0, width - self.split), np.float32)  # the last rows % 4 rows
        self.step = max(self.main.step, self.ILP * self.rest[0].step)
        self.seen = 0

    def add(self, x: np.ndarray) -> None:
        """The next rows (float32, (k, width)); every call but the last a whole number of `step`s."""
        if self.seen % self.step:
            raise ValueError("ColumnMean: rows fed past a partial block")
        self.main.add(x[:, :self.split])
        if self.split < self.width:
            rest = x[:, self.split:]
            interleaved = min(rest.shape[0], self.rows // self.ILP * self.ILP - self.seen)
            grouped = rest[:interleaved].reshape(-1, self.ILP, rest.shape[1])
            for k, cascade in enumerate(self.rest):
                cascade.add(grouped[:, k, :])
            self.left = np.concatenate([self.left, rest[interleaved:]])
        self.seen += x.shape[0]

    def result(self, dtype: str) -> np.ndarray:
        """The mean row, of `dtype`."""
        total = np.empty(self.width, np.float32)
        total[:self.split] = self.main.result()
        if self.split < self.width:
            first = self.rest[0].result()
            for row in self.left:
                first += row
            for cascade in self.rest[1:]:
                first += cascade.result()
            total[self.split:] = first
        with np.errstate(invalid="ignore", over="ignore"):
            total /= np.float32(self.rows)
        out = np.empty(total.size, NUMPY_DTYPES[dtype])
        _cast(out, total, dtype)  # a float32 sum converted: a NaN gets the conversion's bits
        return out
