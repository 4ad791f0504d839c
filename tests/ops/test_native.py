"""raymerge/ops/_native.c: the compiled loops give the bits of their numpy forms and of torch."""

from __future__ import annotations

import shutil
from fractions import Fraction
import sysconfig

import numpy as np
import pytest
import torch

import raymerge.ops.exact as exact
from raymerge.ops import native as native_module
from raymerge.ops.numpy_kernel import NUMPY

native = pytest.importorskip("raymerge.ops._native", reason="not built here (no C compiler at install)")


def test_the_loops_are_built_wherever_a_c_compiler_is():
    """An install with a compiler must build them (setuptools only warns when it cannot): on this
    machine the numpy loops would silently make every statistics pass slower."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no {compiler} here")
    assert native.__file__.endswith(sysconfig.get_config_var("EXT_SUFFIX"))
    assert native_module.loops is native  # built from this very source (its VERSION), so taken


def _hard_float32(n: int, seed: int) -> np.ndarray:
    """Every kind of float32: random bit patterns (NaN payloads of both signs, subnormals), the
    ties of a BF16 rounding, values that round up into the next binade or to infinity."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    bits[: n // 4] = (bits[: n // 4] & 0xFFFF0000) | 0x8000  # exact ties
    bits[n // 4: n // 2] |= 0x7FFF  # just below a tie or at one after the carry
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001,
                        0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x00000001, 0x00008000, 0x007FFFFF, 0x3F80FFFF], np.uint32)
    bits[: special.size] = special
    return bits.view(np.float32)


@pytest.mark.parametrize("seed", range(3))
def test_round_bf16_rounds_as_torch_and_keeps_nan_bits(seed):
    x = _hard_float32(20000, seed)
    got = x.copy()
    native.round_bf16(got)
    finite_or_inf = ~np.isnan(x)
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(got.view(np.uint32)[finite_or_inf], want.view(np.uint32)[finite_or_inf])
    assert np.array_equal(got.view(np.uint32)[~finite_or_inf], x.view(np.uint32)[~finite_or_inf])


def test_round_to_gives_the_numpy_loops_bits(monkeypatch):
    x = _hard_float32(70000, 7)  # more than a chunk: the numpy loop's scratch is not kept
    fast = x.copy()
    NUMPY.round_to(fast, "BF16")
    monkeypatch.setattr(native_module, "loops", None)
    slow = x.copy()
    NUMPY.round_to(slow, "BF16")
    assert np.array_equal(fast.view(np.uint32), slow.view(np.uint32))


@pytest.mark.parametrize("narrow", [False, True])
def test_dot_buckets_equal_numpy_bincounts(narrow):
    """Split products land in numpy's very buckets; narrow ones are summed a block at a time
    first, so only the buckets' total (all a sum reads of them) is numpy's."""
    rng = np.random.default_rng(11)
    x = _hard_float32(9001, 3)
    y = _hard_float32(9001, 4)
    if narrow:  # values of at most 12 significant bits
        x = (x.view(np.uint32) & 0xFFF80000).view(np.float32)
        y = (y.view(np.uint32) & 0xFFF80000).view(np.float32)
    x[rng.integers(0, x.size, 50)] = 0.5
    lanes = np.zeros((exact._LANES, 4096 + exact._LANE_PAD))
    native.dot_buckets(x, y, lanes, narrow)
    with np.errstate(all="ignore"):
        want = exact._numpy_buckets(x, y, None, narrow)
    assert not lanes[:, 4096:].any()  # the padding between lanes
    got = lanes[:, :4096].sum(axis=0)
    if narrow:
        with np.errstate(all="ignore"):
            assert exact._summed(got, x, y, x.size) == exact._summed(want, x, y, x.size)
        return
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)])


def _narrow_blocks(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """BF16 and F16 values in blocks of 64 (the compiled loop's) made to stress its block sums:
    parts exactly 23 and 24 binades below a block's largest, zeros, subnormal and huge products,
    sums that cancel, a lone infinity or NaN, and a partial block at the end."""
    rng = np.random.default_rng(seed)
    blocks = []
    for kind in range(12):
        b = (rng.standard_normal((2, 64)) * np.exp2(rng.integers(-4, 4, (2, 64)))).astype(np.float32)
        odd = 1 + 2.0**-7  # BF16's: a product of two has its lowest bit 14 binades down
        if kind in (1, 2):
            b *= np.float32(2.0**-6)  # the largest product is the one set below
        if kind == 1:  # products at the window's edge, 23 binades below the largest (1.0), and one past it
            b[:, 0] = 1.0
            b[:, 1] = b[:, 2] = odd * 2.0**-11, odd * 2.0**-12
            b[0, 3], b[1, 3] = odd * 2.0**-12, odd * 2.0**-12
        elif kind == 2:  # a product 39 binades below the largest: in float64 beside it, its low bits lost
            b[:, 0] = 1.5
            b[:, 9] = odd * 2.0**-19
        elif kind == 3:
            b[:, ::3] = 0.0
        elif kind == 4:
            b[:, :] = np.float32(2.0**-133)  # subnormal float32, normal products in float64
        elif kind == 5:
            b[:, :] = np.float32(1.5e38)
        elif kind == 6:  # exact cancellation
            b[1, 32:] = -b[1, :32]
            b[0, 32:] = b[0, :32]
        elif kind == 7:
            b[0, 11] = np.inf
        elif kind == 8:
            b[1, 40] = np.nan
        elif kind == 9:
            b[:, :] = 0.0
        elif kind == 10:  # F16 values
            b = b.astype(np.float16).astype(np.float32)
        blocks.append(b)
    x, y = np.concatenate(blocks + [blocks[0][:, :37]], axis=1)
    narrow = (x.view(np.uint32) & 0xFFFF0000).view(np.float32), (y.view(np.uint32) & 0xFFFF0000).view(np.float32)
    return narrow[0].copy(), narrow[1].copy()


def _lane_sum(x: np.ndarray, y: np.ndarray | None) -> exact.ExactSum:
    lanes = np.zeros((exact._LANES, 4096 + exact._LANE_PAD))
    native.dot_buckets(x, y, lanes, True)
    with np.errstate(all="ignore"):
        return exact._summed(lanes[:, :4096].sum(axis=0), x, np.float32(1) if y is None else y, x.size)


@pytest.mark.parametrize("seed", range(4))
def test_narrow_block_sums_are_exact(seed):
    """The block sums against Fractions where every product is finite, and against numpy's
    bincounts (infinities and NaNs counted) where some is not."""
    x, y = _narrow_blocks(seed)
    for yy in (y, None):
        ones = np.ones_like(x) if yy is None else yy
        with np.errstate(all="ignore"):
            want = exact._summed(exact._numpy_buckets(x, ones, None, True), x, ones, x.size)
        assert _lane_sum(x, yy) == want and (want.pinf, want.nan) != (0, 0)
    finite = [np.where(np.isfinite(a), a, np.float32(0.75)) for a in (x, y)]
    for a, b in (finite, (finite[0], None)):
        ones = np.ones_like(a) if b is None else b
        truth = sum((Fraction(float(p)) * Fraction(float(q)) for p, q in zip(a, ones)), Fraction(0))
        assert Fraction(_lane_sum(a, b).units, 2**exact.UNIT) == truth


def test_high_counts_equal_numpy_bincounts_and_refuse_a_high_half_past_the_counts():
    bits = _hard_float32(50000, 5).view(np.uint32)
    for size, x in ((1 << 15, bits & 0x7FFFFFFF), (1 << 16, bits)):  # magnitudes; order keys
        counts = np.zeros(size, np.int64)
        counts[7] = 3  # added to
        native.high_counts(x, counts)
        want = np.bincount(x >> 16, minlength=size)
        want[7] += 3
        assert np.array_equal(counts, want)
    with pytest.raises(ValueError, match="past the 32768 counts"):
        native.high_counts(np.uint32([0x80000000]), np.zeros(1 << 15, np.int64))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (5, 700), (2, 5000)])
def test_row_ranks_invert_a_stable_argsort_of_each_row(dtype, shape):
    rng = np.random.default_rng(shape[1])
    keys = rng.integers(0, 40, shape).astype(dtype)  # many ties
    keys[0, ::3] = np.iinfo(dtype).max  # and digits in every byte
    if shape[0] > 2:
        keys[2] = 7  # a row of one key: every byte skipped
    ranks = np.empty(keys.size, np.int32)
    native.row_ranks(keys, shape[1], ranks)
    order = np.argsort(keys, axis=1, kind="stable")
    for r in range(shape[0]):
        assert np.array_equal(ranks.reshape(shape)[r][order[r]], np.arange(shape[1]))


@pytest.mark.parametrize("kind", ["any", "bf16", "bf16-spread"])
@pytest.mark.parametrize("shape", [(1, 1), (4, 3), (6, 700), (2, 5000)])
def test_della_keep_draws_as_the_ranks_and_thresholds_of_its_numpy_form(shape, kind):
    """words < below[rank of |x| in its row], ranks by magnitude bits (NaNs all alike, above
    infinity), ties by index: written out with a stable argsort of each row here. Rows of any
    float32 (a radix sort), of BF16 values near one another (counted), and of BF16 values from
    the smallest subnormal to infinity (too spread to count: the radix sort again)."""
    from raymerge.methods.sparse import della_ranks

    rng = np.random.default_rng(shape[1])
    if kind == "any":
        x = _hard_float32(max(shape[0] * shape[1], 14), shape[1])[:shape[0] * shape[1]].reshape(shape).copy()
    else:
        x = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        x.view(np.uint32)[...] &= 0xFFFF0000  # BF16 values (zeros of both signs among them, below)
        x[:, ::7] = 0.0  # zeros are ranked apart from the counted span (a delta holds many)
        x[:, 1::11] = -0.0
        x[:, 3::13] = np.uint32(0x2F800000).view(np.float32)  # a span almost as wide as the counts take
        if kind == "bf16-spread":
            x[:, ::5] = np.float32(np.inf)
            x[:, 2::5] = np.uint32(0x00010000).view(np.float32)
    x[0, ::2] = np.float32(0.5)  # ties
    x[-1, :(shape[1] + 1) // 2] = -np.float32(0.5)  # ties across signs
    below = np.sort(rng.integers(0, 2**32 + 1, shape[1], dtype=np.uint64))  # 2**32: every word keeps
    words = rng.integers(0, 2**32, x.size, dtype=np.uint64).astype(np.uint32)
    out = np.empty(x.size, np.bool_)
    native.della_keep(x.reshape(-1), shape[1], below, words, out)
    magnitudes = np.minimum(x.view(np.uint32) & 0x7FFFFFFF, 0x7F800001)
    ranks = np.argsort(np.argsort(magnitudes, axis=1, kind="stable"), axis=1, kind="stable").reshape(-1)
    assert np.array_equal(out, words < below[ranks])
    assert np.array_equal(ranks, della_ranks(x).reshape(-1))  # the numpy form ranks alike
    with pytest.raises(ValueError, match="whole rows"):
        native.della_keep(x.reshape(-1), shape[1] + 1, below, words, out)
    with pytest.raises(TypeError):
        native.della_keep(x.reshape(-1), shape[1], below.astype(np.uint32), words, out)


@pytest.mark.parametrize("inclusive", [False, True])
def test_magnitude_above_is_the_magnitude_bits_compared(inclusive):
    """sparse.magnitude_above: 1.0 where the magnitude bits (NaNs capped at NAN_MAGNITUDE with
    nans_equal, their own bits otherwise) reach the threshold, as the numpy steps of top_mask, and
    the count of those equal to it; nothing written (None) where out shares x's memory."""
    from raymerge.ops import sparse

    x = _hard_float32(5000, 3)
    for threshold in (0, 1, 0x3C000000, 0x7F800000, sparse.NAN_MAGNITUDE, sparse.NAN_MAGNITUDE + 1, 0x7FFFFFFF):
        for nans_equal in (False, True):
            b = sparse.magnitude_bits(x, np.empty(x.size, np.uint32), nans_equal)
            want = ((b >= threshold) if inclusive else (b > threshold)).astype(np.float32)
            out = np.full(x.size, 7, np.float32)
            assert sparse.magnitude_above(x, threshold, inclusive, nans_equal, out) == np.count_nonzero(b == threshold)
            assert np.array_equal(out.view(np.uint32), want.view(np.uint32)), (threshold, nans_equal)
    y = x.copy()
    assert sparse.magnitude_above(y, 0, inclusive, False, y) is None
    assert np.array_equal(y.view(np.uint32), x.view(np.uint32))


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 4999), (2, 5000)])
def test_della_keep_counted_rows_rank_each_element_exactly(shape):
    """Rows of BF16 magnitudes in a short span (the counting sort, odd lengths: the last element
    counted with the second half): thresholds 1000 * rank and words 1000 * the expected rank keep
    nothing exactly where every rank is the expected one (a permutation can be no lower anywhere
    without being higher somewhere), and words one below keep all but rank 0."""
    rng = np.random.default_rng(shape[1])
    x = (rng.choice(np.float32([0.5, -0.25, 0.375, 0.5, -0.0, 0.0]), shape) if shape[1] < 10
         else (rng.standard_normal(shape) * 0.02).astype(np.float32))
    x.view(np.uint32)[...] &= 0xFFFF0000  # BF16 values
    x[:, 1::7] = 0.0
    magnitudes = x.view(np.uint32) & 0x7FFFFFFF
    rank = np.argsort(np.argsort(magnitudes, axis=1, kind="stable"), axis=1, kind="stable").reshape(-1)
    below = np.arange(shape[1], dtype=np.uint64) * 1000
    out = np.empty(x.size, np.bool_)
    native.della_keep(x.reshape(-1), shape[1], below, (rank * 1000).astype(np.uint32), out)
    assert not out.any()
    native.della_keep(x.reshape(-1), shape[1], below, (rank * 1000 - 1).clip(0).astype(np.uint32), out)
    assert np.array_equal(out, rank > 0)


def test_philox_words_are_numpys_philox_stream_from_any_element():
    """Element e's word is half e % 2 of output e // 2 of numpy's Philox(key, counter=0) stream,
    written out with numpy here: blocks begun before `begin`, ended after the last element, whole
    ones, none; offsets past 2**40 (the counter's upper bits); the numpy form in sparse.py alike."""
    from raymerge.ops import sparse

    if not hasattr(native, "philox_words"):
        pytest.skip("a compiler without 128-bit integers: numpy draws the words")
    rng = np.random.default_rng(7)
    for case in range(60):
        key = rng.integers(0, 2**64, 2, dtype=np.uint64)
        begin = int(rng.integers(0, 40)) if case % 3 == 0 else int(rng.integers(0, 2**41))
        n = int(rng.integers(0, 20)) if case % 2 else int(rng.integers(0, 3000))
        first = begin // 2
        raw = np.random.Philox(key=key, counter=first // 4).random_raw((begin + n + 1) // 2 - first // 4 * 4)
        want = raw[first % 4:].view(np.uint32)[begin % 2:begin % 2 + n]
        out = np.empty(n, np.uint32)
        native.philox_words(key, begin, out)
        assert np.array_equal(out, want), (begin, n)
        assert np.array_equal(sparse.random_words(key, begin, n), want)
    with pytest.raises(ValueError, match="two uint64s"):
        native.philox_words(np.zeros(3, np.uint64), 0, np.empty(4, np.uint32))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_welford_variance_is_torch_var_in_float64_then_float32(k):
    rng = np.random.default_rng(k)
    xs = [(rng.standard_normal(3000) * np.exp(rng.uniform(-20, 20, 3000))).astype(np.float32) for _ in range(k)]
    xs[0][:4] = [np.inf, -np.inf, np.nan, 3.4e38]
    out = np.empty(3000, np.float32)
    native.welford_variance(xs, out)
    want = torch.var(torch.from_numpy(np.stack(xs)).double(), dim=0, unbiased=False).float().numpy()
    finite = np.isfinite(want)
    assert np.array_equal(out[finite].view(np.uint32), want[finite].view(np.uint32))
    assert np.array_equal(np.isnan(out), np.isnan(want))
    with pytest.raises(ValueError, match="as long as out"):
        native.welford_variance([xs[0][:10]], out)


def test_dot_buckets_refuses_what_it_cannot_read():
    lanes = np.zeros((4, 4096))
    with pytest.raises(TypeError, match="dot_buckets x"):
        native.dot_buckets(np.zeros(4, np.float64), None, lanes, True)
    with pytest.raises(ValueError, match="differ in length"):
        native.dot_buckets(np.zeros(4, np.float32), np.zeros(5, np.float32), lanes, True)
    with pytest.raises(ValueError):
        native.dot_buckets(np.zeros(4, np.float32)[::2], None, lanes, True)  # not contiguous
    with pytest.raises(TypeError, match="round_bf16"):
        native.round_bf16(np.zeros(4, np.float64))
    with pytest.raises(TypeError, match="native byte order"):
        native.round_bf16(np.zeros(4, ">f4"))
    with pytest.raises(TypeError, match="aligned"):
        native.round_bf16(np.zeros(9, np.float32).view(np.uint8)[2:34].view(np.float32))
    with pytest.raises(ValueError, match="whole rows"):
        native.row_ranks(np.zeros(10, np.uint16), 3, np.empty(10, np.int32))
    with pytest.raises(TypeError, match="row_ranks ranks"):
        native.row_ranks(np.zeros(10, np.uint16), 5, np.empty(10, np.int64))


def test_bf16_halves_and_widen_round_trip_and_say_when_a_low_half_is_set():
    x = _hard_float32(4096, 9)
    halves = np.empty(x.size, np.uint16)
    assert native.bf16_halves(x, halves) is False  # random bit patterns: low halves set
    assert np.array_equal(halves, (x.view(np.uint32) >> 16).astype(np.uint16))
    NUMPY.round_to(x, "BF16")
    x = x[~np.isnan(x)]  # a NaN keeps its low half
    halves = np.empty(x.size, np.uint16)
    assert native.bf16_halves(x, halves) is True
    back = np.empty(x.size, np.float32)
    native.bf16_widen(halves, back)
    assert np.array_equal(back.view(np.uint32), x.view(np.uint32))
    with pytest.raises(ValueError, match="one element"):
        native.bf16_halves(x, halves[:-1])
    with pytest.raises(ValueError, match="one element"):
        native.bf16_widen(halves, back[:-1])


def test_bf16_narrow_rounds_as_torch_and_gives_the_numpy_forms_bits(monkeypatch):
    """The final narrowing of a weighted sum (numpy_kernel._narrow): numbers rounded as torch
    rounds them, every bit pattern (NaNs too, mended by the caller) as the numpy form's."""
    import raymerge.ops.numpy_kernel as numpy_kernel

    x = _hard_float32(20011, 5)  # odd length: the vector loops' tails
    got = np.empty(x.size, np.uint16)
    native.bf16_narrow(x, got)
    number = ~np.isnan(x)
    want = torch.from_numpy(x[number].copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(got[number], want)
    monkeypatch.setattr(native_module, "loops", None)
    slow = np.empty(x.size, np.uint16)
    numpy_kernel._narrow(slow, x.copy(), np.empty(x.size, np.float32))
    assert np.array_equal(got, slow)
    with pytest.raises(ValueError, match="one element"):
        native.bf16_narrow(x, got[:-1])


def test_order_keys_are_the_numpy_forms_keys(monkeypatch):
    from raymerge.methods.arcee_fusion import order_keys

    x = _hard_float32(20011, 4)  # every sign, both zeros, infinities, NaNs of both signs, subnormals
    fast = order_keys(x)
    monkeypatch.setattr(native_module, "loops", None)
    assert np.array_equal(fast, order_keys(x))
    assert fast[np.isnan(x)].min() == 0xFFFFFFFF and fast[x == 0].max() == fast[x == 0].min() == 0x80000000
    with pytest.raises(ValueError, match="one element"):
        native.order_keys(x, np.empty(x.size - 1, np.uint32))


def test_span_is_the_memory_the_array_interface_gives():
    table = np.zeros((4, 1000), np.float32)
    for x in (table, table[1, 10:500], table[3, :0], np.frombuffer(b"\0" * 64, np.float32)):
        lo = x.__array_interface__["data"][0]
        assert native.span(x) == (lo, lo + x.nbytes)
    with pytest.raises(ValueError):
        native.span(table[:, 2])  # not C-contiguous: fused._span bounds it itself


@pytest.mark.parametrize("square", [False, True])
def test_segment_sums_bound_their_error_by_their_additions(square):
    """Each segment's float64 sum lies within errs (every addition's rounding error, exactly) of the
    exact sum (Fractions), 0 where it is exact; that bound is far below the one of any order
    (2 * length * 2**-53 of the magnitudes)."""
    rng = np.random.default_rng(4)
    wide = (rng.standard_normal(4000) * np.exp(rng.uniform(-12, 12, 4000))).astype(np.float32)
    wide[:6] = np.float32([1.0, 2.0**-30, -1.0, 3.0, 2.0**-60, -3.0])  # cancellation
    normal = rng.standard_normal(3000).astype(np.float32)
    for x, starts in ((wide, [0, 3, 6, 7, 50, 1000, 1003, 4000]), (normal, [0, 1000, 2000])):
        starts = np.array(starts, np.int64)  # wide's last segment is empty
        sums, errs = np.empty(starts.size), np.empty(starts.size)
        native.segment_sums(x, starts, square, sums, errs)
        ratios = []
        for s, e, got, err in zip(starts, [*starts[1:], x.size], sums, errs):
            parts = [Fraction(float(v)) ** 2 if square else Fraction(float(v)) for v in x[s:e]]
            error = abs(Fraction(got) - sum(parts, Fraction(0)))
            assert error <= Fraction(err) * (1 + Fraction(2) ** -40) and (err > 0 or error == 0)
            if err:
                ratios.append(float(sum(abs(p) for p in parts)) * 2 * (e - s) * 2.0**-53 / err)
    assert all(r > (1.5 if square else 20) for r in ratios), ratios
    bf16 = (normal.view(np.uint32) & 0xFFFF0000).view(np.float32)[:2000]  # narrow: their sums exact
    native.segment_sums(bf16, np.array([0, 1000], np.int64), square, sums[:2], errs[:2])
    exact = [sum((Fraction(float(v)) ** (2 if square else 1) for v in part), Fraction(0))
             for part in (bf16[:1000], bf16[1000:])]
    assert not errs[:2].any() and [Fraction(v) for v in sums[:2]] == exact


@pytest.mark.parametrize("edge", [-23, -24])
def test_a_block_of_24_bit_parts_sums_exactly_at_and_past_the_window_edge(edge):
    """63 parts of 24 significant bits at the top of binade 0 and one 24-bit part 23 binades down
    (summed with them: 53 bits) or 24 down (past the window: a bucket of its own; summed with them
    it would lose its last bit), as float32 magnitudes (an L1 sum's)."""
    x = np.full(64, np.float32(2 - 2.0**-23), np.float32)
    x[17] = np.float32((1 + 2.0**-23) * 2.0**edge)
    truth = sum((Fraction(float(v)) for v in x), Fraction(0))
    assert Fraction(_lane_sum(x, None).units, 2**exact.UNIT) == truth
    a, b = (np.zeros((exact._LANES, 4096 + exact._LANE_PAD)) for _ in range(2))
    native.dot_buckets_pair(x, np.ones_like(x), a, b)
    with np.errstate(all="ignore"):
        pair = [exact._summed(s[:, :4096].sum(axis=0), x, np.float32(1), x.size) for s in (a, b)]
    assert [Fraction(s.units, 2**exact.UNIT) for s in pair] == [truth, truth]


@pytest.mark.parametrize("top", [-102, -103, -104, -126, 128])
def test_narrow_products_made_in_float32_lose_nothing_at_its_range_edges(top):
    """A block's products are made in float32 where that is exact: BF16 products whose exact value
    falls below float32's normal range (rounded there, or to zero) or above it (an infinity) must
    not be taken so. Products of 16 significant bits, the largest in binade `top`, the others down
    to 23 binades below it, against Fractions."""
    rng = np.random.default_rng(top & 0xFF)
    odd = np.float32(1 + 2.0**-7)  # BF16's last bit: the product of two has 15 bits below its first
    exps = rng.integers(-23, 1, 192)
    exps[::64] = 0  # each block's largest
    x = (odd * np.exp2(exps // 2 + top // 2).astype(np.float32) * rng.choice([-1, 1], 192)).astype(np.float32)
    y = (odd * np.exp2(exps - exps // 2 + top - top // 2).astype(np.float32)).astype(np.float32)
    x[70] = np.float32(2.0**-90) * odd  # a product whose last bits fall below float32's least subnormal
    x[130] = np.float32(2.0**-100)  # a product below float32's range whole (zero there), but at 128
    assert not np.isinf(x).any() and not np.isinf(y).any() and np.all((x.view(np.uint32) & 0xFFFF) == 0)
    truth = sum((Fraction(float(p)) * Fraction(float(q)) for p, q in zip(x, y)), Fraction(0))
    got = _lane_sum(x, y)
    if top == 128:  # products past float32's range: finite in float64, and summed so
        assert (got.pinf, got.ninf, got.nan) == (0, 0, 0)
    assert Fraction(got.units, 2**exact.UNIT) == truth


@pytest.mark.parametrize("top", [-102, -103, -104, -126, 128])
def test_segment_sums_take_a_block_whole_only_where_float32_holds_its_parts(top):
    """A segment's block of 64 is summed as one exact addition where float32 holds each value and
    square: squares of BF16 values (the largest in binade `top`, one far below float32's least
    subnormal) and of values of 13 significant bits (too many for float32's square), against
    Fractions: the bound holds, and is 0 only where the sum is exact."""
    rng = np.random.default_rng(top & 0xFF)
    odd = np.float32(1 + 2.0**-7)
    half = np.exp2(np.concatenate([[0], rng.integers(-11, 1, 127)]) + top / 2).astype(np.float32)
    bf16 = (odd * half * rng.choice([-1, 1], 128)).astype(np.float32)
    bf16[70] = np.float32(2.0**-71) * odd  # its square: bits below float32's least subnormal
    wide = np.float32(1 + 2.0**-12) * np.ones(64, np.float32) * rng.choice([-1, 1], 64).astype(np.float32)
    for x, square in ((bf16, True), (bf16, False), (wide, True)):
        assert np.isfinite(x).all()
        sums, errs = np.empty(2), np.empty(2)
        native.segment_sums(x, np.array([0, 64], np.int64), square, sums, errs)
        for got, err, part in zip(sums, errs, (x[:64], x[64:])):
            exact = sum((Fraction(float(v)) ** (2 if square else 1) for v in part), Fraction(0))
            error = abs(Fraction(got) - exact)
            assert error <= Fraction(err) * (1 + Fraction(2) ** -40) and (err > 0 or error == 0), (square, got, err)
