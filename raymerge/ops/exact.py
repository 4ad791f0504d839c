"""Exact sums of products of float32 values, independent of how a tensor is cut into pieces: the
reductions of the geometric methods (norms, dot products), taken on the host.

A product of two float32 values is exact in float64 (24 + 24 significant bits), and no smaller
than 2**-298 unless zero. Split into a high part (its first 24 bits) and a low part (the rest, at
most 24 bits), each part is a multiple of its own binade's ulp below 2**24 ulps: fewer than 2**29
of them in one binade sum exactly in float64. So `dot_sum` makes one weighted count per float64
exponent and part (numpy's bincount), and adds those up as Python integers: a count of 2**-298.
Sums of any pieces then add up exactly (`ExactSum.__add__`), and `to_float32` rounds once.
The conversion to a Python integer waits until the sum is needed whole (a piece's result).

Infinities and NaNs are counted instead (a NaN product, or +inf with -inf, makes the sum NaN).

The bucket sums are made by the compiled loop of raymerge/ops/_native.c where it was built, else by
numpy. The loop adds narrow products a block at a time, each block's sum exact in float64 and split
into parts of 24 bits: other buckets, the same total (all a sum reads of them), and at most two
parts a product, as numpy's split makes.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from raymerge.ops import native

UNIT = 298  # a sum is a count of 2**-UNIT: the smallest product of two float32 subnormals
_LOW_BITS = np.uint64((1 << 29) - 1)  # the float64 mantissa bits below a product's first 24
_EXPONENTS = 2048  # float64 exponent values; 2047: infinities and NaNs (a bucket per sign and exponent)
MAX_ELEMENTS = 1 << 29
_LANES, _LANE_PAD = 8, 24  # the compiled loop's bucket sets, and float64s between two (raymerge/ops/_native.c)
_SPECIALS = 2 * _EXPONENTS  # in lane 0's padding: a program's counts of +inf, -inf and NaN products
_THREAD = threading.local()


class ExactSum:
    """A sum of products, exactly: the finite part as a count of 2**-UNIT, and the infinities and
    NaNs met (which make the sum infinite or NaN, as any float sum would).

    `dot_sum`'s result keeps its per-exponent float64 sums (`buckets`) instead of the count, and
    adding two such adds the arrays: a part in binade [2**e, 2**(e+1)) has at most 24 significant
    bits, so it is a multiple of 2**(e-23), and fewer than 2**29 of them (MAX_ELEMENTS, counted in
    `parts`) add up exactly in float64's 53 bits. The count is made when it is first needed
    (`units`): once per piece instead of once per chunk."""

    __slots__ = ("_units", "_buckets", "_parts", "pinf", "ninf", "nan")

    def __init__(self, units: int = 0, pinf: int = 0, ninf: int = 0, nan: int = 0,
                 buckets: np.ndarray | None = None, parts: int = 0) -> None:
        self._units, self._buckets, self._parts = units, buckets, parts
        self.pinf, self.ninf, self.nan = pinf, ninf, nan

    @property
    def units(self) -> int:
        """The finite part, a count of 2**-UNIT (the buckets made into it now, once)."""
        if self._buckets is not None:
            b = self._buckets
            self._units += sum(int(math.ldexp(v, UNIT)) for v in b[np.flatnonzero(b)].tolist())
            self._buckets, self._parts = None, 0
        return self._units

    def __add__(self, other: ExactSum) -> ExactSum:
        specials = (self.pinf + other.pinf, self.ninf + other.ninf, self.nan + other.nan)
        mine, theirs = self._buckets, other._buckets
        if mine is None or theirs is None:  # keep the one array (never written to once made)
            return ExactSum(self._units + other._units, *specials, theirs if mine is None else mine,
                            self._parts + other._parts)
        if self._parts + other._parts < MAX_ELEMENTS:
            return ExactSum(self._units + other._units, *specials, mine + theirs, self._parts + other._parts)
        return ExactSum(self.units + other.units, *specials)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExactSum) and (self.units, self.pinf, self.ninf, self.nan) == \
            (other.units, other.pinf, other.ninf, other.nan)

    def __repr__(self) -> str:
        return f"ExactSum({self.units}, {self.pinf}, {self.ninf}, {self.nan})"

    def special(self) -> float | None:
        """The sum's value when an infinity or a NaN decides it, else None."""
        if self.nan or (self.pinf and self.ninf):
            return math.nan
        if self.pinf or self.ninf:
            return math.inf if self.pinf else -math.inf
        return None

    def to_float32(self) -> np.float32:
        """The sum rounded once to float32 (to nearest, ties to even)."""
        s = self.special()
        return np.float32(s) if s is not None else round_float32(self.units, -UNIT)

    def sqrt_float32(self) -> np.float32:
        """The square root of the sum (a sum of squares: not negative), rounded once to float32."""
        s = self.special()
        if s is not None:
            return np.float32(math.sqrt(s) if s >= 0 or math.isnan(s) else math.nan)
        if self.units < 0:
            return np.float32(math.nan)
        shift = max(0, 2 * 64 - self.units.bit_length()) & ~1  # even: the root of a 2**shift scaling is exact
        scaled = self.units << shift
        root = math.isqrt(scaled)
        sticky = root * root != scaled  # the root is not exact: below the kept bits, something is left
        return round_float32(root * 2 + sticky, -(UNIT + shift) // 2 - 1)

    def to_json(self) -> list:
        return [str(self.units), self.pinf, self.ninf, self.nan]

    @classmethod
    def from_json(cls, x: list) -> ExactSum:
        units, pinf, ninf, nan = x
        return cls(int(units), int(pinf), int(ninf), int(nan))


def round_float32(n: int, exponent: int) -> np.float32:
    """n * 2**exponent rounded once to float32, to nearest, ties to even (n may be negative)."""
    sign, n = (-1.0 if n < 0 else 1.0), abs(n)
    if n == 0:
        return np.float32(0.0)
    drop = max(0, n.bit_length() - 53)
    kept = n >> drop
    if kept << drop != n:
        kept |= 1  # round to odd at 53 bits: the one rounding to float32 below is then correct
    with np.errstate(over="ignore"):
        return np.float32(sign * math.ldexp(float(kept), exponent + drop))


def dot_sum(x: np.ndarray, y: np.ndarray, work: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
            narrow: bool = False) -> ExactSum:
    """The exact sum of x * y over float32 arrays of one length (x is y for a sum of squares),
    fewer than MAX_ELEMENTS. `work`: two float64 buffers and an int64 one as long as x (reused).
    `narrow`: x and y hold values of at most 12 significant bits (BF16's, F16's; y may be 1.0), so
    a product has at most 24: it is summed whole, without the split (twice as fast)."""
    n = x.size
    if n >= MAX_ELEMENTS:
        raise ValueError(f"dot_sum: at most {MAX_ELEMENTS} elements at once")
    buckets = _native_buckets(x, y, narrow)
    if buckets is None:
        buckets = _numpy_buckets(x, y, work, narrow)
    return _summed(buckets, x, y, 2 * n)  # parts: two a product at most (split, or a block's)


def dot_sum_pair(x: np.ndarray, y: np.ndarray) -> tuple[ExactSum, ExactSum]:
    """(dot_sum(x, 1, narrow=True), dot_sum(x, y, narrow=True)) in one compiled loop where it was
    built: a sum and what a mask y (1.0 and 0.0) keeps of it, x's values of at most 24 significant
    bits (magnitudes of float32 values)."""
    if x.size >= MAX_ELEMENTS:
        raise ValueError(f"dot_sum_pair: at most {MAX_ELEMENTS} elements at once")
    pair = getattr(native.loops, "dot_buckets_pair", None)
    if pair is None or not (native.takes(x, np.float32) and native.takes(y, np.float32) and y.shape == x.shape):
        return dot_sum(x, np.float32(1), narrow=True), dot_sum(x, y, narrow=True)
    lanes = _lanes(2)
    pair(x, y, lanes[0], lanes[1])
    ones = np.float32(1)
    return _summed(_collapsed(lanes[0]), x, ones, 2 * x.size), _summed(_collapsed(lanes[1]), x, y, 2 * x.size)


def _summed(buckets: np.ndarray, x: np.ndarray, y: np.ndarray | np.float32, parts: int) -> ExactSum:
    """The ExactSum of x * y from its bucket sums: the infinities and NaNs among the products
    counted apart, where the all-ones exponent's buckets say there are any."""
    special = buckets[_EXPONENTS - 1::_EXPONENTS]  # the all-ones exponent, of either sign
    if not special.any():  # no infinity or NaN (a NaN is not 0 either)
        return ExactSum(buckets=buckets, parts=parts)
    special[:] = 0
    with np.errstate(invalid="ignore", over="ignore"):
        p = x.astype(np.float64) * y
    pinf, ninf = int(np.count_nonzero(p == np.inf)), int(np.count_nonzero(p == -np.inf))
    return ExactSum(0, pinf, ninf, int(np.count_nonzero(np.isnan(p))), buckets, parts)


def _native_buckets(x: np.ndarray, y: np.ndarray | np.float32, narrow: bool) -> np.ndarray | None:
    """dot_sum's bucket sums by the compiled loop, or None where it is not built or does not take
    these operands (float32, contiguous; y an array of x's length, or the number 1)."""
    ones = not isinstance(y, np.ndarray) and np.ndim(y) == 0 and y == 1
    if not native.takes(x, np.float32) or not (ones or (native.takes(y, np.float32) and y.shape == x.shape)):
        return None
    lanes = _lanes(1)[0]
    native.loops.dot_buckets(x, None if ones else y, lanes, narrow)
    return _collapsed(lanes)


class Lanes:
    """k exact sums that programs add products to block by block (ops.fused.Program.sum), over the
    chunks of a piece: a set of the compiled loop's bucket lanes each, read once (`sums`). A set
    takes at most MAX_ELEMENTS // 4 products between two `settle`s, so that each bucket sums
    exactly (at most three parts of a block of 64 products go to one bucket); the infinite and NaN
    products are counted in lane 0's padding (_native.c's SPECIALS)."""

    def __init__(self, k: int) -> None:
        self.lanes = np.zeros((k, _LANES, 2 * _EXPONENTS + _LANE_PAD))
        self._made = [ExactSum()] * k  # the sums settled, and those made apart (`add`)
        self._elements = [0] * k  # the products each set took since the last settle

    def takes(self, j: int, n: int) -> bool:
        """Whether set j takes n more products before the next `settle`."""
        return self._elements[j] + n <= MAX_ELEMENTS // 4

    def added(self, j: int, n: int) -> None:
        """A program adds n products to set j."""
        self._elements[j] += n

    def add(self, j: int, s: ExactSum) -> None:
        """Sum j plus s (made apart: a step a program did not record)."""
        self._made[j] += s

    def settle(self) -> None:
        """What the lanes hold, moved into the sums (no program may be adding to them)."""
        if any(self._elements):
            self._made = self.sums()
            self.lanes.fill(0)
            self._elements = [0] * len(self._elements)

    def sums(self) -> list[ExactSum]:
        """The k sums, once every program adding to them has run."""
        out = []
        for lanes, made, n in zip(self.lanes, self._made, self._elements):
            pinf, ninf, nan = (int(c) for c in lanes[0, _SPECIALS:_SPECIALS + 3])
            out.append(made + ExactSum(0, pinf, ninf, nan, _collapsed(lanes), 2 * n) if n else made)
        return out


def _collapsed(lanes: np.ndarray) -> np.ndarray:
    """One set of bucket sums from the compiled loop's lanes (their padding left out); exact: each
    bucket holds at most one part a product, fewer than 2**29 in all (MAX_ELEMENTS)."""
    return lanes[:, :2 * _EXPONENTS].sum(axis=0)


def _lanes(k: int) -> np.ndarray:
    """k sets of the compiled loop's bucket lanes, zeros (this thread's, reused)."""
    lanes = getattr(_THREAD, "lanes", None)
    if lanes is None or len(lanes) < k:
        lanes = _THREAD.lanes = np.empty((k, _LANES, 2 * _EXPONENTS + _LANE_PAD))
    lanes = lanes[:k]
    lanes.fill(0)  # before, not after: an interrupted call leaves nothing behind for the next
    return lanes


def _numpy_buckets(x: np.ndarray, y: np.ndarray | np.float32, work: tuple | None, narrow: bool) -> np.ndarray:
    """dot_sum's bucket sums by numpy: products, split unless narrow, counted by bincount."""
    n = x.size
    product, high, exponent = work or (np.empty(n, np.float64), np.empty(n, np.float64), np.empty(n, np.int64))
    product, high, exponent = product[:n], high[:n], exponent[:n]
    with np.errstate(invalid="ignore", over="ignore"):
        np.multiply(x, y, out=product, dtype=np.float64)  # exact
        if not narrow:
            np.bitwise_and(product.view(np.uint64), ~_LOW_BITS, out=high.view(np.uint64))
            np.subtract(product, high, out=product)  # the low part, exact (NaN where the product is not finite)
    buckets = None
    for part in (product,) if narrow else (high, product):  # a high part and a low part share buckets
        # sign and exponent: negative parts have buckets of their own (no mask to pay for)
        np.right_shift(part.view(np.uint64), 52, out=exponent.view(np.uint64))
        sums = np.bincount(exponent, weights=part, minlength=2 * _EXPONENTS)
        buckets = sums if buckets is None else np.add(buckets, sums, out=buckets)
    return buckets
