"""methods/steps.py's per-row sums: rows a piece holds whole are rounded from float64 sums only where
their error bound proves the rounding, else summed again exactly; the result equals exact sums
rounded once, for every cut."""

from __future__ import annotations

import numpy as np
import pytest

from raymerge.methods.steps import grouped_values, per_row, row_sums
from raymerge.ops.exact import dot_sum
from raymerge.ops.numpy_kernel import NUMPY


def exact_rows(x: np.ndarray, length: int, square: bool) -> list[np.float32]:
    rows = x.reshape(-1, length)
    return [dot_sum(r, r).sqrt_float32() if square else dot_sum(r, np.float32(1)).to_float32() for r in rows]


def pieces(x: np.ndarray, length: int, cuts: list[int], chunk: int, roots: tuple[bool, ...]) -> list:
    bounds = [0, *cuts, x.size]
    results = []
    for lo, hi in zip(bounds, bounds[1:]):
        scratch = NUMPY.scratch(chunk)
        results.append((lo, row_sums(NUMPY, scratch, lo, hi - lo, length, roots,
                                     lambda at, m, lo=lo: [x[lo + at:lo + at + m]] * len(roots), False)))
    return grouped_values(results, x.size // length, len(roots),
                          lambda i, s: s.sqrt_float32() if roots[i] else s.to_float32())


@pytest.mark.parametrize("loops", ["native", "numpy"])
@pytest.mark.parametrize("cuts,chunk", [([], 64), ([5, 300, 301], 7), (list(range(50, 1200, 50)), 1000)])
def test_row_sums_are_exact_sums_rounded_once(cuts, chunk, loops, monkeypatch):
    """Whatever sums the float64 path (compiled segment_sums, or numpy's reduceat)."""
    from raymerge.ops import native

    if loops == "numpy":
        monkeypatch.setattr(native, "loops", None)
    elif native.loops is None:
        pytest.skip("raymerge.ops._native was not built here")
    rng = np.random.default_rng(3)
    length = 40
    x = (rng.standard_normal(1200) * np.exp(rng.uniform(-20, 20, 1200))).astype(np.float32)
    # Rows whose float64 sum lands on a float32 midpoint while the exact sum lies just above it.
    x[:3] = np.float32([1.0, 2.0**-24, 2.0**-60])
    x[3:40] = 0
    x[40:43] = np.float32([3.0, 2.0**-23, -(2.0**-70)])
    x[43:80] = 0
    got = pieces(x, length, cuts, chunk, (False, True))
    assert [float(v) for v in got[0]] == [float(v) for v in exact_rows(x, length, False)]
    assert [float(v) for v in got[1]] == [float(v) for v in exact_rows(x, length, True)]
    assert got[0][0] == np.float32(1 + 2.0**-23)  # not the midpoint's even neighbour: the exact sum's rounding


@pytest.mark.parametrize("loops", ["native", "numpy"])
def test_row_sums_near_float32_midpoints_round_as_the_exact_sums(loops, monkeypatch):
    """Rows whose exact sum lies a hair above or below a float32 midpoint, hidden among values that
    cancel (a float64 sum of them loses the hair): each row's rounding is the exact sum's, by the
    error bound or the exact path."""
    from raymerge.ops import native

    if loops == "numpy":
        monkeypatch.setattr(native, "loops", None)
    elif native.loops is None:
        pytest.skip("raymerge.ops._native was not built here")
    rng = np.random.default_rng(9)
    length, count = 24, 400
    rows = np.zeros((count, length), np.float32)
    for r in rows:
        base = np.float32(rng.uniform(1, 2)) * np.float32(2.0 ** rng.integers(-10, 10))
        half_ulp = np.spacing(base) / 2
        big = np.float32(2.0 ** rng.integers(20, 40))
        hair = np.float32(np.spacing(half_ulp) * 2.0 ** -rng.integers(10, 40)) * rng.choice([-1, 1])
        parts = [base, np.float32(half_ulp), big, -big, np.float32(big / 3), -np.float32(big / 3), hair]
        r[:len(parts)] = parts
        rng.shuffle(r)
    x = rows.reshape(-1)
    got = pieces(x, length, [length * 100 + 5], 1000, (False,))
    assert [float(v) for v in got[0]] == [float(v) for v in exact_rows(x, length, False)]


@pytest.mark.parametrize("loops", ["native", "numpy"])
@pytest.mark.parametrize("compute", ["BF16", None])
def test_kept_values_come_back_bit_for_bit_nan_payloads_included(compute, loops, monkeypatch):
    """steps.keep stores BF16 values in 2 bytes each until a chunk holds a NaN whose payload lies in
    the low half; from then on the whole array as float32. `carried` gives every chunk back exactly."""
    from raymerge.methods.base import Operands
    from raymerge.methods.steps import carried, keep
    from raymerge.ops import native

    if loops == "numpy":
        monkeypatch.setattr(native, "loops", None)
    elif native.loops is None:
        pytest.skip("raymerge.ops._native was not built here")

    rng = np.random.default_rng(5)
    values = rng.standard_normal(3000).astype(np.float32)
    NUMPY.round_to(values, "BF16")
    values.view(np.uint32)[[7, 2100]] = [0x7FC00000, 0xFFC00000]  # NaNs with an empty low half
    values.view(np.uint32)[2500] = 0x7F800123  # a signalling NaN's payload in the low half
    store: dict = {}
    operands = Operands(None, (), compute=compute, keep=store)
    scratch = NUMPY.scratch(1000)
    for at in range(0, 3000, 1000):
        keep(NUMPY, operands, scratch, "mean", values[at:at + 1000], at, 3000)
        if compute == "BF16" and at < 2000:
            assert store["mean"].dtype == np.uint16  # 2 bytes an element, while every value is a BF16's
    assert store["mean"].dtype == np.float32
    back = Operands(None, (), compute=compute, carried=store)
    got = np.empty(3000, np.float32)
    for at in range(0, 3000, 700):
        m = min(700, 3000 - at)
        assert carried(NUMPY, back, "mean", got[at:at + m], at, m)
    assert (got.view(np.uint32) == values.view(np.uint32)).all()
    assert not carried(NUMPY, back, "tangent", got, 0, 10) and not carried(NUMPY, Operands(None, ()), "mean", got, 0, 10)


@pytest.mark.parametrize("length", [1, 3, 7, 16])
def test_per_row_gives_each_element_its_rows_value(length):
    """Every span of elements, starting and ending anywhere in a row: its row's value at each."""
    values = np.arange(1, 41, dtype=np.float32) * np.float32(1.5)
    n = values.size * length
    scratch = NUMPY.scratch(n)
    for begin in range(0, n):
        for m in range(1, min(n - begin, 3 * length + 2) + 1):
            want = values[np.arange(begin, begin + m) // length]
            got = per_row(NUMPY, scratch, "rows", begin, m, length, values)
            np.testing.assert_array_equal(np.broadcast_to(got, (m,)), want, err_msg=f"begin {begin}, m {m}")


def test_a_fused_keep_writes_the_halves_in_its_program_and_gives_up_on_a_value_no_bf16_holds():
    """Given a `fused` kernel, steps.keep makes the halves a step of the program (the kept row need
    not be written to memory); a chunk holding a value no BF16 holds (a NaN's payload in the low
    half) makes the piece keep nothing of the name, None, so that the next pass computes it again
    (`carried` says so), and the chunks after it keep nothing either."""
    from raymerge.methods.base import Operands
    from raymerge.methods.steps import carried, keep
    from raymerge.ops import native
    from raymerge.ops import fused as fused_module
    from raymerge.ops.fused import discard, fused

    if native.loops is None:
        pytest.skip("raymerge.ops._native was not built here")
    rng = np.random.default_rng(6)
    values = rng.standard_normal(3000).astype(np.float32)
    NUMPY.round_to(values, "BF16")
    for spoiled in (False, True):
        if spoiled:
            values.view(np.uint32)[1500] = 0x7F800123  # in the second of three chunks
        store: dict = {}
        operands = Operands(None, (), compute="BF16", keep=store)
        scratch = NUMPY.scratch(1000)
        row = np.zeros(1000, np.float32)
        for at in range(0, 3000, 1000):
            with fused(NUMPY) as k:
                k.copy(row, values[at:at + 1000])
                keep(k, operands, scratch, "mean", row, at, 3000)
                assert (k._code[-1][0] == fused_module._HALVES) is not (spoiled and at > 1000)  # the halves: a step
                discard(k, row)
            assert not row.any()  # its values in the cache only
            assert (store["mean"] is None) is (spoiled and at >= 1000)
        back = Operands(None, (), compute="BF16", carried=store)
        got = np.empty(3000, np.float32)
        assert carried(NUMPY, back, "mean", got, 0, 3000) is not spoiled
        assert spoiled or (got.view(np.uint32) == values.view(np.uint32)).all()
