"""Both kernels against torch's own whole-tensor float32 arithmetic, bit for bit."""

import numpy as np
import pytest
import torch

from raymerge.ops import kernel, torch_kernel

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _bytes(t: torch.Tensor) -> memoryview:
    """A writable buffer holding t's bytes, for `view`."""
    return memoryview(bytearray(t.contiguous().view(torch.uint8).numpy().tobytes()))


def _run(module, out_dtype: str, anchor, terms, chunk: int) -> torch.Tensor:
    """module.weighted_sum over buffers of the given tensors; the output as a torch tensor."""
    n = anchor.numel() if anchor is not None else terms[0][1].numel()
    out = _bytes(torch.zeros(n, dtype=DTYPES[out_dtype]))

    def v(t):
        return None if t is None else module.view(_bytes(t), _name(t.dtype))

    scratch = module.Scratch(chunk) if module is kernel else module.Scratch(chunk, device="cpu")
    module.weighted_sum(module.view(out, out_dtype), v(anchor), [(s, v(a), v(b)) for s, a, b in terms], scratch)
    return torch.frombuffer(out, dtype=DTYPES[out_dtype])


def _name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _reference(out_dtype, anchor, terms, n):
    want = anchor.float() if anchor is not None else torch.zeros(n)
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


@pytest.mark.parametrize("module", [kernel, torch_kernel], ids=["numpy", "torch"])
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
        got = _run(kernel, out, anchor, terms, 1 << 12)
        want = _reference(out, anchor, terms, n)
        if out != "BF16" and terms:
            # Which NaN an operation on NaNs gives (sign, payload) is the CPU's and the library's
            # choice; rounding to BF16 makes every NaN 0xFFFF, and other NaNs stay NaN.
            nan = want.isnan()
            assert torch.equal(got.isnan(), nan)
            got, want = got[~nan], want[~nan]
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (out, len(terms))


@pytest.mark.parametrize("module", [kernel, torch_kernel], ids=["numpy", "torch"])
def test_mixed_input_types_and_a_term_covering_a_prefix(module):
    g = torch.Generator().manual_seed(2)
    cp = torch.randn(300, generator=g, dtype=torch.float64)
    chat, base = torch.randn(200, generator=g).half(), torch.randn(200, generator=g).bfloat16()
    terms = [(0.25, chat, base), (2.0, torch.randn(300, generator=g), None)]
    got = _run(module, "BF16", cp, terms, 64)
    assert torch.equal(got.view(torch.uint8), _reference("BF16", cp, terms, 300).view(torch.uint8))


@pytest.mark.parametrize("module", [kernel, torch_kernel], ids=["numpy", "torch"])
def test_zero_anchor_extracts_the_difference(module):
    chat, base = torch.randn(50).bfloat16(), torch.randn(50).bfloat16()
    got = _run(module, "F32", None, [(1.0, chat, base)], 16)
    assert torch.equal(got, chat.float() - base.float())


@pytest.mark.parametrize("module", [kernel, torch_kernel], ids=["numpy", "torch"])
def test_sums_of_squares_are_those_of_the_change_and_the_anchor(module):
    g = torch.Generator().manual_seed(3)
    cp, chat, base, v = (torch.randn(5000, generator=g).bfloat16() for _ in range(4))
    out = module.view(_bytes(torch.zeros(5000, dtype=torch.bfloat16)), "BF16")
    scratch = module.Scratch(512) if module is kernel else module.Scratch(512, device="cpu")
    ss_delta, ss_anchor = module.weighted_sum(
        out, module.view(_bytes(cp), "BF16"),
        [(0.5, module.view(_bytes(chat), "BF16"), module.view(_bytes(base), "BF16")),
         (0.25, module.view(_bytes(v), "BF16"), None)], scratch)
    delta = 0.5 * (chat.double() - base.double()) + 0.25 * v.double()
    assert ss_delta == pytest.approx(float(delta.square().sum()), rel=1e-4)
    assert ss_anchor == pytest.approx(float(cp.double().square().sum()), rel=1e-4)


def test_view_shares_memory_and_handles_empty():
    buf = bytearray(8)
    a = kernel.view(memoryview(buf), "F32")
    a[1] = 1.0
    assert buf[4:] == np.float32(1.0).tobytes()
    assert kernel.view(memoryview(b""), "BF16").size == 0
    assert torch_kernel.view(memoryview(b""), "BF16").numel() == 0


def test_fp8_is_left_to_torch():
    assert not kernel.supports("F8_E4M3") and not kernel.supports("F8_E5M2")
    assert all(kernel.supports(d) for d in ("BF16", "F16", "F32", "F64"))
