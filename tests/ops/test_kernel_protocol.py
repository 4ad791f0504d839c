"""The kernel protocol: the choice of implementation, the device check, the torch kernel's device
steps (run on the CPU) against the numpy kernel bit for bit, and NaN bits that no chunking changes."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from raymerge.errors import InputError
from raymerge.ops import kernel
from raymerge.ops.numpy_kernel import NUMPY
from raymerge.ops.torch_kernel import TorchKernel

TORCH = TorchKernel("cpu")
BITS = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32}
SPECIAL = {  # NaNs (quiet, signalling, payloads, both signs), infinities, subnormals, zeros, the largest
    "BF16": [0x7FC0, 0xFFC0, 0x7F81, 0xFF81, 0x7FA5, 0x7FFF, 0xFFFF, 0x7F80, 0xFF80, 0x0001, 0x8001, 0x8000, 0x7F7F],
    "F16": [0x7E00, 0xFE00, 0x7C01, 0xFC01, 0x7D55, 0x7FFF, 0xFFFF, 0x7C00, 0xFC00, 0x0001, 0x83FF, 0x8000, 0x7BFF],
    "F32": [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FA5A5A5, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800000,
            0xFF800000, 0x00000001, 0x807FFFFF, 0x7F7F8000, 0x477FF000, 0x3F808000, 0x3F801000],  # last: midpoints
}
NANS = {d: [s for s in SPECIAL[d] if (s & ~(1 << (8 * np.dtype(BITS[d]).itemsize - 1))) > (0x7F80 if d == "BF16" else
                                                                                          0x7C00 if d == "F16" else 0x7F800000)]
        for d in SPECIAL}


def _raw(dtype: str, n: int, rng: np.random.Generator, special: float = 0.2) -> np.ndarray:
    x = rng.standard_normal(n).astype(np.float32)
    raw = {"F32": lambda: x.view(np.uint32).copy(), "F16": lambda: x.astype(np.float16).view(np.uint16),
           "BF16": lambda: (x.view(np.uint32) >> 16).astype(np.uint16)}[dtype]()
    where = rng.random(n) < special
    raw[where] = rng.choice(np.array(SPECIAL[dtype], BITS[dtype]), int(where.sum()))
    return raw


def _run(k, chunk, out_dtype, anchor, terms) -> tuple[np.ndarray, kernel.Sums]:
    """k.weighted_sum over fresh buffers: anchor and terms as (dtype, raw) pairs; the output's raw bits."""
    def v(x):
        return None if x is None else k.view(memoryview(bytearray(x[1].tobytes())), x[0])

    n = anchor[1].size if anchor is not None else terms[0][1][1].size
    out = bytearray(n * np.dtype(BITS[out_dtype]).itemsize)
    sums = k.weighted_sum(k.view(memoryview(out), out_dtype), v(anchor),
                          [(s, v(a), v(b)) for s, a, b in terms], k.scratch(chunk))
    return np.frombuffer(out, BITS[out_dtype]), sums


# The choice, and the device check.

def test_kernel_for_picks_numpy_on_the_cpu_and_torch_otherwise():
    assert kernel.kernel_for("cpu", {"BF16", "F16", "F32", "F64"}) is NUMPY
    assert kernel.kernel_for("cpu", {"BF16", "F8_E4M3"}, threads=3) == TorchKernel("cpu", 3)
    assert kernel.kernel_for("cuda:1", {"BF16"}) == TorchKernel("cuda:1")
    scratch = {NUMPY: 1, TorchKernel("cpu"): 2}  # hashable: a worker's per-thread scratch is keyed by kernel
    assert scratch[kernel.kernel_for("cpu", {"F8_E5M2"})] == 2


def test_choosing_numpy_does_not_import_torch():
    code = ("import sys; from raymerge.ops.kernel import kernel_for; k = kernel_for('cpu', {'BF16'}); "
            "k.weighted_sum(k.view(memoryview(bytearray(4)), 'BF16'), None, [], k.scratch()); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:7"])
def test_a_gpu_worker_without_cuda_fails_at_start_up(device):
    with pytest.raises(InputError, match=r"sees no CUDA GPU.*compute on CPUs \(--gpus-per-worker 0\)"):
        kernel.check_device(device)


def test_check_device_accepts_the_cpu_and_rejects_unknown_devices():
    kernel.check_device("cpu")
    for bad in ("gpu", "cuda:x", "tpu:0"):
        with pytest.raises(InputError, match="unknown device"):
            kernel.check_device(bad)


# The torch kernel's device steps, on the CPU: the numpy kernel's bits exactly.

@pytest.mark.parametrize("din", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("dout", ["BF16", "F16", "F32"])
def test_torch_device_steps_match_the_numpy_kernel_bit_for_bit(din, dout):
    rng = np.random.default_rng(10)
    n = 4099
    r = lambda d=din: (d, _raw(d, n, rng))  # noqa: E731
    cases = {"cast": (r(), []), "one term": (r(), [(0.5, r(), r())]), "no anchor": (None, [(1.0, r(), r())]),
             "several, prefixes": (r(), [(0.7, r(), r()), (1.0, (din, r()[1][:n // 3]), None),
                                         (-1.5, ("F32", _raw("F32", n - 1, rng)), (din, r()[1][:n - 1]))])}
    for name, (anchor, terms) in cases.items():
        want, ws = _run(NUMPY, None, dout, anchor, terms)
        for chunk in (7, 1000, None):
            got, gs = _run(TORCH, chunk, dout, anchor, terms)
            assert np.array_equal(got, want), (name, chunk, np.flatnonzero(got != want)[:5])
            assert (gs.nonfinite, gs.new_nonfinite) == (ws.nonfinite, ws.new_nonfinite), (name, chunk)


# NaN bits: the same whatever the chunking, in both kernels.

@pytest.mark.parametrize("k", [NUMPY, TORCH], ids=["numpy", "torch"])
@pytest.mark.parametrize("din", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("dout", ["BF16", "F16", "F32"])
def test_nan_bits_do_not_depend_on_where_a_chunk_ends(k, din, dout):
    n = 67
    nans = np.array(NANS[din], BITS[din])

    def with_nans(step: int, shift: int) -> tuple[str, np.ndarray]:
        raw = _raw(din, n, np.random.default_rng(step), special=0.0)
        raw[shift::step] = np.resize(np.roll(nans, shift), raw[shift::step].size)  # NaNs meet NaNs at some places
        return din, raw

    anchor, a, b, v = with_nans(3, 0), with_nans(5, 1), with_nans(4, 2), with_nans(7, 3)
    for terms in ([], [(0.5, a, b)], [(1.0, a, None), (0.25, (din, v[1][:40]), b)]):
        outs = {chunk: _run(k, chunk, dout, anchor, terms)[0] for chunk in (1, 2, 3, 5, 8, 13, 64, n, None)}
        for m in (1, 9, 33):  # outputs of odd lengths: the same bits as the first m of the whole
            outs[("first", m)] = _run(k, 3, dout, (din, anchor[1][:m]), [(s, (x[0], x[1][:m]), y if y is None else
                                                                         (y[0], y[1][:m])) for s, x, y in terms])[0]
        whole = _run(NUMPY, None, dout, anchor, terms)[0]
        for key, got in outs.items():
            m = got.size
            assert np.array_equal(got, whole[:m]), (key, len(terms), np.flatnonzero(got != whole[:m])[:5])


def test_the_first_nan_operand_wins_quieted_and_numbers_make_the_default_nan():
    f32 = lambda *u: ("F32", np.array(u, np.uint32))  # noqa: E731
    anchor = f32(0x7FC00001, 0x3F800000, 0x7F800000, 0x3F800000, 0x7F800001)
    a = f32(0xFFC00002, 0xFF800005, 0xFF800000, 0x3F800000, 0x3F800000)
    b = f32(0x3F800000, 0x7FC00003, 0x3F800000, 0x3F800000, 0x3F800000)
    for k in (NUMPY, TORCH):
        got = _run(k, None, "F32", anchor, [(1.0, a, b)])[0]
        # anchor's NaN; a's (signalling, quieted); inf + -inf; a number; the anchor's, quieted
        assert [hex(x) for x in got] == ["0x7fc00001", "0xffc00005", "0xffc00000", "0x3f800000", "0x7fc00001"]
        # a cast keeps a signalling NaN in F32, quiets it in F16 and keeps the payload's top bits
        cast = _run(k, None, "F16", ("F16", np.array([0x7C01, 0xFD55], np.uint16)), [])[0]
        assert [hex(x) for x in cast] == ["0x7e01", "0xff55"]
        assert hex(_run(k, None, "F32", ("F16", np.array([0x7C01], np.uint16)), [])[0][0]) == "0x7f802000"


def test_f16_table_widens_as_numpy_converts_on_this_machine():
    want = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    assert np.array_equal(kernel.f16_to_f32().view(np.uint32), want.view(np.uint32))


def test_numpy_kernel_nans_against_torch_conversions():
    # torch's tensor conversion, float32 -> BF16 and F16, on this machine (a large tensor: its vector body).
    nan32 = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FA5A5A5, 0xFFFFFFFF, 0x7FC02000] * 1000, np.uint32)
    t = torch.from_numpy(nan32.view(np.float32))
    for dout, tdtype in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        got = _run(NUMPY, None, dout, ("F32", nan32), [])[0]
        assert np.array_equal(got, t.to(tdtype).view(torch.int16).numpy().view(np.uint16)), dout
    assert set(_run(NUMPY, None, "BF16", ("F32", nan32), [])[0]) == {0xFFFF}
    # torch's scalar BF16 conversion (c10::BFloat16 made from a float) writes another NaN: 0x7FC0.
    assert torch.tensor(float("nan"), dtype=torch.bfloat16).view(torch.int16).item() & 0xFFFF == 0x7FC0


# The array primitives (TIES, DARE): both kernels alike, and EXACT's NaN rule.

@pytest.mark.parametrize("k", [NUMPY, TORCH], ids=["numpy", "torch"])
def test_array_primitives(k):
    rng = np.random.default_rng(3)
    n = 1001
    scratch = k.scratch(n)
    rows = k.table(scratch, "t", 3)
    assert tuple(rows.shape) == (3, n) and k.table(scratch, "t", 2) is rows  # kept and reused
    x, y, out = rows[0, :n], rows[1, :n], rows[2, :n]
    want_x = _raw("F32", n, rng).view(np.float32)
    want_y = _raw("F32", n, rng).view(np.float32)
    for dtype in ("BF16", "F16", "F32"):  # widening an input: the weighted sum's own rule
        raw = _raw(dtype, n, rng)
        k.widen(x, k.view(memoryview(bytearray(raw.tobytes())), dtype), scratch)
        want = _run(NUMPY, None, "F32", (dtype, raw), [])[0]
        assert np.array_equal(k.to_host(x, scratch).view(np.uint32), want), dtype
    k.from_host(x, want_x)
    k.from_host(y, want_y)
    assert np.array_equal(k.gather(x, np.array([5, 0, 7])).view(np.uint32), want_x[[5, 0, 7]].view(np.uint32))
    with np.errstate(all="ignore"):
        for op, ref in ((k.add, np.add), (k.subtract, np.subtract), (k.multiply, np.multiply), (k.divide, np.divide)):
            for other in (y, np.float32(0.3)):
                op(x, other, out)
                got = k.to_host(out, scratch)
                want = ref(want_x, want_y if other is y else other)
                assert np.array_equal(np.isnan(got), np.isnan(want)), op
                assert np.array_equal(got[~np.isnan(got)].view(np.uint32), want[~np.isnan(want)].view(np.uint32)), op
    for op, ref in ((k.greater, np.greater), (k.greater_equal, np.greater_equal), (k.equal, np.equal)):
        op(x, 0, out)
        assert np.array_equal(k.to_host(out, scratch), ref(want_x, 0).astype(np.float32)), op
    k.fill(out, 2)
    k.put(out, np.array([1, 4]), np.float32([7, 8]))
    k.put(out, np.array([0]), 1.0)
    assert k.to_host(out, scratch)[:5].tolist() == [1, 7, 2, 2, 8]
    bits = k.table(scratch, "bits", 1, bits=True)[0]
    mags = k.to_host(k.magnitude_bits(x, bits), scratch)
    assert mags.dtype == np.uint32 and np.array_equal(mags, want_x.view(np.uint32) & 0x7FFFFFFF)
    mags = k.to_host(k.magnitude_bits(x, bits, nans_equal=True), scratch)
    assert np.array_equal(mags, np.where(np.isnan(want_x), 0x7F800001, want_x.view(np.uint32) & 0x7FFFFFFF))


def test_exact_arithmetic_gives_the_first_nan_operand_quieted():
    from raymerge.ops.numpy_kernel import EXACT

    x = np.array([0x7F800001, 0x3F800000, 0x7F800000, 0xFFC00005, 0x3F800000], np.uint32).view(np.float32)
    y = np.array([0x7FC00002, 0xFF800003, 0xFF800000, 0x7FC00007, 0x3F800000], np.uint32).view(np.float32)
    out = np.empty(5, np.float32)
    with np.errstate(all="ignore"):
        EXACT.add(x, y, out)
        assert [hex(v) for v in out.view(np.uint32)] == ["0x7fc00001", "0xffc00003", "0xffc00000", "0xffc00005",
                                                         "0x40000000"]
        EXACT.multiply(y, 0, out)  # a scalar operand; inf * 0 makes the default NaN
        assert [hex(v) for v in out.view(np.uint32)[:3]] == ["0x7fc00002", "0xffc00003", "0xffc00000"]
