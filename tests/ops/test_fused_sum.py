"""fused_sum: float32 fused multiply-adds, the bits of torch's addcmul_ (mergekit's linear), on both kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raymerge.ops.numpy_kernel import NUMPY
from raymerge.ops.torch_kernel import TorchKernel


def _addcmul(terms: list[tuple[float, torch.Tensor]], n: int) -> torch.Tensor:
    ref = torch.zeros(n)
    for scale, t in terms:
        ref.addcmul_(t.float(), torch.tensor(float(np.float32(scale))))
    return ref


@pytest.mark.parametrize("kernel", [NUMPY, TorchKernel("cpu")], ids=["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_fused_sum_equals_addcmul_bit_for_bit(kernel, dtype):
    rng = np.random.default_rng(7)
    n = 300_007  # odd: vector bodies and tails
    values = [rng.standard_normal(n).astype(np.float32), (rng.integers(-4096, 4096, n) / 256).astype(np.float32),
              rng.standard_normal(n).astype(np.float32) * 1e-30]
    torch_dtype = torch.bfloat16 if dtype == "BF16" else torch.float32
    tensors = [torch.from_numpy(v).to(torch_dtype) for v in values]
    bufs = [memoryview(bytearray(t.view(torch.uint8).numpy().tobytes())) for t in tensors]
    scales = [0.7, 1.0, 0.123456789]
    out = kernel.view(memoryview(bytearray(4 * n)), "F32")
    kernel.fused_sum(out, [(s, kernel.view(b, dtype)) for s, b in zip(scales, bufs)], kernel.scratch(chunk=1000))
    got = torch.frombuffer(bytearray(np.asarray(out).tobytes()), dtype=torch.int32)
    assert torch.equal(got, _addcmul(list(zip(scales, tensors)), n).view(torch.int32))


@pytest.mark.parametrize("kernel", [NUMPY, TorchKernel("cpu")], ids=["numpy", "torch"])
def test_a_product_that_lands_a_float64_sum_on_a_float32_tie_still_rounds_once(kernel):
    # acc = 1 + 2**-23 (odd), product = 2**-24 * (1 - 2**-46): exactly just below the tie 1 + 2**-23 + 2**-24,
    # which the float64 sum rounds onto; rounding that tie to even would give 1 + 2**-22.
    acc = np.array([1 + 2.0**-23], np.float32)
    x, scale = np.array([1 + 2.0**-23], np.float32), np.float32(2.0**-24 * (1 - 2.0**-23))
    out = kernel.view(memoryview(bytearray(4)), "F32")
    kernel.fused_sum(out, [(1.0, kernel.view(memoryview(bytearray(acc.tobytes())), "F32")),
                           (float(scale), kernel.view(memoryview(bytearray(x.tobytes())), "F32"))], kernel.scratch())
    assert float(out[0]) == 1 + 2.0**-23
    assert float(_addcmul([(1.0, torch.from_numpy(acc)), (float(scale), torch.from_numpy(x))], 1)[0]) == 1 + 2.0**-23
