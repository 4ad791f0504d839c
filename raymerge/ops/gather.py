"""A vocabulary tensor's elements gathered by row (planning.plan.RowMap), on the host: the byte
ranges an element range needs, and the bytes assembled from them in the Source's dtype.

A copied row is cast to that dtype as torch's `.to()` casts (half to even); a mean row is
mergekit's `embed = zeros; embed = embed + row_i ...; embed /= count` in that dtype: each
operation in float32, rounded to it (torch's CPU arithmetic on bfloat16 and float16).
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


def assemble(src: Source, begin: int, end: int, fetch: Callable[[int, tuple[int, int]], memoryview]) -> memoryview:
    """Elements [begin, end) of a gathered source as bytes of its dtype; `fetch(file, range)`:
    the bytes `reads` named."""
    out = np.zeros(end - begin, NUMPY_DTYPES[src.dtype])
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
