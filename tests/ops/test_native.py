"""raymerge/ops/_native.c: the compiled loops give the bits of their numpy forms and of torch."""

from __future__ import annotations

import shutil
import sysconfig

import numpy as np
import pytest
import torch

import raymerge.ops.exact as exact
import raymerge.ops.numpy_kernel as numpy_kernel
from raymerge.ops.numpy_kernel import NUMPY

native = pytest.importorskip("raymerge.ops._native", reason="not built here (no C compiler at install)")


def test_the_loops_are_built_wherever_a_c_compiler_is():
    """An install with a compiler must build them (setuptools only warns when it cannot): on this
    machine the numpy loops would silently make every statistics pass slower."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no {compiler} here")
    assert native.__file__.endswith(sysconfig.get_config_var("EXT_SUFFIX"))


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
    monkeypatch.setattr(numpy_kernel, "_native", None)
    slow = x.copy()
    NUMPY.round_to(slow, "BF16")
    assert np.array_equal(fast.view(np.uint32), slow.view(np.uint32))


@pytest.mark.parametrize("narrow", [False, True])
def test_dot_buckets_equal_numpy_bincounts(narrow):
    rng = np.random.default_rng(11)
    x = _hard_float32(9001, 3)
    y = _hard_float32(9001, 4)
    if narrow:  # values of at most 12 significant bits
        x = (x.view(np.uint32) & 0xFFF80000).view(np.float32)
        y = (y.view(np.uint32) & 0xFFF80000).view(np.float32)
    x[rng.integers(0, x.size, 50)] = 0.5
    lanes = np.zeros((4, 4096))
    native.dot_buckets(x, y, lanes, narrow)
    with np.errstate(all="ignore"):
        want = exact._numpy_buckets(x, y, None, narrow)
    got = lanes.sum(axis=0)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)])


def test_high_counts_equal_numpy_bincounts_and_refuse_a_sign_bit():
    bits = _hard_float32(50000, 5).view(np.uint32) & 0x7FFFFFFF
    counts = np.zeros(1 << 15, np.int64)
    counts[7] = 3  # added to
    native.high_counts(bits, counts)
    want = np.bincount(bits >> 16, minlength=1 << 15)
    want[7] += 3
    assert np.array_equal(counts, want)
    with pytest.raises(ValueError, match="no magnitude"):
        native.high_counts(np.uint32([0x80000000]), counts)
    with pytest.raises(ValueError, match="1 << 15"):
        native.high_counts(bits, np.zeros(10, np.int64))


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
