"""mergekit's compute dtype: with `dtype: bfloat16` (or float16) mergekit computes its generalized task
arithmetic (task_arithmetic, ties, dare_*) in tensors of that dtype, each torch operation rounded to
it. The reference here is that sequence of torch operations on tensors of the dtype, with
raymerge's documented masks (TIES: ties kept lowest index first; DARE: its Philox draw) and
exact L1 sums rounded to float32 then to the dtype; raymerge's method, driven piece by piece as the
worker drives it, must give its bits for every cut."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raymerge.ops.kernel import round_scalar
from raymerge.ops.numpy_kernel import NUMPY
from raymerge.ops.torch_kernel import TorchKernel
from tests.methods.test_sparse_methods import assert_same_bits, gta_reference, run_pieces, sparse_reference

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16}
N = 6_000
CUTS = {"whole": [], "ragged": [1, 2, 999, 1000, 4097, N - 1], "1000": list(range(1000, N, 1000))}


@pytest.fixture(scope="module")
def trio():
    """float32 base, three models and an anchor, each the base plus its own noise: deltas whose
    signs disagree and that the compute dtype rounds."""
    g = torch.Generator().manual_seed(21)
    base = 0.02 * torch.randn(N, generator=g)
    models = [base + 0.01 * torch.randn(N, generator=g) for _ in range(3)]
    anchor = base + 0.01 * torch.randn(N, generator=g)
    return base, models, anchor


CASES = [
    ("task_arithmetic", [(0.7, 1.0), (0.45, 1.0)], (("normalize", False),)),
    ("task_arithmetic", [(0.7, 1.0), (0.45, 1.0), (-0.3, 1.0)], (("normalize", True), ("lambda", 0.9))),
    ("ties", [(0.7, 0.3), (0.5, 0.6)], ()),
    ("ties", [(1.0, 0.2), (0.8, 0.5), (0.6, 0.9)], (("normalize", False), ("lambda", 1.5))),
    ("ties", [(0.9, 0.35), (0.4, 1.0)], (("rescale", True),)),
    ("dare_ties", [(0.7, 0.3), (0.5, 0.6)], (("seed", 5),)),
    ("dare_linear", [(0.7, 0.3), (0.5, 0.6)], (("normalize", True),)),
]


@pytest.mark.parametrize("compute", DTYPES)
@pytest.mark.parametrize("method,terms,params", CASES)
def test_each_operation_is_rounded_to_the_compute_dtype(trio, compute, method, terms, params):
    dtype = DTYPES[compute]
    base, models, anchor = (x.to(dtype) if isinstance(x, torch.Tensor) else [m.to(dtype) for m in x] for x in trio)
    vectors = [(w, models[i], base, d) for i, (w, d) in enumerate(terms)]
    p = dict(params)
    from raymerge.methods import METHODS

    m = METHODS[method]
    kw = dict(normalize=p.get("normalize", m.default("normalize")), lam=p.get("lambda", 1.0))
    if method != "task_arithmetic":
        kw.update(rescale=p.get("rescale", m.default("rescale")), seed=int(p.get("seed", 0)))
    want = gta_reference("t", anchor, vectors, method, **kw)
    once = sparse_reference("t", anchor, vectors, "dare_linear" if method == "task_arithmetic" else method,
                            **{**kw, "rescale": kw.get("rescale", False)})
    assert not torch.equal(want, once)  # rounding each operation changes the result: the test can fail
    for cut, starts in CUTS.items():
        for chunk in (None, 777):
            got, _ = run_pieces(method, "t", anchor, vectors, starts, params, chunk=chunk, compute=compute)
            assert_same_bits(got, want, f"{method} {compute} cut {cut} chunk {chunk}")


def test_one_element_per_piece(trio):
    base, models, anchor = (x[:300].to(torch.bfloat16) if isinstance(x, torch.Tensor)
                            else [m[:300].to(torch.bfloat16) for m in x] for x in trio)
    vectors = [(0.7, models[0], base, 0.3), (0.5, models[1], base, 0.6)]
    want = gta_reference("t", anchor, vectors, "ties", normalize=True, rescale=True)
    got, _ = run_pieces("ties", "t", anchor, vectors, list(range(1, 300)), (("rescale", True),), compute="BF16")
    assert_same_bits(got, want, "one element per piece")


@pytest.mark.parametrize("compute", DTYPES)
def test_round_to_is_torchs_conversion_on_both_kernels(compute):
    """Every float32 bit pattern class: normals across the range, subnormals, halfway cases, the
    overflow boundary, infinities and zeros; NaNs stay NaNs."""
    rng = np.random.default_rng(0)
    with np.errstate(over="ignore"):  # some overflow float32: infinities
        x = (rng.standard_normal(50_000) * np.exp(rng.uniform(-110, 110, 50_000))).astype(np.float32)
    halfway = (rng.integers(0, 2**31, 5_000, dtype=np.uint32) | 0x8000).astype(np.uint32) & 0xFFFF8000
    x = np.concatenate([x, halfway.view(np.float32), np.float32([np.inf, -np.inf, 0.0, -0.0, 3.39e38, 65520.0,
                                                                  65519.0, 1e-45, -6e-8, np.nan]),
                        # NaNs whose payload lies in the low half (rounding it would make an infinity) or
                        # fills it (rounding would carry out of the sign bit)
                        np.uint32([0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F80FFFF]).view(np.float32)])
    want = torch.from_numpy(x.copy()).to(DTYPES[compute]).float().numpy()
    for kernel, arr in ((NUMPY, x.copy()), (TorchKernel("cpu"), torch.from_numpy(x.copy()))):
        kernel.round_to(arr, compute)
        got = np.asarray(arr)
        same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
        assert same.all(), f"{kernel.name}: {int((~same).sum())} values rounded otherwise"
    assert round_scalar(0.3, compute) == want.dtype.type(torch.tensor(0.3).to(DTYPES[compute]).item())
    assert round_scalar(0.3, None) == np.float32(0.3)
