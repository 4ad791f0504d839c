"""nearswap and passthrough driven piece by piece as the worker drives them, bit for bit against
mergekit 0.1.5's own torch operations on tensors of the compute dtype (written here)."""

from __future__ import annotations

import pytest
import torch

from tests.methods.test_sparse_methods import assert_same_bits, run_pieces

N = 5_000
CUTS = ([], [1, 2, 999, 1000, 4097, N - 1], list(range(1, 200)))
COMPUTE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: None}


def nearswap_reference(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    absdiff = torch.abs(base - other)
    weight = (t / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


@pytest.fixture(scope="module")
def pair():
    """A base and a model whose differences span the weight's whole range: some below t, most above."""
    g = torch.Generator().manual_seed(41)
    base = 0.02 * torch.randn(N, generator=g)
    other = base + 0.01 * torch.randn(N, generator=g) * torch.exp(4 * torch.randn(N, generator=g))
    other[:50] = base[:50]  # equal: |diff| clamps to 1e-6
    return base, other


@pytest.mark.parametrize("dtype", list(COMPUTE))
@pytest.mark.parametrize("t", [0.001, 0.01, 0.5])
def test_nearswap_rounds_each_operation_as_mergekit_does(pair, dtype, t):
    base, other = (x.to(dtype) for x in pair)
    want = nearswap_reference(base, other, t)
    w = (t / (base.float() - other.float()).abs().clamp(min=1e-6)).clamp(0, 1)
    assert ((w > 0) & (w < 1)).any() and (w == 1).any()  # both sides of the swap, and a blend
    for cuts in CUTS[:2] if dtype != torch.bfloat16 else CUTS:
        for chunk in (None, 333):
            got, _ = run_pieces("nearswap", "n", base, [(1.0, other, base, (("t", t),))], cuts, chunk=chunk,
                                compute=COMPUTE[dtype])
            assert_same_bits(got, want, f"nearswap t={t} {dtype} {len(cuts)} cuts")


@pytest.mark.parametrize("dtype", list(COMPUTE))
def test_passthrough_scales_the_one_model(pair, dtype):
    model = pair[1].to(dtype)
    for scale in (1.0, 0.3, -2.5):
        want = model * scale if scale != 1.0 else model
        got, _ = run_pieces("passthrough", "p", model, [(scale, model, None, ())], CUTS[1], compute=COMPUTE[dtype])
        assert_same_bits(got, want, f"passthrough scale {scale} {dtype}")
