"""ops/exact.py: exact sums of products of float32 values, against Python's Fractions."""

from __future__ import annotations

from decimal import Decimal, getcontext
from fractions import Fraction

import numpy as np
import pytest

from raymerge.ops.exact import UNIT, ExactSum, dot_sum, dot_sum_pair, round_float32

pytestmark = pytest.mark.usefixtures("both_loops")


def fraction_sum(x: np.ndarray, y: np.ndarray) -> Fraction:
    return sum((Fraction(float(a)) * Fraction(float(b)) for a, b in zip(x, y)), Fraction(0))


def nearest_float32(value, exact) -> np.float32:
    """The float32 nearest to `exact` (ties to even) among the neighbours of `value`."""
    value = np.float32(value)
    near = [np.nextafter(value, np.float32(-np.inf)), value, np.nextafter(value, np.float32(np.inf))]
    return min(near, key=lambda c: (abs(Fraction(float(c)) - Fraction(exact)), int(c.view(np.uint32)) & 1))


@pytest.mark.parametrize("seed", range(6))
def test_sums_are_exact_whatever_the_cut_and_round_once(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4000))
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-40, 40, n))).astype(np.float32)  # sums finite in float32
    y = (rng.standard_normal(n) * np.exp(rng.uniform(-40, 40, n))).astype(np.float32)
    x[: min(n, 4)] = np.float32([1e-45, -1e-45, 0.0, -0.0])[: min(n, 4)]  # subnormal products, zeros
    exact = fraction_sum(x, y)
    s = dot_sum(x, y)
    assert Fraction(s.units, 2**UNIT) == exact
    cut = int(rng.integers(0, n + 1))
    assert (dot_sum(x[:cut], y[:cut]) + dot_sum(x[cut:], y[cut:])).units == s.units
    assert s.to_float32() == nearest_float32(float(exact), exact)
    squares = dot_sum(x, x)
    getcontext().prec = 90
    root = Decimal(squares.units).sqrt() / Decimal(2) ** (UNIT // 2)
    got = squares.sqrt_float32()
    near = [np.nextafter(got, np.float32(-np.inf)), got, np.nextafter(got, np.float32(np.inf))]
    assert got == min(near, key=lambda c: abs(Decimal(float(c)) - root))
    assert ExactSum.from_json(s.to_json()) == s


def test_narrow_values_sum_exactly_without_the_split():
    rng = np.random.default_rng(9)
    bf16 = ((rng.standard_normal(5000) * 0.02).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    assert dot_sum(bf16, bf16, narrow=True).units == dot_sum(bf16, bf16).units == fraction_sum(bf16, bf16) * 2**UNIT
    assert dot_sum(bf16, np.float32(1), narrow=True) == dot_sum(bf16, np.float32(1))


@pytest.mark.parametrize("seed", range(3))
def test_a_sum_and_what_a_mask_keeps_of_it_in_one_loop(seed):
    """dot_sum_pair(x, mask): the sum of x and of x * mask, exactly (Fractions), and an infinity or
    NaN the mask drops is a NaN of the second sum (inf * 0), as the product of the drop is."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    x = np.abs((rng.standard_normal(n) * np.exp(rng.uniform(-30, 30, n))).astype(np.float32))
    mask = (rng.random(n) < 0.4).astype(np.float32)
    before, after = dot_sum_pair(x, mask)
    assert Fraction(before.units, 2**UNIT) == fraction_sum(x, np.ones(n, np.float32))
    assert Fraction(after.units, 2**UNIT) == fraction_sum(x, mask)
    x[:3] = np.float32([np.inf, np.nan, np.inf])
    mask[:3] = np.float32([1, 1, 0])
    before, after = dot_sum_pair(x, mask)
    assert (before.pinf, before.nan, after.pinf, after.nan) == (2, 1, 1, 2)
    assert (before, after) == (dot_sum(x, np.float32(1), narrow=True), dot_sum(x, mask, narrow=True))


def test_infinities_and_nans_decide_the_sum():
    inf, nan = np.float32(np.inf), np.float32(np.nan)
    assert dot_sum(np.float32([inf, 1]), np.float32([2, 3])).to_float32() == np.inf
    assert dot_sum(np.float32([inf, -inf]), np.float32([1, 1])).to_float32() != dot_sum(
        np.float32([inf, -inf]), np.float32([1, 1])).to_float32()  # NaN
    assert np.isnan(dot_sum(np.float32([nan, 1]), np.float32([1, 1])).to_float32())
    assert np.isnan(dot_sum(np.float32([inf]), np.float32([-1])).sqrt_float32())


def test_round_float32_rounds_half_to_even_and_overflows():
    assert round_float32(2**24 + 1, 0) == np.float32(2**24)  # a tie: to even
    assert round_float32(2**24 + 3, 0) == np.float32(2**24 + 4)
    assert round_float32(-(2**24 + 3), 0) == np.float32(-(2**24 + 4))
    assert round_float32(1, 200) == np.inf
    assert round_float32(1, -149) == np.float32(1e-45)


def test_chunk_sums_kept_as_buckets_add_up_exactly_and_flush_before_they_could_round(monkeypatch):
    """dot_sum's results keep per-exponent float64 sums and adding them adds the arrays; where the
    parts added would reach MAX_ELEMENTS, the sum is made an integer first (a bucket would round)."""
    import raymerge.ops.exact as exact

    rng = np.random.default_rng(3)
    x = (rng.standard_normal(40) * np.exp(rng.uniform(-30, 30, 40))).astype(np.float32)
    want = fraction_sum(x, x) * 2**UNIT
    monkeypatch.setattr(exact, "MAX_ELEMENTS", 12)  # a chunk of 5 makes 10 parts (a high and a low each)
    total = ExactSum()
    for lo in range(0, 40, 5):
        total = total + dot_sum(x[lo:lo + 5], x[lo:lo + 5])
    assert total.units == want
    assert ExactSum(7) + ExactSum(buckets=np.zeros(2048), parts=1) == ExactSum(7)
