"""The kernel (`kernel`) with numpy, on the CPU, in sub-chunks of reused float32 scratch buffers.

BF16 has no numpy type: its bits are held as uint16. F16 widens through a table (exact, and faster
than numpy's own conversion, which is a scalar loop on most builds); it narrows with numpy's
conversion, which rounds half to even as the hardware does.

Proving that a chunk holds no NaN or infinity costs a comparison of sums of squares already made
(one more pass with several terms; `_provably_finite`); only a chunk that fails the proof is
scanned element by element, and only there are NaNs given their bits (`kernel.nan_rule`).

The array primitives are numpy's ufuncs with `out=` on the host's arrays (the device is the host:
`to_host` copies nothing). `EXACT` is the same kernel with x86's NaN rule made exact in its
arithmetic, for the few elements whose NaNs a method replays (`kernel`: NaN bits).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from raymerge.ops import native, sparse
from raymerge.ops.kernel import (DEFAULT_NAN, NUMPY_DTYPES, QUIET_BIT, Scratch, Sums, exact_op, f16_to_f32, nan_bits,
                                 nan_rule)


CHUNK = 1 << 18  # elements: 1 MiB float32 rows; the steps of a chain run in L1 blocks (ops/fused.py)
# A geometric method's chunk records a program of 20 to 70 steps and sums several rows in Python
# (0.15 to 0.3 ms a chunk): with 4 MiB rows that is a quarter as often (Method.wide_chunks).
WIDE_CHUNK = 1 << 20
F32_MAX = float(np.finfo(np.float32).max)
# The largest finite value of each output type; a float32 no larger in magnitude rounds to a finite one.
LARGEST: dict[np.dtype, float] = {
    np.dtype(np.uint16): float(np.array(0x7F7F0000, np.uint32).view(np.float32)),  # BF16
    np.dtype(np.float16): float(np.finfo(np.float16).max),
    np.dtype(np.float32): F32_MAX,
    np.dtype(np.float64): F32_MAX,  # acc itself is float32: it must not overflow
}
# The exponent bits of the 16-bit types (BF16 as its uint16 bits): all ones in an infinity or a NaN.
# Testing them is several times faster than numpy's isfinite on float16.
EXPONENT_BITS: dict[np.dtype, np.uint16] = {
    np.dtype(np.uint16): np.uint16(0x7F80), np.dtype(np.float16): np.uint16(0x7C00)}
NAMES: dict[np.dtype, str] = {np.dtype(t): name for name, t in NUMPY_DTYPES.items()}


def _binary(ufunc):
    """A kernel primitive `op(x, y, out)`: the ufunc, into out."""
    def op(self, x, y, out: np.ndarray) -> None:
        ufunc(x, y, out=out)
    return op


def _exact(ufunc):
    """A kernel primitive `op(x, y, out)` with x86's NaN rule made exact (`kernel.exact_op`)."""
    def op(self, x, y, out: np.ndarray) -> None:
        out[:] = exact_op(ufunc, x, _operand(y, x))
    return op


@dataclass(frozen=True, slots=True)
class NumpyKernel:
    name: str = "numpy"

    def scratch(self, chunk: int | None = None, wide: bool = False) -> Scratch:
        chunk = chunk or (WIDE_CHUNK if wide else CHUNK)
        return Scratch(chunk, *(np.empty(chunk, np.float32) for _ in range(5)))

    def view(self, buf: memoryview, dtype: str) -> np.ndarray:
        """A 1-D array over `buf` (no copy); BF16 as its uint16 bits."""
        return np.frombuffer(buf, dtype=NUMPY_DTYPES[dtype])

    def weighted_sum(self, out: np.ndarray, anchor: np.ndarray | None,
                     terms: list[tuple[float, np.ndarray, np.ndarray | None]], scratch: Scratch) -> Sums:
        return weighted_sum(out, anchor, terms, scratch)

    def fused_sum(self, out: np.ndarray, terms: list[tuple[float, np.ndarray]], scratch: Scratch) -> None:
        c = scratch.chunk
        with np.errstate(all="ignore"):
            for lo in range(0, out.size, c):
                acc = out[lo:lo + c]
                acc.fill(0)
                for scale, a in terms:
                    x = scratch.x[:acc.size]
                    _widen(x, a[lo:lo + acc.size])
                    _fma(x, np.float32(scale), acc)
                if not math.isfinite(float(np.dot(acc, acc))):  # maybe a NaN: only then look for them
                    nans = np.flatnonzero(np.isnan(acc))
                    rule = fused_nan_rule([(scale, widened(a[lo + nans])) for scale, a in terms], nans.size)
                    acc.view(np.uint32)[nans] = rule.view(np.uint32)

    # The array primitives (kernel.Kernel).

    def table(self, scratch: Scratch, key: str, rows: int, bits: bool = False) -> np.ndarray:
        t = scratch.staging.get(key)
        if t is None or t.shape[0] < rows:
            t = scratch.staging[key] = np.empty((rows, scratch.chunk), np.uint32 if bits else np.float32)
        return t

    def widen(self, dst: np.ndarray, src: np.ndarray, scratch: Scratch) -> None:
        _widen(dst, src)

    def gather(self, src: np.ndarray, at: np.ndarray | slice) -> np.ndarray:
        return widened(src[at])

    def from_host(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src)

    def put(self, dst: np.ndarray, at: np.ndarray, values) -> None:
        dst[at] = values

    def to_host(self, x: np.ndarray, scratch: Scratch) -> np.ndarray:
        return x

    def copy(self, out: np.ndarray, x: np.ndarray) -> None:
        np.copyto(out, x)

    def fill(self, out: np.ndarray, value: float) -> None:
        out.fill(value)

    # Elementwise float32 arithmetic and comparisons: numpy's ufuncs, each rounded once.
    add, subtract, multiply, divide = (_binary(f) for f in (np.add, np.subtract, np.multiply, np.divide))
    greater, greater_equal, equal = (_binary(f) for f in (np.greater, np.greater_equal, np.equal))
    maximum, minimum = _binary(np.maximum), _binary(np.minimum)

    def absolute(self, x: np.ndarray, out: np.ndarray) -> None:
        np.absolute(x, out=out)

    def reciprocal(self, x: np.ndarray, out: np.ndarray) -> None:
        np.reciprocal(x, out=out)

    def magnitude_bits(self, x: np.ndarray, out: np.ndarray, nans_equal: bool = False) -> np.ndarray:
        return sparse.magnitude_bits(x, out, nans_equal)

    def round_to(self, x: np.ndarray, dtype: str) -> None:
        if dtype == "BF16" and native.takes(x, np.float32):
            native.loops.round_bf16(x)  # the loop below, compiled (raymerge/ops/_native.c): one pass
            return
        # In place, unmasked: a NaN keeps its float32 bits, restored afterwards in the rare chunk that
        # holds one (a masked copy of every element cost as much as the rounding).
        nan = np.isnan(x)
        kept = x[nan] if nan.any() else None
        with np.errstate(all="ignore"):
            if dtype == "F16":  # numpy's conversion rounds half to even, subnormals and overflow included
                np.copyto(x, x.astype(np.float16))
            elif dtype == "BF16":  # add 0x7FFF, plus one when the kept half is odd, then clear the low half
                bits = x.view(np.uint32)
                odd = _bits_scratch(x.size).reshape(x.shape)
                np.right_shift(bits, _SIXTEEN, out=odd)
                np.bitwise_and(odd, _ONE, out=odd)
                odd += _HALF_BELOW
                bits += odd  # a finite value overflows into the infinity's bits, as it should
                bits &= _HIGH_HALF
            else:
                raise ValueError(f"round_to: no rounding to {dtype}")
        if kept is not None:
            x[nan] = kept


_SIXTEEN, _ONE, _HALF_BELOW, _HIGH_HALF = (np.uint32(v) for v in (16, 1, 0x7FFF, 0xFFFF0000))
_THREAD = threading.local()


def _bits_scratch(n: int) -> np.ndarray:
    """A uint32 buffer of n elements: up to a chunk, one reused per thread (round_to is called on
    every chunk); a larger one is not kept."""
    if n > CHUNK:
        return np.empty(n, np.uint32)
    buf = getattr(_THREAD, "bits", None)
    if buf is None:
        buf = _THREAD.bits = np.empty(CHUNK, np.uint32)
    return buf[:n]


NUMPY = NumpyKernel()


@dataclass(frozen=True, slots=True)
class ExactKernel(NumpyKernel):
    """The numpy kernel whose arithmetic gives every NaN x86's rule exactly (`kernel.exact_op`: the
    first NaN operand, quieted; else 0xFFC00000), whatever loop numpy runs. Slow: for the few
    elements whose NaNs a method replays on the host."""

    name: str = "numpy-exact"

    add, subtract, multiply, divide = (_exact(f) for f in (np.add, np.subtract, np.multiply, np.divide))


EXACT = ExactKernel()


def _operand(y, x: np.ndarray) -> np.ndarray:
    """y as a float32 array as long as x: a scalar repeated (exact_op takes the NaNs of arrays)."""
    return y if isinstance(y, np.ndarray) else np.full(x.size, y, np.float32)


def weighted_sum(out: np.ndarray, anchor: np.ndarray | None, terms: list[tuple[float, np.ndarray, np.ndarray | None]],
                 scratch: Scratch) -> Sums:
    """`Kernel.weighted_sum`, chunk by chunk."""
    c = scratch.chunk
    terms32 = [(np.float32(scale), a, b) for scale, a, b in terms]  # torch, too, multiplies by float32(scale)
    margin = _margin(c)
    ss_delta = ss_anchor = 0.0
    nonfinite = new = 0
    with np.errstate(all="ignore"):  # overflows and NaNs are data here
        for lo in range(0, out.size, c):
            sd, sa, bad, fresh = _chunk(out[lo:lo + c], anchor, terms32, scratch, lo, margin)
            ss_delta += sd
            ss_anchor += sa
            nonfinite += bad
            new += fresh
    return Sums(ss_delta, ss_anchor, nonfinite, new)


def _chunk(out: np.ndarray, anchor: np.ndarray | None, terms32: list, scratch: Scratch, lo: int,
           margin: float) -> tuple[float, float, int, int]:
    """Elements lo .. lo + len(out) of `weighted_sum`: their `Sums`, as a plain tuple (cheaper to make)."""
    m = out.size
    acc = scratch.acc[:m]
    sa = 0.0
    if anchor is None:
        acc.fill(0)
    else:
        _widen(acc, anchor[lo:lo + m])
        sa = float(np.dot(acc, acc))
    live = [(scale, a, b, min(m, a.size - lo)) for scale, a, b in terms32 if a.size > lo]  # a term may cover a prefix
    sd = _add_terms(acc, live, scratch, lo)
    # One term or none: |anchor + x| <= sqrt(sa) + sqrt(sd) (up to `_margin`), for free. With several, the change's
    # sum of squares bounds no partial sum: bound the result itself (one more pass).
    root = math.sqrt(sa) + math.sqrt(sd) if len(live) <= 1 else math.sqrt(float(np.dot(acc, acc)))
    proved = _provably_finite(root, margin, LARGEST[out.dtype])
    # Finite sums of squares mean finite operands, so acc holds no NaN (an overflow is an infinity).
    finite = math.isfinite(sa + sd)
    nans = None if finite else np.flatnonzero(np.isnan(acc))
    _narrow(out, acc, scratch.work[:m])
    if nans is not None and nans.size:
        _fix_nans(out, nans, anchor, live, lo)
    if proved:
        return sd, sa, 0, 0
    return (sd, sa, *_count_nonfinite(out, anchor, live, lo, scratch))


def _add_terms(acc: np.ndarray, live: list, scratch: Scratch, lo: int) -> float:
    """acc += scale * (a - b) for each live term, in order; returns the change's sum of squares.

    With several terms the change is also summed in d: the first term is computed there directly,
    which saves clearing and copying a buffer (and pays for the extra pass `_chunk` makes then).
    """
    if not live:  # a cast (an override row), or past every term's prefix
        return 0.0
    several = len(live) > 1
    d = scratch.d[:acc.size]
    for j, (scale, a, b, p) in enumerate(live):
        xp = (d if several and j == 0 else scratch.x)[:p]
        _widen(xp, a[lo:lo + p])
        if b is not None:
            _widen(scratch.y[:p], b[lo:lo + p])
            np.subtract(xp, scratch.y[:p], out=xp)
        if scale != 1.0:  # multiplying by one is exact: skipping it changes no bit
            np.multiply(xp, scale, out=xp)
        np.add(acc[:p], xp, out=acc[:p])
        if several and j == 0:
            d[p:] = 0  # past the first term's prefix
        elif several:
            np.add(d[:p], xp, out=d[:p])
    changed = d if several else xp
    return float(np.dot(changed, changed))


def _fma(x: np.ndarray, scale: np.float32, acc: np.ndarray) -> None:
    """acc = x * scale + acc in float32, rounded once (numpy has no fused multiply-add).

    The product of two float32 is exact in float64; the float64 sum s is off by e, which TwoSum
    finds exactly. Rounding s to float32 is then right, except where s lies exactly halfway between
    two float32 and e != 0: the exact value is on e's side of that tie, and is rounded there.
    """
    p = x.astype(np.float64) * np.float64(scale)
    c = acc.astype(np.float64)
    s = p + c
    v = s - p
    e = (p - (s - v)) + (c - v)
    r = s.astype(np.float32)
    r64 = r.astype(np.float64)
    n = np.nextafter(r, np.where(s > r64, np.float32(np.inf), np.float32(-np.inf)))  # the float32 on s's side
    n64 = n.astype(np.float64)
    tie = (s == (r64 + n64) * 0.5) & (s != r64) & (e != 0)
    acc[:] = np.where(tie & (np.sign(e) == np.sign(n64 - r64)), n, r)


def fused_nan_rule(terms: list[tuple[float, np.ndarray]], n: int) -> np.ndarray:
    """`fused_sum`'s out at n elements where it is NaN, with every NaN's bits fixed: a step
    fma(a, scale, out) on a NaN gives its first NaN operand, in that order, quieted; one that makes a
    NaN from numbers (inf * 0, inf - inf) gives 0xFFC00000. terms: (scale, a at those elements,
    widened exactly). Few elements: cost is no concern here, only the bits."""
    acc = np.zeros(n, np.float32)
    with np.errstate(all="ignore"):
        for scale, a in terms:
            s = np.float32(scale)
            first = np.where(np.isnan(a), a.view(np.uint32), np.where(
                np.isnan(s), s.view(np.uint32), np.where(np.isnan(acc), acc.view(np.uint32), DEFAULT_NAN)))
            _fma(a, s, acc)
            nan = np.isnan(acc)
            acc.view(np.uint32)[nan] = first[nan] | QUIET_BIT
    return acc


def _fix_nans(out: np.ndarray, nans: np.ndarray, anchor: np.ndarray | None, live: list, lo: int) -> None:
    """Give the NaNs of out, at the sorted indices `nans`, the bits `kernel.nan_rule` defines."""
    at = lo + nans
    terms = []
    for scale, a, b, p in live:
        k = int(np.searchsorted(nans, p))  # the NaNs inside the term's prefix: the first k
        terms.append((scale, widened(a[at[:k]]), None if b is None else widened(b[at[:k]]), k))
    acc = nan_rule(None if anchor is None else widened(anchor[at]), terms, nans.size)
    out.view(f"u{out.itemsize}")[nans] = nan_bits(acc, NAMES[out.dtype])


def _margin(n: int) -> float:
    """How far above sqrt(q) an element may lie, q being the float32 dot of n elements with themselves,
    even after one more float32 addition of two such elements.

    The float32 dot of n non-negative squares, in any order of summation, with or without fused
    multiply-adds, is at least (1 - g) times the exact sum, g = n*u / (1 - n*u), u = 2**-24
    (Higham, Accuracy and Stability of Numerical Algorithms, 3.1; n + 1 here, to be generous):
    so |x_i| <= sqrt(q / (1 - g)). One float32 addition (anchor + the one term) adds a relative
    u. The last factor covers the few float64 operations of the check. For the default chunk
    (2**18) the margin is 1.008.
    """
    nu = (n + 1) * 2.0 ** -24
    if nu >= 0.5:  # the bound grows useless; never claim a proof
        return math.inf
    return (1 + 2.0 ** -24) / math.sqrt(1 - nu / (1 - nu)) * (1 + 2.0 ** -40)


def _provably_finite(root: float, margin: float, largest: float) -> bool:
    """Whether every element of acc, at most `margin * root` in magnitude, rounds to a finite output.

    `root` comes from float32 sums of squares (see `_chunk`): a NaN or an infinity in an operand
    makes it non-finite, and so does, with several terms, one in any partial sum of acc (they
    never become finite again); the comparison is then false. Rounding to nearest is monotone, so
    a float32 no larger than the output type's largest finite value rounds to a finite one. The
    `+ 1` covers squares lost to float32 underflow (under 2**-149 each: 2**-60 after the roots).
    """
    return margin * root + 1.0 < largest


def _count_nonfinite(out: np.ndarray, anchor: np.ndarray | None, live: list, lo: int,
                     scratch: Scratch) -> tuple[int, int]:
    """(non-finite outputs, those whose inputs covering them are all finite), element by element.

    Inputs are looked at only where the output is non-finite: a NaN spread over a few elements
    (the usual case) costs little more than one pass over the output.
    """
    where = _where_nonfinite(out, scratch)
    if where.size == 0:
        return 0, 0
    fresh = np.ones(where.size, dtype=bool)
    if anchor is not None:
        fresh &= ~_nonfinite(anchor[lo + where])
    for _scale, a, b, p in live:  # a term covers out's first p elements only
        k = int(np.searchsorted(where, p))  # `where` is sorted: its first k lie inside
        fresh[:k] &= ~_nonfinite(a[lo + where[:k]])
        if b is not None:
            fresh[:k] &= ~_nonfinite(b[lo + where[:k]])
    return where.size, int(np.count_nonzero(fresh))


def _where_nonfinite(out: np.ndarray, scratch: Scratch) -> np.ndarray:
    """The indices of out's infinities and NaNs, tested in scratch's buffers (free once out is written):
    fresh arrays of this size cost more than the test itself."""
    m = out.size
    found = scratch.x.view(np.bool_)[:m]
    mask = EXPONENT_BITS.get(out.dtype)
    if mask is None:
        np.isfinite(out, out=found)
        np.logical_not(found, out=found)
    else:
        bits = scratch.work.view(np.uint16)[:m]
        np.bitwise_and(out.view(np.uint16), mask, out=bits)
        np.equal(bits, mask, out=found)
    return np.flatnonzero(found)


def _nonfinite(x: np.ndarray) -> np.ndarray:
    """Which elements are an infinity or a NaN, in x's own type (an F64 value too large for float32
    is finite: a finite input that the arithmetic cannot hold)."""
    mask = EXPONENT_BITS.get(x.dtype)
    if mask is None:
        return ~np.isfinite(x)
    return (x.view(np.uint16) & mask) == mask


def _widen(dst: np.ndarray, src: np.ndarray) -> None:
    """dst (float32) = src, exactly (rounded once for F64)."""
    if src.dtype == np.uint16:  # BF16: its bits are the high half of a float32's
        bits = dst.view(np.uint32)
        np.copyto(bits, src)
        np.left_shift(bits, 16, out=bits)
    elif src.dtype == np.float16:  # "wrap": no bounds check, every uint16 is an index of the table
        np.take(f16_to_f32(), src.view(np.uint16), out=dst, mode="wrap")
    else:
        np.copyto(dst, src, casting="same_kind")


def widened(src: np.ndarray) -> np.ndarray:
    """A new float32 array of src, widened as `_widen` does."""
    dst = np.empty(src.size, np.float32)
    _widen(dst, src)
    return dst


def _narrow(out: np.ndarray, acc: np.ndarray, work: np.ndarray) -> None:
    """out = acc rounded half to even to out's type; `acc` may be changed. NaNs are `_fix_nans`'s."""
    if native.takes(acc, np.float32) and native.takes(out, np.uint16):
        native.loops.bf16_narrow(acc, out)  # the loop below, compiled (raymerge/ops/_native.c): one pass
        return
    bits = acc.view(np.uint32)
    if out.dtype == np.uint16:  # BF16: add 0x7FFF, plus one when the kept half is odd, then keep the high half
        tmp = work.view(np.uint32)
        np.right_shift(bits, 16, out=tmp)
        np.bitwise_and(tmp, 1, out=tmp)
        np.add(tmp, bits, out=tmp)
        np.add(tmp, 0x7FFF, out=tmp)
        np.right_shift(tmp, 16, out=tmp)
        np.copyto(out, tmp, casting="unsafe")  # faster than a shift that casts as it writes to `out`
        return
    np.copyto(out, acc, casting="same_kind")

