"""The float32 primitives of the sparsifying methods (TIES, DARE), with numpy, exact and
independent of how a tensor is cut into pieces.

- Magnitudes as bits: |x| of a float32 is monotone in its bit pattern with the sign bit cleared.
  The selection ranks every NaN's magnitude as NAN_MAGNITUDE, just above +inf's: NaNs rank above
  every number and equal to each other, as in torch's descending sort, whatever payload the
  hardware gave them. A radix selection finds the k-th largest from a histogram of the high 16 bits
  (`high_histogram`, which counts every NaN in NAN_MAGNITUDE's bin), then of the low 16 bits inside
  the one high bin that holds it (`low_histogram`). Only there, and where the threshold is
  NAN_MAGNITUDE itself, do the payloads have to be made equal first (`magnitude_bits(..., nans_equal=True)`):
  one more pass, which the common case does without.
- The kernels compute the bits (`Kernel.magnitude_bits`, this module's numpy one); the
  histograms and sums here run on the host, on bits `Kernel.to_host` brings there.
- Random masks (`keep_mask`): element i of a tensor is kept when 32 bits of a Philox4x64-10 stream,
  keyed by (seed, tensor name) and indexed by i, fall below density * 2**32; any piece draws its
  part alone (numpy's Philox takes a counter) and gets the bits of any other cut.
- Exact sums of magnitudes (`abs_sum`; `abs_sums`: also of what a keep mask keeps, in one loop): as
  an integer count of 2**-149 (the smallest float32 subnormal), so partial sums from any pieces add
  up exactly; `to_float32` rounds once.
"""

from __future__ import annotations

import hashlib

import numpy as np

from raymerge.ops import native
from raymerge.ops.exact import UNIT, ExactSum, dot_sum, dot_sum_pair

ABS = np.uint32(0x7FFFFFFF)
HIGH_BINS = 1 << 15  # the high 16 bits of a magnitude (the sign bit is 0)
NAN_MAGNITUDE = 0x7F800001  # every NaN's magnitude, as the selection ranks it
NAN_BIN = NAN_MAGNITUDE >> 16  # its high bin, +inf's too


def magnitude_bits(x: np.ndarray, out: np.ndarray, nans_equal: bool = False) -> np.ndarray:
    """|x| (float32) as uint32 bit patterns, in `out` (uint32, reused); with nans_equal, every NaN's
    as NAN_MAGNITUDE."""
    np.bitwise_and(x.view(np.uint32), ABS, out=out)
    if nans_equal:
        np.minimum(out, NAN_MAGNITUDE, out=out)
    return out


def magnitude_above(x: np.ndarray, threshold: int, inclusive: bool, nans_equal: bool, out: np.ndarray) -> int | None:
    """out = 1.0 where x's `magnitude_bits` (with nans_equal) are >= threshold (inclusive) or >
    threshold, else 0.0, in one compiled loop, and how many of them equal the threshold; None where
    it cannot run (loops not built; x or out not float32 host arrays, or sharing memory): nothing is
    written then, and the caller takes its own steps."""
    if not (native.takes(x, np.float32) and native.takes(out, np.float32) and x.shape == out.shape) or \
            np.may_share_memory(x, out) or not 0 <= threshold <= 0xFFFFFFFF:
        return None
    return native.loops.magnitude_above(x, int(threshold), inclusive, NAN_MAGNITUDE if nans_equal else 0xFFFFFFFF,
                                        out)


def high_histogram(bits: np.ndarray, counts: np.ndarray, work: np.ndarray | None = None) -> None:
    """counts (int64, HIGH_BINS) += how many magnitudes fall in each high-16-bit bin, every NaN in
    NAN_BIN (`count_highs`)."""
    count_highs(bits, counts, work)
    counts[NAN_BIN] += counts[NAN_BIN + 1:].sum()  # NaNs of other payloads
    counts[NAN_BIN + 1:] = 0


def count_highs(bits: np.ndarray, counts: np.ndarray, work: np.ndarray | None = None) -> None:
    """counts[b >> 16] += 1 for each uint32 b of bits (counts: int64, as long as the high halves
    reach). Compiled where raymerge/ops/_native.c was built; else numpy's bincount, `work` an int64
    buffer as long as `bits` (bincount counts intp: a fresh one per call is slow to touch)."""
    if native.takes(bits, np.uint32) and native.takes(counts, np.int64):
        native.loops.high_counts(bits, counts)
        return
    shifted = np.right_shift(bits, 16, out=work if work is not None else np.empty(bits.size, np.int64))
    counts += np.bincount(shifted, minlength=counts.size)


def low_halves(bits: np.ndarray, high: int) -> np.ndarray:
    """The low 16 bits (uint32) of the uint32 bit patterns whose high 16 bits are `high`, in order
    (numpy's vector loops: a compiled loop with a branch per element was slower)."""
    return bits[(bits >> 16) == high] & np.uint32(0xFFFF)


LOW_BINS = 1 << 16


def count_lows(bits: np.ndarray, high: int, counts: np.ndarray) -> None:
    """counts (int64, LOW_BINS) += how many of bits (uint32) have the high half `high`, by their low
    half. Compiled where raymerge/ops/_native.c was built (one pass); else numpy's bincount of
    `low_halves`."""
    if native.takes(bits, np.uint32) and native.takes(counts, np.int64) and counts.size == LOW_BINS and \
            0 <= high < LOW_BINS:
        native.loops.low_counts(bits, int(high), counts)
        return
    counts += np.bincount(low_halves(bits, high), minlength=LOW_BINS)


def nonzero_bins(counts: np.ndarray | None) -> list:
    """[values, counts] of the bins a count array holds (none: two empty lists), as JSON lists."""
    if counts is None:
        return [[], []]
    at = np.flatnonzero(counts)
    return [at.tolist(), counts[at].tolist()]


def low_histogram(bits: np.ndarray, high: int) -> tuple[np.ndarray, np.ndarray]:
    """(low 16 bits, count) of the magnitudes whose high 16 bits are `high`, sorted."""
    return np.unique(low_halves(bits, high).astype(np.uint16), return_counts=True)


def select(counts: dict[int, int], k: int) -> tuple[int, int]:
    """(bin, elements in higher bins) of the bin holding the k-th largest (k >= 1), from a histogram
    {bin: count} that holds at least k elements."""
    above = 0
    for b in sorted(counts, reverse=True):
        if above + counts[b] >= k:
            return b, above
        above += counts[b]
    raise ValueError(f"select: {k} asked of {above} elements")


def philox_key(seed: int, name: str, kind: str = "dare") -> np.ndarray:
    """The Philox key of a tensor's mask: a digest of (method kind, seed, tensor name)."""
    digest = hashlib.sha256(f"raymerge-{kind}\0{seed}\0{name}".encode()).digest()
    return np.frombuffer(digest[:16], dtype=np.uint64).copy()


def keep_threshold(density: float) -> int:
    """Keep an element when its 32 random bits are below this: density * 2**32, rounded down."""
    return min(1 << 32, max(0, int(density * (1 << 32))))


def keep_mask(key: np.ndarray, begin: int, n: int, threshold: int) -> np.ndarray:
    """Whether elements [begin, begin + n) of a tensor are kept (bool): their `random_words` are
    below the threshold."""
    return random_words(key, begin, n) < threshold


def row_ranks(keys: np.ndarray) -> np.ndarray:
    """Each key's rank in its row (keys: uint16 or uint32, shape (rows, n)), ascending, equal keys
    ranked in index order: the inverse of a stable argsort of each row, as int32. Compiled where
    raymerge/ops/_native.c was built (a radix sort by bytes), else numpy's argsort."""
    ranks = np.empty(keys.shape, np.int32)
    if native.loops is not None and keys.size and keys.dtype in (np.uint16, np.uint32):
        native.loops.row_ranks(np.ascontiguousarray(keys), keys.shape[1], ranks)
        return ranks
    order = np.argsort(keys, axis=1, kind="stable")
    np.put_along_axis(ranks, order, np.arange(keys.shape[1], dtype=np.int32)[None, :], axis=1)
    return ranks


def random_words(key: np.ndarray, begin: int, n: int) -> np.ndarray:
    """32 random bits for each of elements [begin, begin + n) of a tensor (uint32). Element i takes
    the low 32 bits of 64-bit output i // 2 of the stream when i is even, the high 32 bits when it
    is odd; output j is word j % 4 of Philox block j // 4. Compiled where raymerge/ops/_native.c
    was built (`philox_words`: the same words, without numpy's call per output)."""
    if getattr(native.loops, "philox_words", None) is not None and 0 <= begin and begin + n < 1 << 63:
        out = np.empty(n, np.uint32)
        native.loops.philox_words(key, begin, out)
        return out
    first, last = begin // 2, (begin + n + 1) // 2  # the 64-bit outputs covering the elements
    block = first // 4
    raw = np.random.Philox(key=key, counter=block).random_raw(last - block * 4)[first - block * 4:]
    halves = raw.view(np.uint32)  # little-endian: element 2j is the low half of output j
    lo = begin - 2 * first
    return halves[lo:lo + n]


class AbsSum:
    """sum |x| of some elements, exactly: the finite part as a count of 2**-149 (`units`), and how
    many infinities and NaNs (which make the sum infinite or NaN, as a float32 sum would). Held as
    the exact.ExactSum of the magnitudes, so that chunk sums add as arrays (its buckets) and the
    count is made once, when it is needed."""

    __slots__ = ("_sum",)

    def __init__(self, units: int = 0, inf: int = 0, nan: int = 0, exact: ExactSum | None = None) -> None:
        self._sum = exact if exact is not None else ExactSum(units << (UNIT - 149), inf, 0, nan)

    @property
    def units(self) -> int:
        return self._sum.units >> (UNIT - 149)  # exact: a magnitude is a multiple of 2**-149

    @property
    def inf(self) -> int:
        return self._sum.pinf

    @property
    def nan(self) -> int:
        return self._sum.nan

    def __add__(self, other: AbsSum) -> AbsSum:
        return AbsSum(exact=self._sum + other._sum)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AbsSum) and (self.units, self.inf, self.nan) == (other.units, other.inf, other.nan)

    def __repr__(self) -> str:
        return f"AbsSum({self.units}, {self.inf}, {self.nan})"

    def to_float32(self) -> np.float32:
        if self.nan:
            return np.float32(np.nan)
        if self.inf:
            return np.float32(np.inf)
        return to_float32(self.units)

    def to_json(self) -> list:
        return [str(self.units), self.inf, self.nan]


def abs_sum(bits: np.ndarray) -> AbsSum:
    """The exact sum of magnitudes given as bits (`magnitude_bits`), fewer than 2**29 of them:
    exact.dot_sum of the values (a magnitude has at most 24 significant bits: summed whole)."""
    if bits.size >= 1 << 29:
        raise ValueError("abs_sum: at most 2**29 elements at once")
    return AbsSum(exact=dot_sum(bits.view(np.float32), np.float32(1), narrow=True))


def abs_sums(bits: np.ndarray, keep: np.ndarray) -> tuple[AbsSum, AbsSum]:
    """(abs_sum(bits), the abs_sum of the magnitudes times keep), keep a mask of 1.0 and 0.0 (float32)
    as long: the sum of |x * keep| (an infinity or NaN dropped is a NaN there, as x * 0 is), in one
    loop (exact.dot_sum_pair, which takes fewer than 2**29 of them)."""
    before, after = dot_sum_pair(bits.view(np.float32), keep)
    return AbsSum(exact=before), AbsSum(exact=after)


def to_float32(units: int) -> np.float32:
    """units * 2**-149, rounded once to float32 (to nearest, ties to even)."""
    shift = max(units.bit_length() - 24, 0)
    q, rem = divmod(units, 1 << shift) if shift else (units, 0)
    half = 1 << (shift - 1) if shift else 0
    if shift and (rem > half or (rem == half and q & 1)):
        q += 1
    with np.errstate(over="ignore"):
        return np.float32(np.ldexp(float(q), shift - 149))
