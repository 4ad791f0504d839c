import pytest
import torch

from raymerge.ops.kernel import Scratch, view, weighted_sum


@pytest.mark.parametrize("chunk", [1, 7, 1 << 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weighted_sum_matches_float32_reference_bit_for_bit(chunk, dtype):
    g = torch.Generator().manual_seed(0)
    cp, chat, base, v = (torch.randn(1001, generator=g).to(dtype) for _ in range(4))
    out = torch.empty(1001, dtype=dtype)
    weighted_sum(out, cp, [(0.7, chat, base), (0.3, v, None)], Scratch(chunk))
    want = cp.float()
    want = want + 0.7 * (chat.float() - base.float())
    want = want + 0.3 * v.float()
    assert torch.equal(out.view(torch.uint8), want.to(dtype).view(torch.uint8))


def test_zero_anchor_extracts_the_difference():
    chat, base = torch.randn(50).bfloat16(), torch.randn(50).bfloat16()
    out = torch.empty(50, dtype=torch.float32)
    weighted_sum(out, None, [(1.0, chat, base)], Scratch(16))
    assert torch.equal(out, chat.float() - base.float())


def test_view_shares_memory_and_handles_empty():
    buf = bytearray(8)
    t = view(memoryview(buf), "F32")
    t[1] = 1.0
    assert buf[4:] == bytes(torch.tensor([1.0]).numpy().tobytes())
    assert view(memoryview(b""), "BF16").numel() == 0
