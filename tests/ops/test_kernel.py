"""Both kernels against torch's own whole-tensor float32 arithmetic, bit for bit."""

import numpy as np
import pytest
import torch

from raymerge.ops import kernel, numpy_kernel, torch_kernel

NUMPY, TORCH = numpy_kernel.NUMPY, torch_kernel.TorchKernel("cpu")  # torch: the GPU's steps, on the CPU
MODULE = {NUMPY: numpy_kernel, TORCH: torch_kernel}  # where each kernel's helpers live

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MODULES = pytest.mark.parametrize("module", [NUMPY, TORCH], ids=["numpy", "torch"])


def _bytes(t: torch.Tensor) -> memoryview:
    """A writable buffer holding t's bytes, for `view`."""
    return memoryview(bytearray(t.contiguous().view(torch.uint8).numpy().tobytes()))


def _run(module, out_dtype: str, anchor, terms, chunk: int) -> torch.Tensor:
    """The kernel `module`'s weighted_sum over buffers of the given tensors; the output as a torch tensor."""
    return _run_sums(module, out_dtype, anchor, terms, chunk)[0]


def _run_sums(module, out_dtype: str, anchor, terms, chunk: int) -> tuple[torch.Tensor, kernel.Sums]:
    """Like `_run`, with what weighted_sum returned."""
    n = anchor.numel() if anchor is not None else terms[0][1].numel()
    out = _bytes(torch.zeros(n, dtype=DTYPES[out_dtype]))

    def v(t):
        return None if t is None else module.view(_bytes(t), _name(t.dtype))

    scratch = module.scratch(chunk)
    sums = module.weighted_sum(module.view(out, out_dtype), v(anchor), [(s, v(a), v(b)) for s, a, b in terms],
                               scratch)
    return torch.frombuffer(out, dtype=DTYPES[out_dtype]), sums


def _name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _reference(out_dtype, anchor, terms, n):
    want = anchor.float().clone() if anchor is not None else torch.zeros(n)  # .float() of a float32 is itself
    for s, a, b in terms:
        x = a.float() - b.float() if b is not None else a.float()
        want[:a.numel()] = want[:a.numel()] + s * x
    return want.to(DTYPES[out_dtype])


def _specials(n: int, g: torch.Generator) -> torch.Tensor:
    """float32 values that test rounding: ties, subnormals, overflow, infinities and NaNs, among normal ones."""
    bits = torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int64)
    x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-40, 39, (n,), generator=g)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.0e38, -3.0e38, 1e-45, 1.5e-39])
    ties = (torch.randint(0, 2**16, (n // 8,), generator=g) << 16 | 0x8000).to(torch.int32).view(torch.float32)
    x[: n // 4] = bits[: n // 4].to(torch.int32).view(torch.float32)  # any bit pattern, NaNs with payloads too
    x[n // 4: n // 4 + len(special)] = special
    x[-len(ties):] = ties
    return x


@MODULES
@pytest.mark.parametrize("chunk", [1, 7, 1 << 16])
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_weighted_sum_matches_float32_reference_bit_for_bit(module, chunk, dtype):
    g = torch.Generator().manual_seed(0)
    cp, chat, base, v = (torch.randn(1001, generator=g).to(DTYPES[dtype]) for _ in range(4))
    terms = [(0.7, chat, base), (0.3, v, None)]
    got = _run(module, dtype, cp, terms, chunk)
    assert torch.equal(got.view(torch.uint8), _reference(dtype, cp, terms, 1001).view(torch.uint8))


@pytest.mark.parametrize("out", ["BF16", "F16", "F32", "F64"])
def test_numpy_kernel_rounds_every_kind_of_value_as_torch_does(out):
    g = torch.Generator().manual_seed(1)
    n = 1 << 17
    anchor = _specials(n, g)
    for terms in ([], [(0.5, _specials(n, g).bfloat16(), torch.randn(n, generator=g).bfloat16())]):
        got, sums = _run_sums(NUMPY, out, anchor, terms, 1 << 12)
        assert (sums.nonfinite, sums.new_nonfinite) == _reference_counts(out, anchor, terms, n), (out, len(terms))
        want = _reference(out, anchor, terms, n)
        if out != "BF16" and terms:
            # Which NaN an operation on NaNs gives (sign, payload) is the CPU's and the library's
            # choice; rounding to BF16 makes every NaN 0xFFFF, and other NaNs stay NaN.
            nan = want.isnan()
            assert torch.equal(got.isnan(), nan)
            got, want = got[~nan], want[~nan]
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (out, len(terms))


@MODULES
def test_mixed_input_types_and_a_term_covering_a_prefix(module):
    g = torch.Generator().manual_seed(2)
    cp = torch.randn(300, generator=g, dtype=torch.float64)
    chat, base = torch.randn(200, generator=g).half(), torch.randn(200, generator=g).bfloat16()
    terms = [(0.25, chat, base), (2.0, torch.randn(300, generator=g), None)]
    got = _run(module, "BF16", cp, terms, 64)
    assert torch.equal(got.view(torch.uint8), _reference("BF16", cp, terms, 300).view(torch.uint8))


@MODULES
def test_zero_anchor_extracts_the_difference(module):
    chat, base = torch.randn(50).bfloat16(), torch.randn(50).bfloat16()
    got = _run(module, "F32", None, [(1.0, chat, base)], 16)
    assert torch.equal(got, chat.float() - base.float())


@MODULES
def test_sums_of_squares_are_those_of_the_change_and_the_anchor(module):
    g = torch.Generator().manual_seed(3)
    cp, chat, base, v = (torch.randn(5000, generator=g).bfloat16() for _ in range(4))
    out = module.view(_bytes(torch.zeros(5000, dtype=torch.bfloat16)), "BF16")
    scratch = module.scratch(512)
    ss_delta, ss_anchor, _, _ = module.weighted_sum(
        out, module.view(_bytes(cp), "BF16"),
        [(0.5, module.view(_bytes(chat), "BF16"), module.view(_bytes(base), "BF16")),
         (0.25, module.view(_bytes(v), "BF16"), None)], scratch)
    delta = 0.5 * (chat.double() - base.double()) + 0.25 * v.double()
    assert ss_delta == pytest.approx(float(delta.square().sum()), rel=1e-4)
    assert ss_anchor == pytest.approx(float(cp.double().square().sum()), rel=1e-4)


def test_view_shares_memory_and_handles_empty():
    buf = bytearray(8)
    a = NUMPY.view(memoryview(buf), "F32")
    a[1] = 1.0
    assert buf[4:] == np.float32(1.0).tobytes()
    assert NUMPY.view(memoryview(b""), "BF16").size == 0
    assert TORCH.view(memoryview(b""), "BF16").numel() == 0


def test_fp8_is_left_to_torch():
    assert not kernel.supports("F8_E4M3") and not kernel.supports("F8_E5M2")
    assert all(kernel.supports(d) for d in ("BF16", "F16", "F32", "F64"))


# Non-finite outputs: counted, and told apart from those a non-finite input explains.

def _reference_counts(out_dtype, anchor, terms, n) -> tuple[int, int]:
    """(non-finite outputs, those whose covering inputs are all finite), from torch's whole-tensor arithmetic."""
    bad = ~torch.isfinite(_reference(out_dtype, anchor, terms, n).double())
    inputs_finite = torch.isfinite(anchor.double()) if anchor is not None else torch.ones(n, dtype=torch.bool)
    for _s, a, b in terms:
        k = a.numel()
        inputs_finite[:k] &= torch.isfinite(a.double())
        if b is not None:
            inputs_finite[:k] &= torch.isfinite(b.double())
    return int(bad.sum()), int((bad & inputs_finite).sum())


def _counts(module, out_dtype, anchor, terms, chunk) -> tuple[int, int]:
    sums = _run_sums(module, out_dtype, anchor, terms, chunk)[1]
    return sums.nonfinite, sums.new_nonfinite


TOP = {"BF16": 3.38e38, "F16": 65504.0, "F32": 3.4e38, "F64": 3.4e38}  # about each output's largest finite value


def _count_cases(out: str, g: torch.Generator) -> dict[str, tuple]:
    """name -> (anchor, terms): finite inputs that overflow or not, non-finite inputs, prefixes."""
    n = 300
    top = TOP[out]
    near = torch.rand(n, generator=g) * 0.3 + 0.3  # sums of two of these land on either side of `top`
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    nan_cp = torch.randn(n, generator=g)
    nan_cp[::17] = float("nan")
    inf_chat = torch.randn(n, generator=g).bfloat16()
    inf_chat[5::23] = float("inf")
    base = torch.randn(n, generator=g).bfloat16()
    return {
        "around the limit": (sign * near * top, [(1.0, sign * near * top, None)]),
        "several terms around the limit": (sign * near * top, [(0.5, sign * near * top, None),
                                                               (0.7, sign * near * top, -sign * near * top)]),
        "non-finite inputs": (nan_cp, [(0.5, inf_chat, base)]),
        "a huge scale": (torch.randn(n, generator=g), [(1e38, torch.randn(n, generator=g), None)]),
        "prefix terms": (sign * near * top, [(1.0, (sign * near * top)[:100], nan_cp[:100]),
                                             (2.0, inf_chat[:250].float(), None)]),
        "all finite": (torch.randn(n, generator=g).bfloat16(), [(0.5, inf_chat.nan_to_num(0.0, posinf=0.0), base)]),
    }


@MODULES
@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("out", ["BF16", "F16", "F32", "F64"])
def test_nonfinite_counts_match_torch_whatever_the_chunk_size(module, chunk, out):
    cases = _count_cases(out, torch.Generator().manual_seed(4))
    for name, (anchor, terms) in cases.items():
        want = _reference_counts(out, anchor, terms, anchor.numel())
        assert _counts(module, out, anchor, terms, chunk) == want, name
    # The cases are not vacuous: each kind of count occurs.
    assert _reference_counts(out, *cases["around the limit"], 300)[1] > 0
    assert _reference_counts(out, *cases["non-finite inputs"], 300) == (30, 0)
    assert _reference_counts(out, *cases["all finite"], 300) == (0, 0)


@MODULES
@pytest.mark.parametrize("chunk", [1, 3, 1 << 16])
def test_f16_overflow_of_finite_inputs_is_new(module, chunk):
    cp = torch.full((10,), 60000.0).half()
    chat = torch.zeros(10).half()
    chat[[2, 7]] = 12000.0  # 60000 + 0.5 * 12000 = 66000: over F16's 65504
    chat[4] = 10000.0  # 65000: still finite
    base = torch.zeros(10).half()
    got, sums = _run_sums(module, "F16", cp, [(0.5, chat, base)], chunk)
    assert (sums.nonfinite, sums.new_nonfinite) == (2, 2)
    assert got[[2, 7]].isinf().all() and got[4] == 64992.0  # 65000 rounded to F16 (steps of 32)


@MODULES
def test_nan_or_inf_in_an_input_is_counted_but_not_new(module):
    cp, chat, base = torch.randn(100).bfloat16(), torch.randn(100).bfloat16(), torch.randn(100).bfloat16()
    cp[3], chat[40], base[41], base[99] = float("nan"), float("inf"), -float("inf"), float("nan")
    for out in ("BF16", "F16", "F32"):
        assert _counts(module, out, cp, [(0.5, chat, base)], 16) == (4, 0), out


@MODULES
@pytest.mark.parametrize("out", ["BF16", "F32", "F64"])
def test_a_huge_scale_overflows_float32_and_is_new(module, out):
    chat, base = torch.zeros(64), torch.zeros(64)
    chat[:5] = torch.tensor([4.0, -4.0, 3.5, 3.0, 0.5])  # times 1e38: 3.5e38 overflows float32, 3e38 not
    got, sums = _run_sums(module, out, torch.zeros(64), [(1e38, chat, base)], 32)
    assert (sums.nonfinite, sums.new_nonfinite) == (3, 3)
    assert got[:3].isinf().all() and got[3:].isfinite().all()


@MODULES
def test_several_terms_cancel_an_overflow_of_the_output_type_but_not_of_float32(module):
    cp = torch.tensor([60000.0, 3.0e38])
    up, down = torch.tensor([20000.0, 3.0e38]), torch.tensor([-40000.0, -3.0e38])
    # float32 holds 80000 before the second term brings it back to 40000, which F16 holds: no overflow.
    got, sums = _run_sums(module, "F16", cp[:1], [(1.0, up[:1], None), (1.0, down[:1], None)], 64)
    assert (sums.nonfinite, sums.new_nonfinite, float(got[0])) == (0, 0, 40000.0)
    # 3e38 + 3e38 overflows float32 to inf, which the third term cannot bring back.
    got, sums = _run_sums(module, "F32", cp[1:], [(1.0, up[1:], None), (1.0, down[1:], None)], 64)
    assert (sums.nonfinite, sums.new_nonfinite) == (1, 1) and got[0].isinf()


@MODULES
def test_several_terms_can_overflow_where_the_change_is_zero(module):
    # 40000 + 2**39 rounds to 2**39 + 65536 in float32; minus 2**39 leaves 65536, over F16's limit,
    # although the anchor (40000) and the change (0) are both small: the sums of squares cannot tell.
    cp, up, down = torch.tensor([40000.0]), torch.tensor([2.0 ** 39]), torch.tensor([-2.0 ** 39])
    got, sums = _run_sums(module, "F16", cp, [(1.0, up, None), (1.0, down, None)], 8)
    assert (sums.nonfinite, sums.new_nonfinite, sums.ss_delta) == (1, 1, 0.0) and got[0].isinf()
    assert _reference_counts("F16", cp, [(1.0, up, None), (1.0, down, None)], 1) == (1, 1)


@MODULES
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_elements_past_a_terms_prefix_depend_on_the_anchor_only(module, chunk):
    cp = torch.ones(10)
    cp[8] = 1e5  # past the term: overflows F16 by itself, from a finite anchor
    cp[9] = float("nan")  # past the term: inherited
    chat, base = torch.ones(5), torch.zeros(5)
    chat[2] = float("nan")  # inside the term: inherited
    chat[3] = 1e5  # inside the term: new
    assert _counts(module, "F16", cp, [(1.0, chat, base)], chunk) == (4, 2)
    assert _reference_counts("F16", cp, [(1.0, chat, base)], 10) == (4, 2)


@MODULES
def test_a_cast_with_no_terms_is_counted_like_a_sum(module):
    row = torch.tensor([1e5, float("nan"), 1.0, -7e4, 65519.0, 65520.0])  # an override row, F32 -> F16
    got, sums = _run_sums(module, "F16", row, [], 4)
    assert (sums.nonfinite, sums.new_nonfinite) == (4, 3)  # 65519 rounds down to 65504, 65520 up to inf
    assert torch.equal(got.isfinite(), torch.tensor([False, False, True, False, True, False]))


@MODULES
def test_an_f64_input_too_large_for_float32_is_new(module):
    cp = torch.tensor([1e300, 1.0, -1e39], dtype=torch.float64)  # finite in F64, infinite in float32
    assert _counts(module, "F64", cp, [(0.5, torch.ones(3), None)], 2) == (2, 2)


@MODULES
def test_all_finite_inputs_return_zeros_without_a_scan(module, monkeypatch):
    def scan(*_args):
        raise AssertionError("an all-finite chunk was scanned element by element")

    monkeypatch.setattr(MODULE[module], "_count_nonfinite", scan)
    g = torch.Generator().manual_seed(5)
    cp, chat, base, v = (torch.randn(5000, generator=g).bfloat16() for _ in range(4))
    h = [x.half() * 100 for x in (cp, chat, base)]  # F16 values up to about 400: far from its limit
    for out, anchor, terms in [("BF16", cp, [(0.5, chat, base)]), ("F16", h[0], [(0.5, h[1], h[2])]),
                               ("BF16", cp, [(0.5, chat, base), (0.25, v[:3000], None)]),
                               ("F16", cp, []), ("F32", None, [(1.0, chat, base)])]:
        sums = _run_sums(module, out, anchor, terms, 1024)[1]
        assert (sums.nonfinite, sums.new_nonfinite) == (0, 0), (out, len(terms))


def test_torch_kernel_counts_fp8_on_the_rounded_output():
    x = torch.tensor([1.0, 1e5, float("inf"), float("nan")])
    # E5M2 has infinities: 1e5 overflows (new), inf stays inf and NaN NaN (inherited).
    assert _counts(TORCH, "F8_E5M2", x, [], 2) == (3, 1)
    # E4M3 has none: torch saturates 1e5 and inf to 448; only the NaN is left, inherited.
    got, sums = _run_sums(TORCH, "F8_E4M3", x, [], 2)
    assert (sums.nonfinite, sums.new_nonfinite) == (1, 0) and got.float()[1:3].tolist() == [448.0, 448.0]
