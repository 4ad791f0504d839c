"""raymerge/ops/fused.py: a chain of steps recorded and run as one compiled loop gives the bits of the
same steps run one at a time by the numpy kernel, including steps it cannot record (run at once,
in order) and arrays that overlap in part."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raymerge.ops import fused as fused_module
from raymerge.ops import exact as exact_module
from raymerge.ops import native
from raymerge.ops.exact import UNIT, Lanes, dot_sum
from raymerge.ops.fused import Program, discard, fused
from raymerge.ops.numpy_kernel import NUMPY

pytest.importorskip("raymerge.ops._native", reason="not built here (no C compiler at install)")

N = 3000  # elements: several of the loop's blocks of 512, the last one short


def _values(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 values of every kind: random bit patterns (NaNs, infinities, subnormals) among
    ordinary ones, ties of a BF16 rounding, zeros."""
    x = (rng.standard_normal(n) * 0.02).astype(np.float32)
    bits = x.view(np.uint32)
    bits[::7] = rng.integers(0, 2**32, bits[::7].size, dtype=np.uint64).astype(np.uint32)
    bits[3::11] = (bits[3::11] & 0xFFFF0000) | 0x8000
    x[5::13] = 0
    return x


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bits, a NaN's payload aside (which NaN operand the hardware passes on is its own choice,
    in a compiled loop as in numpy's; methods replay NaNs with the kernels' rule)."""
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and np.array_equal(a.view(np.uint32)[~nan], b.view(np.uint32)[~nan]))


def _chain(k, rng_seed: int, rows: np.ndarray, sources: list) -> None:
    """A random chain of the steps a method's rule makes (rows: a table of float32 rows)."""
    rng = np.random.default_rng(rng_seed)
    for i, s in enumerate(sources):
        k.widen(rows[i], s, None)
    ops = [k.add, k.subtract, k.multiply, k.divide, k.greater, k.greater_equal, k.equal]
    scalars = [np.float32(0.37), 1.5, 3, np.float32(-0.0), np.float32(np.inf), np.float64(0.1)]
    for _ in range(40):
        r = rng.integers(0, 10)
        out = rows[rng.integers(0, len(rows))]
        x = rows[rng.integers(0, len(rows))]
        if r < 7:
            y = rows[rng.integers(0, len(rows))] if rng.random() < 0.6 else scalars[rng.integers(0, len(scalars))]
            if rng.random() < 0.2:
                x, y = y, x  # a scalar first, too
            ops[r](x, y, out)
        elif r == 7:
            k.round_to(out, "BF16" if rng.random() < 0.8 else "F16")
        elif r == 8:
            k.copy(out, x)
        else:
            k.fill(out, scalars[rng.integers(0, 3)])


@pytest.mark.parametrize("seed", range(20))
def test_a_recorded_chain_gives_the_bits_of_its_steps_one_at_a_time(seed):
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):
        sources = [(_values(rng, N).view(np.uint32) >> 16).astype(np.uint16),  # BF16 bits
                   _values(rng, N).astype(np.float16), _values(rng, N)]
    expected = np.zeros((5, N), np.float32)
    got = np.zeros((5, N), np.float32)
    with np.errstate(all="ignore"):
        _chain(NUMPY, seed, expected, sources)
        with fused(NUMPY) as k:
            assert isinstance(k, Program)
            _chain(k, seed, got, sources)
    assert all(_same(a, b) for a, b in zip(expected, got))


def test_steps_it_cannot_record_run_in_order_with_the_recorded_ones():
    """A float64 scalar, a float16 source, arrays overlapping in part and a step of another length
    run as the kernel's own, after the steps recorded before them: the same result."""
    rng = np.random.default_rng(7)
    a = _values(rng, N)
    with np.errstate(over="ignore"):
        half = _values(rng, N).astype(np.float16)

    def steps(k, buf: np.ndarray) -> None:
        k.widen(buf[:N], half, None)
        k.multiply(buf[:N], np.float64(0.1), buf[:N])  # float64: numpy computes it in float64
        k.add(buf[:N], a, buf[:N])
        k.multiply(buf[1:N + 1], np.float32(3), buf[1:N + 1])  # overlaps buf[:N] in part: after the add
        k.round_to(buf[:N], "BF16")
        k.divide(buf[:10], buf[N:N + 10], buf[N:N + 10])  # another length

    expected, got = np.zeros(N + 10, np.float32), np.zeros(N + 10, np.float32)
    with np.errstate(all="ignore"):
        steps(NUMPY, expected)
        with fused(NUMPY) as k:
            steps(k, got)
    assert _same(expected, got)


def test_a_step_not_recorded_leaves_nothing_behind_for_the_next_program():
    """A step given up on after its first operand was taken (a float64 scalar), then steps of
    another length: each as numpy gives it. Two numbers: numpy's float64 sum, rounded once."""
    a, b = np.ones(4, np.float32), np.ones(8, np.float32)
    with fused(NUMPY) as k:
        k.multiply(a, np.float64(2), a)
        k.multiply(b, np.float32(3), b)
        for _ in range(40):  # more arrays than one program takes, each given up on
            k.add(np.ones(4, np.float32), np.float64(1), np.empty(4, np.float32))
        k.add(1.0, 2.0**-24 + 2.0**-50, a)
    assert (a == np.float32(1.0000001)).all() and (b == 3).all()


def test_any_other_primitive_runs_what_was_recorded_first():
    x = np.arange(N, dtype=np.float32)
    with fused(NUMPY) as k:
        k.multiply(x, np.float32(2), x)
        assert k.to_host(x, None)[3] == 6  # to_host: the recorded step has run
        k.add(x, np.float32(1), x)
    assert x[3] == 7


def test_without_the_compiled_loops_it_is_the_kernel_itself(monkeypatch):
    monkeypatch.setattr(native, "loops", None)
    with fused_module.fused(NUMPY) as k:
        assert k is NUMPY


@pytest.mark.parametrize("seed", range(8))
def test_a_discarded_table_is_not_written_and_what_is_kept_keeps_its_bits(seed):
    """The random chain again, its table discarded but for row 0: row 0 is the chain's own, its
    bits whatever the other rows held in the cache only (a step it cannot record runs the steps
    before it, which write through: only the block's last run keeps rows in the cache)."""
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):
        sources = [(_values(rng, N).view(np.uint32) >> 16).astype(np.uint16), _values(rng, N)]
    expected = np.zeros((5, N), np.float32)
    got = np.zeros((5, N), np.float32)
    with np.errstate(all="ignore"):
        _chain(NUMPY, seed, expected, sources)
        with fused(NUMPY) as k:
            _chain(k, seed, got, sources)
            fused_module.discard(k, got, keep=(got[0],))
    assert _same(expected[0], got[0])


def test_a_discarded_row_read_inside_the_block_holds_its_value():
    """Only the block's last run keeps discarded rows in the cache: a value read before it (here
    by to_host, which runs the steps so far) was written."""
    x = np.arange(N, dtype=np.float32)
    rows = np.zeros((2, N), np.float32)
    with fused(NUMPY) as k:
        fused_module.discard(k, rows, keep=(rows[1],))
        k.multiply(x, np.float32(2), rows[0])
        assert k.to_host(rows[0], None)[3] == 6
        k.add(rows[0], np.float32(1), rows[0])  # the last run: rows[0] written in the cache only
        k.add(rows[0], np.float32(1), rows[1])
    assert rows[0][3] == 6 and rows[1][3] == 8


def test_one_memory_under_two_indices_is_never_discarded():
    """Two array objects over the same row: a step that writes one is read through the other."""
    row = np.zeros(N, np.float32)
    a, b = row[:], row.view()
    x = np.arange(N, dtype=np.float32)
    assert native.loops.run_program(np.array([(2, 0, 2, -1), (2, 1, 1, -1)], np.int32), [a, b, x],
                                    np.array([1.0], np.float32), bytes([1, 0, 0]))
    assert row[3] == 5  # (x + 1) + 1, each step through its own object: the first step's write was seen


def test_a_write_through_a_view_of_an_array_read_through_a_read_only_one():
    """Two objects over one memory, the first read-only: a step that writes the second writes it."""
    buf = np.arange(N, dtype=np.float32)
    ro = buf.view()
    ro.flags.writeable = False
    out = np.empty(N, np.float32)
    with fused(NUMPY) as k:
        k.add(ro, np.float32(1), out)
        k.multiply(out, np.float32(2), buf)
    assert buf[3] == 8 and out[3] == 4


@pytest.mark.parametrize("seed", range(6))
def test_a_rounding_after_the_step_that_wrote_its_array_is_folded_into_that_step(seed):
    """A method's `rnd(step(...))`: the step carries the rounding (one loop, no step of its own),
    compiled and one at a time, with the bits of the two primitives run in turn; a rounding of
    another array, or after a comparison, stays a step."""
    rng = np.random.default_rng(seed)
    a, b = _values(rng, N), _values(rng, N)
    want = np.zeros((3, N), np.float32)
    got = np.zeros((3, N), np.float32)

    def chain(k, rows):
        for i, op in enumerate((k.add, k.subtract, k.multiply, k.divide)):
            op(a if i % 2 else rows[0], b, rows[i % 3])
            k.round_to(rows[i % 3], "BF16")
            k.multiply(rows[i % 3], np.float32(1.7), rows[(i + 1) % 3])
            k.round_to(rows[i % 3], "BF16")  # not the last step's array: a step of its own
        k.greater(rows[0], rows[1], rows[2])
        k.round_to(rows[2], "BF16")

    with np.errstate(all="ignore"):
        chain(NUMPY, want)
        with fused(NUMPY) as k:
            chain(k, got)
            code = list(k._code)
            folded = [op for op, *_ in code if op & fused_module._ROUNDED]
            assert len(folded) == 4 and sum(op == fused_module._ROUND_BF16 for op, *_ in code) == 5
    assert all(_same(x, y) for x, y in zip(want, got))


def test_the_folded_rounding_one_step_at_a_time():
    rng = np.random.default_rng(3)
    a, b = _values(rng, N), _values(rng, N)
    out, want = np.zeros(N, np.float32), np.zeros(N, np.float32)
    with np.errstate(all="ignore"):
        NUMPY.multiply(a, b, want)
        NUMPY.round_to(want, "BF16")
        program = Program(NUMPY)
        program.multiply(a, b, out)
        program.round_to(out, "BF16")
        [(op, d, x, y)] = program._code
        assert op == fused_module._MULTIPLY | fused_module._ROUNDED
        program._one_at_a_time(program._code, program._arrays, program._scalars, None)
    assert _same(out, want)


def test_run_program_refuses_the_rounding_flag_on_a_step_that_is_not_arithmetic():
    x = np.ones(8, np.float32)
    code = np.array([[fused_module._COPY | fused_module._ROUNDED, 0, 1, 0]], np.int32)
    with pytest.raises(ValueError, match="out of range"):
        native.loops.run_program(code, [x, x.copy()], np.zeros(0, np.float32))


def test_a_rounding_of_a_strided_view_of_the_step_s_array_is_not_folded():
    """out[::2] spans out's memory but is half its elements: rounded alone, as numpy rounds it."""
    rng = np.random.default_rng(8)
    a, b = _values(rng, N), _values(rng, N)
    got, want = np.zeros(N, np.float32), np.zeros(N, np.float32)
    with np.errstate(all="ignore"):
        NUMPY.multiply(a, b, want)
        NUMPY.round_to(want[::2], "BF16")
        with fused(NUMPY) as k:
            k.multiply(a, b, got)
            k.round_to(got[::2], "BF16")
            assert not any(op & fused_module._ROUNDED for op, *_ in k._code)
    assert _same(got, want)


def test_a_folded_rounding_keeps_a_nan_as_it_is():
    """The folded rounding keeps a NaN whole, its low half included, as BF16 rounding does
    everywhere: also one whose rounding increment would carry out of its payload (0x7FFFFFFF would
    become -0.0), told apart from the numbers by a float comparison in the compiled loop."""
    nans = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7FFF8000, 0x7FC0FFFF, 0xFFC12345] * 300, np.uint32).view(np.float32)
    out, want = np.empty_like(nans), np.empty_like(nans)
    with np.errstate(all="ignore"):
        NUMPY.multiply(nans, np.float32(1), want)
        NUMPY.round_to(want, "BF16")
        with fused(NUMPY) as k:
            k.multiply(nans, np.float32(1), out)
            k.round_to(out, "BF16")
            assert [op for op, *_ in k._code] == [fused_module._MULTIPLY | fused_module._ROUNDED]
    assert np.array_equal(want.view(np.uint32), nans.view(np.uint32))
    assert np.array_equal(out.view(np.uint32), nans.view(np.uint32))


def _narrow(rng: np.random.Generator, n: int, spread: float) -> np.ndarray:
    """BF16 values of magnitudes over 10**-spread .. 10**spread, with infinities, a NaN, zeros and
    values whose float32 product overflows."""
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-spread, spread, n)).astype(np.float32)
    x = (x.view(np.uint32) & 0xFFFF0000).view(np.float32)
    for v in (np.inf, -np.inf, np.nan, 0.0, 3e38, -3e38):
        x[rng.integers(0, n)] = v
    return x


@pytest.mark.parametrize("n", [1, 63, 64, 513, N])
@pytest.mark.parametrize("spread", [0, 30])
def test_a_program_s_sums_are_dot_sum_s_and_need_no_row_written(n, spread):
    """Squares, products with an array and with a number, made block by block from the rows of a
    discarded table: the very ExactSums of exact.dot_sum (infinities and NaNs counted), though the
    summed row is written nowhere."""
    rng = np.random.default_rng(n + spread)
    x, y = _narrow(rng, n, spread), _narrow(rng, n, spread)
    table = np.full((2, n), 7.0, np.float32)
    lanes = Lanes(4)
    with np.errstate(all="ignore"):
        with fused(NUMPY) as k:
            k.copy(table[0], x)
            k.multiply(table[0], np.float32(1), table[1])
            for j, other in enumerate((table[1], y, np.float32(1), np.float32(-0.5))):
                k.sum(table[1], other, lanes, j)
            discard(k, table)
        want = [dot_sum(x, other, narrow=True) for other in (x, y, np.float32(1), np.float32(-0.5))]
    assert lanes.sums() == want
    assert (table == 7.0).all()


@pytest.mark.parametrize("bits", [8, 11])
def test_a_program_s_sums_of_blocks_far_apart_in_magnitude(bits):
    """Products summed block by block where each 64-element block has a magnitude of its own (its
    neighbours' within float64's window of it or not), some with a far or zero part of their own:
    of BF16 values (products of 16 bits, summed a group of blocks at a time) and of 11-bit ones
    (FP16's, a block at a time), the very ExactSums of exact.dot_sum."""
    rng = np.random.default_rng(bits)
    n = 64 * 300 + 37
    keep = np.uint32(0xFF800000 | ((1 << (bits - 1)) - 1) << (24 - bits))  # sign, exponent, `bits` significant bits

    def values() -> np.ndarray:
        scale = (2.0 ** rng.integers(-30, 30, n // 64 + 1)).repeat(64)[:n]
        x = (rng.standard_normal(n) * scale).astype(np.float32)
        x[rng.integers(0, n, 60)] *= np.float32(2.0 ** -40)
        x[rng.integers(0, n, 5)] = 0
        return (x.view(np.uint32) & keep).view(np.float32)

    x, y = values(), values()
    lanes = Lanes(2)
    with np.errstate(all="ignore"):
        with fused(NUMPY) as k:
            k.sum(x, x, lanes, 0)
            k.sum(x, y, lanes, 1)
        want = [dot_sum(x, x, narrow=True), dot_sum(x, y, narrow=True)]
    assert lanes.sums() == want
    # and the count of 2**-UNIT made here, each product exact in float64 (narrow factors)
    assert [s.units for s in want] == [sum(int(math.ldexp(float(a) * float(b), UNIT)) for a, b in zip(x, other))
                                       for other in (x, y)]


@pytest.mark.parametrize("limit", [None, 4 * 1024])
def test_sums_over_many_programs_add_up_in_one_accumulator(monkeypatch, limit):
    """The chunks' programs add to the same lanes; where a set would take more products than its
    buckets sum exactly (a small limit here), what it holds is settled first: the same sums."""
    rng = np.random.default_rng(9)
    x, y = _narrow(rng, 10 * N, 8), _narrow(rng, 10 * N, 8)
    lanes = Lanes(2)
    with np.errstate(all="ignore"):
        want = [dot_sum(x, x, narrow=True), dot_sum(x, y, narrow=True)]
        if limit:
            monkeypatch.setattr(exact_module, "MAX_ELEMENTS", limit)
        for lo in range(0, x.size, N // 3):
            with fused(NUMPY) as k:
                k.sum(x[lo:lo + N // 3], x[lo:lo + N // 3], lanes, 0)
                k.sum(x[lo:lo + N // 3], y[lo:lo + N // 3], lanes, 1)
    assert lanes.sums() == want


def test_a_program_s_sums_one_step_at_a_time():
    """Arrays that overlap in part run the steps one at a time: the sums are made there, in order."""
    rng = np.random.default_rng(5)
    x = _narrow(rng, N + 1, 3)
    original = x.copy()
    lanes = Lanes(2)
    with np.errstate(all="ignore"):
        with fused(NUMPY) as k:
            k.sum(x[1:], x[1:], lanes, 0)
            k.copy(x[1:], x[:-1])  # overlapping in part
            k.sum(x[1:], np.float32(1), lanes, 1)
        assert lanes.sums() == [dot_sum(original[1:], original[1:], narrow=True),
                                dot_sum(original[:-1], np.float32(1), narrow=True)]


def test_run_program_refuses_a_sum_without_its_lanes():
    x = np.ones(8, np.float32)
    code = np.array([[fused_module._SUM, 0, 0, 0]], np.int32)
    with pytest.raises(ValueError, match="out of range"):
        native.loops.run_program(code, [x], np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="out of range"):
        native.loops.run_program(code, [x], np.zeros(0, np.float32), None, np.zeros(100))


@pytest.mark.parametrize("apart", [True, False])
def test_a_halves_step_keeps_what_bf16_halves_keeps_and_says_when_a_low_half_is_lost(apart):
    """`Program.halves` writes the high halves of a value the program made (its row discarded, in
    the cache only) as bf16_halves would; `on_low` is called once the program has run where a value
    had a low half set, and only then. The same where the program runs one step at a time (arrays
    overlapping in part)."""
    rng = np.random.default_rng(12)
    a, b = (rng.standard_normal(N).astype(np.float32) for _ in range(2))  # numbers: no NaN keeps a low half
    a[5::13] = 0
    for low_set in (False, True):
        if low_set:
            a.view(np.uint32)[N - 3] = 0x7F800123  # a NaN whose payload lies in the low half: the product's keeps it
        want = np.empty(N, np.float32)
        with np.errstate(all="ignore"):
            NUMPY.multiply(a, b, want)
            NUMPY.round_to(want, "BF16")
        rows = np.zeros((2, N), np.float32)
        halves, calls = np.zeros(N, np.uint16), []
        with np.errstate(all="ignore"), fused(NUMPY) as k:
            k.multiply(a, b, rows[0])
            k.round_to(rows[0], "BF16")
            if not apart:
                k.copy(rows[1][1:], rows[1][:-1])  # arrays overlapping in part: one step at a time
            assert k.halves(halves, rows[0], lambda: calls.append(1))
            discard(k, rows)
            assert calls == []  # not run yet
        assert calls == ([1] if low_set else [])
        assert not k.halves(halves, rows[0], lambda: None)  # the block is over: nothing would run it
        expected = np.empty(N, np.uint16)
        assert native.loops.bf16_halves(want, expected) is (not low_set)
        assert np.array_equal(halves, expected)
        assert apart or rows[0][5] == want[5]  # one step at a time: written to memory as it went
        assert not apart or not rows[0].any()  # a discarded row: written in the cache only


def test_run_program_refuses_an_array_written_both_as_float32_and_as_halves():
    x, h = np.ones(8, np.float32), np.zeros(8, np.uint16)
    halves = [fused_module._HALVES, 1, 0, 0]
    assert native.loops.run_program(np.array([halves], np.int32), [x, h], np.zeros(0, np.float32)) == 1
    assert h[0] == 0x3F80
    with pytest.raises(ValueError, match="written both"):
        native.loops.run_program(np.array([halves, [fused_module._COPY, 1, 0, 0]], np.int32), [x, h],
                                 np.zeros(0, np.float32))
    with pytest.raises(TypeError):  # halves into float32s
        native.loops.run_program(np.array([[fused_module._HALVES, 1, 0, 0]], np.int32), [x, x.copy()],
                                 np.zeros(0, np.float32))
