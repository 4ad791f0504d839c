"""SCE driven as the worker and the driver drive it, bit for bit against a whole-tensor torch
reference written here (mergekit 0.1.5's formulas, each operation a torch operation on tensors of
the compute dtype; equal variances kept lowest index first; the weights' sums exact, rounded once),
for every cut."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raymerge.methods import ELEMENTWISE, METHODS
from tests.methods.test_geometric import exact_sum, rounded
from tests.methods.test_sparse_methods import CUTS, N, assert_same_bits, run_pieces


def sce_reference(base: torch.Tensor, models: list[torch.Tensor], topk: float) -> torch.Tensor:
    changes = torch.stack([m - base for m in models]).reshape(len(models), -1)
    if topk < 1:
        keep = torch.zeros(changes.shape[1], dtype=changes.dtype)
        if topk > 0:
            var = torch.var(changes, dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * topk)
            keep[torch.sort(var.float(), descending=True, stable=True).indices[:k]] = 1
        changes = changes * keep
    majority = (changes.sum(dim=0) >= 0).to(changes.dtype) * 2 - 1
    agree = changes.sign() == majority
    n = changes.shape[1]
    means = [rounded(exact_sum(c.square().float())) / np.float32(n) for c in changes]  # torch's mean: float32
    weights = torch.tensor(means, dtype=torch.float32).to(changes.dtype)
    total = weights.sum().item()
    weights = torch.ones_like(weights) / len(models) if abs(total) < 1e-6 else weights / total
    erased = weights.unsqueeze(-1) * agree
    merged = (changes * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
    return base + merged.reshape(base.shape)


@pytest.mark.parametrize("keep", [False, True], ids=["selected-again", "kept"])  # the weights pass's mask
@pytest.mark.parametrize("compute", [None, "BF16"])
@pytest.mark.parametrize("topk,count", [(0.3, 2), (0.7, 3), (1.0, 3), (0.0, 2), (0.05, 3)])
def test_every_cut_gives_the_whole_tensor_reference_bits(bf16_trio, compute, topk, count, keep):
    base, chats, _ = bf16_trio
    models = chats[:count]
    want = sce_reference(base, models, topk) if compute else \
        sce_reference(base.float(), [m.float() for m in models], topk).to(torch.bfloat16)
    assert not torch.equal(want, base) or topk == 0.0
    vectors = [(1.0, m, base, ()) for m in models]
    for cut, starts in CUTS.items():
        for chunk in (None, 1000):
            got, _ = run_pieces("sce", "t", base, vectors, starts, (("select_topk", topk),), chunk=chunk,
                                shuffle=len(starts), compute=compute, keep=keep)
            assert_same_bits(got, want, f"topk {topk} {compute} cut {cut} chunk {chunk}")


def test_the_selection_is_tied_and_matters(bf16_trio):
    """Equal variances straddle the k-th (bf16 changes), and selecting changes the result."""
    base, chats, _ = bf16_trio
    var = torch.var(torch.stack([c - base for c in chats[:2]]).reshape(2, -1), dim=0, unbiased=False).float()
    k = int(torch.count_nonzero(var) * 0.3)
    kth = torch.sort(var, descending=True).values[k - 1]
    assert int((var > kth).sum()) < k - 1 and int((var >= kth).sum()) > k
    assert not torch.equal(sce_reference(base, chats[:2], 0.3), sce_reference(base, chats[:2], 1.0))


def test_facts_do_not_depend_on_the_cut(bf16_trio):
    base, chats, _ = bf16_trio
    vectors = [(1.0, m, base, ()) for m in chats]
    seen = [{k: f[k] for k in ("nonzero", "k", "threshold", "w")}  # not the tie cut: which piece holds it
            for f in (run_pieces("sce", "t", base, vectors, starts, (("select_topk", 0.4),), compute="BF16")[1][0]
                      for starts in CUTS.values())]
    assert all(s == seen[0] for s in seen)
    assert seen[0]["k"] == int(np.float32(seen[0]["nonzero"]) * np.float32(0.4)) and 0 < seen[0]["k"] < N


def test_passes_and_facts():
    t = SimpleNamespace(terms=(object(), object()), params=(("select_topk", 0.5),))
    assert METHODS["sce"].passes_for(t) == ("sce-variance-high", "sce-variance-low", "sce-weights", ELEMENTWISE)
    assert METHODS["sce"].passes_for(SimpleNamespace(terms=t.terms, params=())) == ("sce-weights", ELEMENTWISE)
    good = [{"nonzero": 9, "k": 4, "high": 1, "above": 0, "threshold": 5, "cut": 0, "keep": 1, "w": [1, 2]}, None]
    assert METHODS["sce"].facts_problem(t, good, ["sce-variance-high", "sce-variance-low", "sce-weights"]) is None
    assert "nonzero" in METHODS["sce"].facts_problem(t, [{"w": [1, 2]}, None], ["sce-variance-high", "sce-weights"])


def test_the_output_takes_the_mask_the_weights_pass_kept(bf16_trio, monkeypatch):
    """With what the weights pass keeps, the variance is computed by the passes that select
    (high, weights: in BF16 the high pass settles the threshold, and no low pass runs), not again
    for the output."""
    from raymerge.methods import sce

    calls = []
    variance = sce._Chunk.variance
    monkeypatch.setattr(sce._Chunk, "variance", lambda self: calls.append(1) or variance(self))
    base, chats, _ = bf16_trio
    vectors = [(1.0, m, base, ()) for m in chats[:3]]
    want = sce_reference(base, chats[:3], 0.3)
    counts = []
    for keep in (False, True):
        calls.clear()
        got, _ = run_pieces("sce", "t", base, vectors, [7777], (("select_topk", 0.3),), compute="BF16", keep=keep)
        assert_same_bits(got, want, f"keep={keep}")
        counts.append(len(calls))
    assert counts[0] * 2 == counts[1] * 3 > 0  # three passes compute it, or two
