"""arcee_fusion driven as the worker and the driver drive it, over pieces of whole rows, bit for bit
against a whole-tensor torch reference written here (mergekit 0.1.5's formulas on tensors of the
compute dtype, with exact quartiles of the whole tensor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raymerge.methods.arcee_fusion import key_value, order_keys
from tests.methods.test_sparse_methods import assert_same_bits, run_pieces

ROWS, ROW = 60, 150
CUTS = {"whole": [], "rows": [ROW, 2 * ROW, 20 * ROW], "every row": list(range(ROW, ROWS * ROW, ROW))}


def fusion_reference(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """base + (other - base) where the importance reaches median + 1.5 (q3 - q1); float32 (the mask's)."""
    diff = (other - base).abs()
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    importance = diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ordered = torch.sort(importance.reshape(-1)).values
    q1, median, q3 = ordered[(torch.tensor(QUARTILES) * (ordered.numel() - 1)).long()]
    threshold = median + 1.5 * (q3 - q1)
    return base + (other - base) * (importance >= threshold).float()


QUARTILES = [0.25, 0.5, 0.75]


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(31)
    base = 0.02 * torch.randn(ROWS, ROW, generator=g)
    other = base + 0.01 * torch.randn(ROWS, ROW, generator=g) * torch.exp(torch.randn(ROWS, 1, generator=g))
    return base, other


@pytest.mark.parametrize("keep", [False, True], ids=["computed-again", "kept"])  # the rows' divergences
@pytest.mark.parametrize("dtype,compute", [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, None)])
def test_every_cut_gives_the_whole_tensor_reference_bits(pair, dtype, compute, keep):
    base, other = (x.to(dtype) for x in pair)
    want = fusion_reference(base, other)
    assert want.dtype == torch.float32
    kept = want != base.float()
    assert 0.01 < kept.float().mean() < 0.5  # some elements take the other model's value, most do not
    want = want.to(dtype)  # the output dtype: one rounding of the float32 result
    for cut, starts in CUTS.items():
        for chunk in (None, 1000):  # chunks that split rows: each computes the rows it touches
            got, facts = run_pieces("arcee_fusion", "t", base, [(1.0, other, base, ())], starts, chunk=chunk,
                                    shuffle=len(starts), compute=compute, keep=keep)
            assert_same_bits(got, want, f"{dtype} cut {cut} chunk {chunk}")


def test_one_dimensional_tensors_are_one_row():
    g = torch.Generator().manual_seed(3)
    base = (0.1 * torch.randn(4000, generator=g)).to(torch.bfloat16)
    other = (base.float() + 0.05 * torch.randn(4000, generator=g)).to(torch.bfloat16)
    got, _ = run_pieces("arcee_fusion", "n", base, [(1.0, other, base, ())], [], chunk=1000, compute="BF16")
    assert_same_bits(got, fusion_reference(base, other).to(torch.bfloat16), "1-D")


def test_order_keys_sort_as_torch_sorts():
    x = np.float32([3.0, -0.0, 0.0, -1e-40, 1e-40, -np.inf, np.inf, np.nan, -2.5, 7e-3])
    keys = order_keys(x)
    assert keys[1] == keys[2]  # -0.0 and +0.0 are equal
    assert keys[7] == keys.max() and keys[5] == keys.min()
    got = x[np.argsort(keys, kind="stable")]
    want = torch.sort(torch.from_numpy(x), stable=True).values.numpy()
    assert np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)]) and np.isnan(got[-1])
    assert all(key_value(int(k)) == float(v) or np.isnan(v) for k, v in zip(keys, x + np.float32(0)))


@pytest.mark.parametrize("compute,passes", [("BF16", 2), (None, 3)])  # fusion-low runs where keys are wider
def test_only_the_first_pass_computes_the_divergences_where_they_are_kept(pair, monkeypatch, compute, passes):
    from raymerge.methods import arcee_fusion

    calls = []
    divergences = arcee_fusion.divergences
    monkeypatch.setattr(arcee_fusion, "divergences", lambda *a: calls.append(1) or divergences(*a))
    dtype = torch.bfloat16 if compute else torch.float32
    base, other = (x.to(dtype) for x in pair)
    counts = []
    for keep in (False, True):
        calls.clear()
        got, _ = run_pieces("arcee_fusion", "t", base, [(1.0, other, base, ())], CUTS["rows"], chunk=1000,
                            compute=compute, keep=keep)
        assert_same_bits(got, fusion_reference(base, other).to(dtype), f"keep={keep}")
        counts.append(len(calls))
    assert counts[0] == passes * counts[1] > 0  # each pass computes them, or the first alone


@pytest.mark.parametrize("dtype,compute", [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, None)])
def test_the_threshold_is_torchs_on_tensors_of_the_compute_dtype(dtype, compute):
    """The driver computes median + 1.5 * (q3 - q1) without torch: the same bits as torch's."""
    from raymerge.methods.arcee_fusion import _threshold

    g = torch.Generator().manual_seed(8)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, 65504.0, 3e38, 1e-8, -7.5])
    cases = [torch.randn(3, generator=g) * 10.0 ** float(torch.randint(-30, 30, (1,), generator=g))
             for _ in range(3000)] + [special[torch.randint(0, len(special), (3,), generator=g)] for _ in range(500)]
    for q in cases:
        q = q.to(dtype)
        q1, median, q3 = q
        want = (median + 1.5 * (q3 - q1)).float()
        got = _threshold([float(x) for x in q.float()], compute)
        assert got == int(want.view(torch.int32)) & 0xFFFFFFFF or (np.isnan(np.uint32(got).view(np.float32))
                                                                 and want.isnan()), (q, got, want)
