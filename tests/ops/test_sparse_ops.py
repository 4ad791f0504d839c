"""The numpy primitives of TIES and DARE (raymerge.ops.sparse), against plain references written
here: a radix selection's bin choice, a random mask drawn piece by piece, exact sums of magnitudes
and their one rounding to float32."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from raymerge.ops import sparse

pytestmark = pytest.mark.usefixtures("both_loops")  # tests/ops/conftest.py: compiled and numpy loops

F32_MAX = Fraction(float(np.finfo(np.float32).max))
UNIT = Fraction(1, 2 ** 149)  # the smallest float32 subnormal


def round_to_float32(value: Fraction) -> np.float32:
    """A non-negative exact value rounded once to float32 (nearest, ties to even), by comparing it
    with the float32 candidates around it exactly."""
    if value >= F32_MAX + Fraction(2 ** 103):  # halfway to 2**128 or more: the even neighbour is inf
        return np.float32(np.inf)
    guess = np.float32(float(value))  # within one ulp (float64 first: maybe two roundings)
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    candidates = [c for c in candidates if np.isfinite(c) and c >= 0]

    def key(c: np.float32):
        return abs(Fraction(float(c)) - value), int(c.view(np.uint32)) & 1  # nearest, then even
    return min(candidates, key=key)


def whole_mask(key: np.ndarray, n: int, threshold: int) -> np.ndarray:
    """The documented mask of a whole tensor: 32-bit word i of the Philox stream (counter 0) < threshold."""
    raw = np.random.Philox(key=key, counter=0).random_raw((n + 1) // 2)
    return raw.view(np.uint32)[:n] < threshold


# --- the radix selection ------------------------------------------------------------------------

def test_select_finds_the_bin_of_the_kth_largest():
    counts = {7: 3, 2: 5, 40: 1, 9: 0, 11: 2}  # bins from the top: 40 (1), 11 (2), 9 (0), 7 (3), 2 (5)
    assert sparse.select(counts, 1) == (40, 0)
    assert sparse.select(counts, 2) == (11, 1)
    assert sparse.select(counts, 3) == (11, 1)
    assert sparse.select(counts, 4) == (7, 3)  # an empty bin is passed over
    assert sparse.select(counts, 6) == (7, 3)
    assert sparse.select(counts, 7) == (2, 6)
    assert sparse.select(counts, 11) == (2, 6)
    with pytest.raises(ValueError):
        sparse.select(counts, 12)


def test_histograms_locate_the_kth_largest_magnitude():
    """high_histogram + select, then low_histogram + select give the k-th largest |x| exactly."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(50_000).astype(np.float32)
    x[::7] = x[3]  # many equal magnitudes, both signs
    x[1::7] = -x[3]
    bits = sparse.magnitude_bits(x, np.empty(x.size, np.uint32))
    assert np.array_equal(bits.view(np.float32), np.abs(x))
    ordered = np.sort(np.abs(x))[::-1]
    for k in (1, 2, 100, 7_143, 20_000, 49_999, 50_000):
        counts = np.zeros(sparse.HIGH_BINS, np.int64)
        for lo in range(0, x.size, 9_999):  # histograms of pieces add up
            sparse.high_histogram(bits[lo:lo + 9_999], counts, np.empty(bits[lo:lo + 9_999].size, np.uint32))
        high, above = sparse.select({i: int(c) for i, c in enumerate(counts) if c}, k)
        values, low_counts = sparse.low_histogram(bits, high)
        low, above_low = sparse.select(dict(zip(values.tolist(), low_counts.tolist())), k - above)
        threshold = np.array(high << 16 | low, np.uint32).view(np.float32)
        assert threshold == ordered[k - 1], k
        assert above + above_low == np.count_nonzero(np.abs(x) > threshold), k


def test_low_counts_are_the_low_halves_of_one_high_bin_counted():
    """count_lows adds, by low half, the values whose high half is the bin (a key in another bin or
    past the magnitudes' counts adds nothing); `nonzero_bins` lists the bins it holds, ascending."""
    rng = np.random.default_rng(4)
    bits = (rng.integers(0x3C00, 0x3C02, 20000, dtype=np.uint32) << 16) | rng.integers(0, 7, 20000, dtype=np.uint32)
    bits[rng.random(bits.size) < 0.01] += 0x20000  # the bin: about one key in a hundred (most blocks of 32: none)
    bits[::97] = 0xFFFF0003  # a high half past every magnitude's
    counts = np.zeros(sparse.LOW_BINS, np.int64)
    for lo in range(0, bits.size, 7000):  # chunk by chunk: the counts add up
        sparse.count_lows(bits[lo:lo + 7000], 0x3C02, counts)
    values, n = np.unique(bits[(bits >> 16) == 0x3C02] & 0xFFFF, return_counts=True)
    assert sparse.nonzero_bins(counts) == [values.tolist(), n.tolist()] and len(values) == 7
    sparse.count_lows(bits, 0x10000 | 0x3C02, counts)  # past every high half: nothing
    sparse.count_lows(bits, -1, counts)
    assert sparse.nonzero_bins(counts) == [values.tolist(), n.tolist()]
    assert sparse.nonzero_bins(None) == [[], []]


def test_every_nan_ranks_as_one_magnitude_above_infinity():
    """Whatever payload the hardware gave a NaN, the selection ranks it as NAN_MAGNITUDE."""
    nans = np.array([0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FFFFFFF], np.uint32).view(np.float32)
    x = np.concatenate([nans, np.float32([np.inf, -np.inf, 1.0])])
    raw = sparse.magnitude_bits(x, np.empty(x.size, np.uint32))
    assert raw[0] != raw[3]  # the payloads are kept by default: the common case needs no more
    equal = sparse.magnitude_bits(x, np.empty(x.size, np.uint32), nans_equal=True)
    assert equal.tolist() == [sparse.NAN_MAGNITUDE] * 4 + [0x7F800000, 0x7F800000, 0x3F800000]
    counts = np.zeros(sparse.HIGH_BINS, np.int64)
    sparse.high_histogram(raw, counts, np.empty(x.size, np.int64))
    assert counts[sparse.NAN_BIN] == 6 and counts[0x3F80] == 1 and counts.sum() == 7  # NaNs and infinities


# --- random masks ---------------------------------------------------------------------------------

def test_philox_key_is_the_documented_digest():
    import hashlib

    digest = hashlib.sha256(b"raymerge-dare\x007\x00model.layers.0.mlp.up_proj.weight").digest()
    want = np.frombuffer(digest[:16], dtype="<u8")
    assert np.array_equal(sparse.philox_key(7, "model.layers.0.mlp.up_proj.weight"), want)
    assert not np.array_equal(sparse.philox_key(8, "model.layers.0.mlp.up_proj.weight"), want)
    assert not np.array_equal(sparse.philox_key(7, "model.layers.1.mlp.up_proj.weight"), want)


def test_keep_threshold():
    assert sparse.keep_threshold(0.5) == 1 << 31
    assert sparse.keep_threshold(1.0) == 1 << 32 and sparse.keep_threshold(2.0) == 1 << 32
    assert sparse.keep_threshold(0.0) == 0 and sparse.keep_threshold(-1.0) == 0
    assert sparse.keep_threshold(0.3) == int(0.3 * 2 ** 32)


@pytest.mark.parametrize("begin,n", [(0, 1), (0, 4097), (1, 1), (1, 2), (3, 7), (5, 1000), (7, 8), (8, 8),
                                     (9, 31), (1001, 3333), (4095, 2), (12_345, 0), (12_345, 7_655), (19_999, 1)])
def test_keep_mask_of_a_piece_is_that_slice_of_the_whole_mask(begin, n):
    key = sparse.philox_key(3, "model.embed_tokens.weight")
    threshold = sparse.keep_threshold(0.37)
    whole = whole_mask(key, 20_000, threshold)
    got = sparse.keep_mask(key, begin, n, threshold)
    assert got.dtype == bool and got.shape == (n,)
    assert np.array_equal(got, whole[begin:begin + n])


def test_keep_mask_pieces_far_into_a_huge_tensor_agree():
    """Pieces of a tensor of 2**40 elements: any cut of a range gives the same bits."""
    key = sparse.philox_key(0, "x")
    threshold = sparse.keep_threshold(0.5)
    start = (1 << 40) + 3
    whole = sparse.keep_mask(key, start, 10_001, threshold)
    cuts = [0, 1, 2, 5, 13, 64, 1_000, 4_097, 9_999, 10_001]
    glued = np.concatenate([sparse.keep_mask(key, start + lo, hi - lo, threshold) for lo, hi in zip(cuts, cuts[1:])])
    assert np.array_equal(glued, whole)
    # the stream position of element i is i itself: the same bits as a mask that starts at an aligned block
    aligned = start - 3
    assert np.array_equal(sparse.keep_mask(key, aligned, 10_004, threshold)[3:], whole)


def test_keep_mask_keeps_the_density_fraction():
    threshold = sparse.keep_threshold(0.3)
    for seed, name in ((0, "a"), (1, "model.layers.3.self_attn.q_proj.weight")):
        kept = sparse.keep_mask(sparse.philox_key(seed, name), 0, 10_000_000, threshold)
        assert abs(np.count_nonzero(kept) / kept.size - 0.3) < 0.001  # 0.1 percentage point; sigma is 0.015
    assert sparse.keep_mask(sparse.philox_key(0, "a"), 11, 1000, sparse.keep_threshold(1.0)).all()
    assert not sparse.keep_mask(sparse.philox_key(0, "a"), 11, 1000, sparse.keep_threshold(0.0)).any()


# --- exact sums of magnitudes ---------------------------------------------------------------------

def _values(seed: int, n: int) -> np.ndarray:
    """float32 values of every kind of size: subnormals, tiny and huge normals, zeros, both signs."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 0x70000000, n, dtype=np.uint32)  # magnitudes up to 2**97, uniformly by bits
    x = bits.view(np.float32).copy()
    x[: n // 4] = rng.standard_normal(n // 4).astype(np.float32)
    x[n // 4: n // 2] = (rng.integers(1, 1 << 23, n // 2 - n // 4, dtype=np.uint32)).view(np.float32)  # subnormals
    x[::17] = 0
    x[::13] *= -1
    rng.shuffle(x)
    return x


def _exact(x: np.ndarray) -> Fraction:
    return sum((Fraction(float(v)) for v in np.abs(x.astype(np.float64))), Fraction(0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_abs_sum_is_exact_and_rounds_once(seed):
    x = _values(seed, 3_000)
    if seed == 2:
        x = x[np.abs(x) < 1e-30]  # only small values: the sum stays far from overflow
    bits = sparse.magnitude_bits(x, np.empty(x.size, np.uint32))
    total = sparse.abs_sum(bits)
    exact = _exact(x)
    assert total.inf == 0 and total.nan == 0
    assert Fraction(total.units) * UNIT == exact
    got = total.to_float32()
    assert got.dtype == np.float32
    assert got.view(np.uint32) == round_to_float32(exact).view(np.uint32)
    assert sparse.to_float32(total.units).view(np.uint32) == got.view(np.uint32)


def test_abs_sum_of_subnormals_and_small_sums():
    x = np.array([1, 2, 3, 0x7FFFFF, 0x800000], np.uint32).view(np.float32)  # subnormals and the smallest normal
    total = sparse.abs_sum(sparse.magnitude_bits(x, np.empty(x.size, np.uint32)))
    assert total.units == 1 + 2 + 3 + 0x7FFFFF + 0x800000
    assert total.to_float32() == np.float32(2 ** 24 + 4) * np.float32(2.0 ** -149)  # 2**24 + 5 units: a tie, to even
    assert sparse.abs_sum(np.empty(0, np.uint32)) == sparse.AbsSum()
    assert sparse.AbsSum().to_float32() == 0


def test_abs_sum_is_additive_over_any_split():
    x = _values(7, 5_000)
    bits = sparse.magnitude_bits(x, np.empty(x.size, np.uint32))
    whole = sparse.abs_sum(bits)
    rng = np.random.default_rng(1)
    for _ in range(5):
        cuts = [0, *sorted(rng.choice(np.arange(1, x.size), size=int(rng.integers(1, 9)), replace=False)), x.size]
        parts = [sparse.abs_sum(bits[lo:hi]) for lo, hi in zip(cuts, cuts[1:])]
        total = sparse.AbsSum()
        for p in reversed(parts):  # in any order
            total = total + p
        assert total == whole


def test_abs_sum_counts_infinities_and_nans():
    x = np.array([1.0, np.inf, -np.inf, 2.0, 0.5], np.float32)
    nans = np.array([0x7FC00000, 0xFFC00001, 0x7F800001], np.uint32).view(np.float32)  # quiet, negative, signalling
    bits = sparse.magnitude_bits(x, np.empty(x.size, np.uint32))
    total = sparse.abs_sum(bits)
    assert (total.inf, total.nan) == (2, 0) and Fraction(total.units) * UNIT == Fraction(7, 2)
    assert total.to_float32() == np.inf
    with_nan = total + sparse.abs_sum(sparse.magnitude_bits(nans, np.empty(3, np.uint32)))
    assert (with_nan.inf, with_nan.nan) == (2, 3) and with_nan.units == total.units
    assert np.isnan(with_nan.to_float32())
    assert with_nan.to_json() == [str(total.units), 2, 3]


# --- one rounding to float32 ----------------------------------------------------------------------

@pytest.mark.parametrize("units", [
    0, 1, 2, (1 << 23) - 1, 1 << 23, (1 << 24) - 1, 1 << 24,
    (1 << 24) + 1,  # halfway between 2**24 and 2**24 + 2: to the even 2**24
    (1 << 24) + 3,  # halfway between 2**24 + 2 and 2**24 + 4: to the even 2**24 + 4
    (1 << 25) - 1,  # halfway, rounds up to a power of two (a carry into the exponent)
    (1 << 26) + 2,  # halfway (shift 2): to even, down
    (1 << 26) + 6,  # halfway (shift 2): to even, up
    (1 << 26) + 1, (1 << 26) + 3,  # below and above half
    (0xABCDEF << 40) + (1 << 39),  # halfway, odd: up
    (0xABCDEE << 40) + (1 << 39),  # halfway, even: down
    (0xABCDEE << 40) + (1 << 39) + 1,  # just above half: up
    (1 << 52) + 12345,
])
def test_to_float32_rounds_to_nearest_ties_to_even(units):
    got = sparse.to_float32(units)
    assert got.dtype == np.float32
    if units < 1 << 53:  # exact in float64, then numpy's one rounding
        assert got.view(np.uint32) == np.float32(np.ldexp(float(units), -149)).view(np.uint32)
    assert got.view(np.uint32) == round_to_float32(Fraction(units) * UNIT).view(np.uint32)


def test_to_float32_large_sums_and_overflow():
    top = ((1 << 24) - 1) << (104 + 149)  # float32's largest finite value, in units
    assert sparse.to_float32(top) == np.finfo(np.float32).max
    assert sparse.to_float32(top + (1 << 252) - 1) == np.finfo(np.float32).max  # just under half an ulp more
    assert sparse.to_float32(top + (1 << 252)) == np.inf  # halfway: the even neighbour is 2**128
    assert sparse.to_float32(1 << 400) == np.inf
    for units in ((1 << 100) + (1 << 76), (3 << 200) + (1 << 176) + 1, (5 << 120) + (1 << 97) + (1 << 98)):
        assert sparse.to_float32(units).view(np.uint32) == round_to_float32(Fraction(units) * UNIT).view(np.uint32)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_row_ranks_rank_each_row_ascending_ties_in_index_order(dtype):
    rng = np.random.default_rng(4)
    keys = rng.integers(0, 9, (6, 333)).astype(dtype) << (8 * np.dtype(dtype).itemsize - 8)  # high byte only
    keys[1] += np.arange(333, dtype=dtype)  # low byte too
    ranks = sparse.row_ranks(keys)
    assert ranks.dtype == np.int32 and ranks.shape == keys.shape
    for row, rank in zip(keys, ranks):
        # rank r goes to the r-th element of the order (key, index): written out, not by argsort
        want = sorted(range(row.size), key=lambda i: (int(row[i]), i))
        assert [int(rank[i]) for i in want] == list(range(row.size))
    assert sparse.row_ranks(np.zeros((2, 0), dtype)).shape == (2, 0)
