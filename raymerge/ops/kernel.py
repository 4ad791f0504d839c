"""The float32 weighted sum on the CPU, with numpy, in sub-chunks of reused scratch buffers.

    acc = anchor (or 0);  for each (scale, a, b) in order: acc += scale * (a - b);  out = round(acc)

Each step is a separate float32 operation (no fused multiply-add), so the bits match any
reference that does the same arithmetic in float32 (torch's, mergekit's), whatever the chunking
or item size. A term shorter than `out` applies to out's first elements only (rows shared by all
inputs).

Why numpy and not torch: importing torch costs every worker about 1.8 s of start-up on a 2-core
machine (a quarter of a whole 1.5 GB merge), while every Ray worker has numpy loaded already.
torch stays for the GPU and for FP8, which numpy has no types for (`torch_kernel`).

BF16 has no numpy type either: its bits are held as uint16. Widening to float32 is a 16-bit
shift (exact); narrowing rounds half to even on the bits, and makes every NaN 0xFFFF, exactly as
torch's conversion does.
"""

from __future__ import annotations

import math

import numpy as np

NUMPY_DTYPES: dict[str, type] = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}

CHUNK = 1 << 16  # elements: the float32 chunks stay in a core's L2 cache
QUIET_BIT = 0x00400000  # of a float32 NaN


def supports(dtype: str) -> bool:
    return dtype in NUMPY_DTYPES


class Scratch:
    """Float32 work buffers, allocated once per worker thread and reused for every item."""

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        # acc: the sum; x, y: a term's operands; d: the change, with several terms; work: rounding
        self.acc, self.x, self.y, self.d, self.work = (np.empty(chunk, np.float32) for _ in range(5))


def view(buf: memoryview, dtype: str) -> np.ndarray:
    """A 1-D array over `buf` (no copy); BF16 as its uint16 bits."""
    return np.frombuffer(buf, dtype=NUMPY_DTYPES[dtype])


def weighted_sum(out: np.ndarray, anchor: np.ndarray | None, terms: list[tuple[float, np.ndarray, np.ndarray | None]],
                 scratch: Scratch) -> tuple[float, float]:
    """Write `round(anchor + sum(scale * (a - b)))` into `out` (1-D arrays from `view`).

    Returns the sums of squares of the applied change `sum(scale * (a - b))` and of the anchor (in
    float32): the per-tensor statistics chat-vector users look at. They also tell, for free,
    whether a chunk holds a NaN or an infinity: only then does rounding need its slow NaN pass.
    """
    c = scratch.chunk
    terms32 = [(np.float32(scale), a, b) for scale, a, b in terms]  # torch, too, multiplies by float32(scale)
    ss_delta = ss_anchor = 0.0
    with np.errstate(all="ignore"):  # overflows and NaNs are data here, rounded as torch rounds them
        for lo in range(0, out.size, c):
            sd, sa = _chunk(out[lo:lo + c], anchor, terms32, scratch, lo)
            ss_delta += sd
            ss_anchor += sa
    return ss_delta, ss_anchor


def _chunk(out: np.ndarray, anchor: np.ndarray | None, terms32: list, scratch: Scratch, lo: int) -> tuple[float, float]:
    """Elements lo .. lo + len(out) of `weighted_sum`: their sums of squares of change and anchor."""
    m = out.size
    acc, x, y, d = scratch.acc[:m], scratch.x[:m], scratch.y[:m], scratch.d[:m]
    sa = sd = 0.0
    if anchor is None:
        acc.fill(0)
    else:
        _widen(acc, anchor[lo:lo + m])
        sa = float(np.dot(acc, acc))
    live = [(scale, a, b, min(m, a.size - lo)) for scale, a, b in terms32 if a.size > lo]  # a term may cover a prefix
    for j, (scale, a, b, p) in enumerate(live):
        xp = x[:p]
        _widen(xp, a[lo:lo + p])
        if b is not None:
            _widen(y[:p], b[lo:lo + p])
            np.subtract(xp, y[:p], out=xp)
        if scale != 1.0:  # multiplying by one is exact: skipping it changes no bit
            np.multiply(xp, scale, out=xp)
        np.add(acc[:p], xp, out=acc[:p])
        if len(live) == 1:
            sd = float(np.dot(xp, xp))
        elif j == 0:
            d.fill(0)
            d[:p] = xp
        else:
            np.add(d[:p], xp, out=d[:p])
    if len(live) > 1:
        sd = float(np.dot(d, d))
    # Finite sums of squares mean finite operands, so acc holds no NaN (an overflow is an infinity).
    _narrow(out, acc, scratch.work[:m], finite=math.isfinite(sa + sd))
    return sd, sa


def _widen(dst: np.ndarray, src: np.ndarray) -> None:
    """dst (float32) = src, exactly (rounded once for F64)."""
    if src.dtype == np.uint16:  # BF16: its bits are the high half of a float32's
        bits = dst.view(np.uint32)
        np.copyto(bits, src)
        np.left_shift(bits, 16, out=bits)
    else:
        np.copyto(dst, src, casting="same_kind")


def _narrow(out: np.ndarray, acc: np.ndarray, work: np.ndarray, finite: bool) -> None:
    """out = acc rounded half to even to out's type, with torch's NaNs; `acc` may be changed."""
    bits = acc.view(np.uint32)
    if out.dtype == np.uint16:  # BF16: add 0x7FFF, plus one when the kept half is odd, then keep the high half
        tmp = work.view(np.uint32)
        np.right_shift(bits, 16, out=tmp)
        np.bitwise_and(tmp, 1, out=tmp)
        np.add(tmp, bits, out=tmp)
        np.add(tmp, 0x7FFF, out=tmp)
        np.right_shift(tmp, 16, out=tmp)
        np.copyto(out, tmp, casting="unsafe")  # faster than a shift that casts as it writes to `out`
        if not finite:
            out[np.isnan(acc)] = 0xFFFF
        return
    if not finite and out.dtype == np.float16:  # torch quiets a signalling NaN as it narrows; numpy keeps it
        nan = np.isnan(acc)
        bits[nan] |= QUIET_BIT
    np.copyto(out, acc, casting="same_kind")
