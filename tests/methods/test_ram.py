"""ram and ramplus_tl driven as the worker and the driver drive them, bit for bit against a
whole-tensor torch reference written here (mergekit 0.1.5's formulas, each operation a torch
operation on tensors of the compute dtype), for several cuts and compute dtypes."""

from __future__ import annotations

import pytest
import torch

from raymerge.methods import ELEMENTWISE, METHODS
from tests.methods.test_sparse_methods import assert_same_bits, run_pieces

N = 12_000
CUTS = {"whole": [], "ragged": [1, 2, 999, 1000, 4097, N - 1], "1000": list(range(1000, N, 1000)),
        "one element": list(range(1, 300))}


def ram_reference(base: torch.Tensor, models: list[torch.Tensor], eps: float, r: float | None = None,
                  alpha: float | None = None) -> torch.Tensor:
    """Changes above eps: one model's alone kept whole, several averaged; ramplus_tl (r given)
    reinforces each model's unique ones by 1 + r * clamp(shared / unique, 0, alpha), in float32."""
    changes = torch.stack([m - base for m in models]).reshape(len(models), -1)
    above = changes.abs() > eps
    counts = above.sum(dim=0, keepdim=True)
    alone, several = counts == 1, counts > 1
    kept = changes * above
    averaged = kept * several / counts.clamp(min=1)
    if r is None:
        merged = (kept * alone + averaged).sum(dim=0)
    else:
        ratio = (above & several).sum(dim=1) / (above & alone).sum(dim=1).clamp(min=eps)
        boost = 1 + r * ratio.clamp(min=0, max=alpha)
        merged = (kept * alone * boost.unsqueeze(-1) + averaged).sum(dim=0)
    return base + merged.reshape(base.shape)


@pytest.fixture(scope="module")
def group():
    """A base and three models whose changes straddle epsilon (1e-5): per element, none, one, two or
    three of them count; some models equal the base in places."""
    g = torch.Generator().manual_seed(17)
    base = 0.02 * torch.randn(N, generator=g)
    models = []
    for i in range(3):
        change = 1e-5 * torch.exp(2.5 * torch.randn(N, generator=g)) * torch.randn(N, generator=g).sign()
        change[torch.rand(N, generator=g) < 0.2] = 0
        models.append(base + change)
    return base, models


DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, None: torch.float32}


@pytest.mark.parametrize("compute", list(DTYPES))
@pytest.mark.parametrize("method,params", [
    ("ram", ()),
    ("ram", (("ram_epsilon", 3e-5),)),
    ("ramplus_tl", ()),
    ("ramplus_tl", (("ram_r", 0.5), ("ram_alpha", 0.9), ("ram_epsilon", 2e-6))),
])
def test_every_cut_gives_the_whole_tensor_reference_bits(group, compute, method, params):
    dtype = DTYPES[compute]
    base, models = (group[0].to(dtype), [m.to(dtype) for m in group[1]])
    p = dict(params)
    eps = p.get("ram_epsilon", 1e-5)
    plus = method == "ramplus_tl"
    want = ram_reference(base, models, eps, p.get("ram_r", 0.1) if plus else None, p.get("ram_alpha", 0.2))
    counts = ((torch.stack(models) - base).abs() > eps).sum(0)
    assert all((counts == c).any() for c in range(4))  # every count of models above epsilon occurs
    if plus and compute:
        assert want.dtype == torch.float32  # mergekit's float32 boost promotes the result
        want = want.to(dtype)  # the output dtype: one rounding
    vectors = [(1.0, m, base, ()) for m in models]
    for cut, starts in CUTS.items():
        for chunk in (None, 777):
            got, facts = run_pieces(method, "t", base, vectors, starts, params, chunk=chunk, compute=compute)
            assert_same_bits(got, want, f"{method} {compute} cut {cut} chunk {chunk}")


def test_ramplus_reinforces_and_counts_do_not_depend_on_the_cut(group):
    base, models = group
    vectors = [(1.0, m, base, ()) for m in models]
    seen = [run_pieces("ramplus_tl", "t", base, vectors, starts)[1][0] for starts in CUTS.values()]
    assert all(s == seen[0] for s in seen)
    above = (torch.stack(models) - base).abs() > torch.tensor(1e-5)
    counts = above.sum(0)
    assert seen[0]["shared"] == (above & (counts > 1)).sum(1).tolist()
    assert seen[0]["unique"] == (above & (counts == 1)).sum(1).tolist()
    plain, _ = run_pieces("ram", "t", base, vectors, [])
    plus, _ = run_pieces("ramplus_tl", "t", base, vectors, [])
    assert not torch.equal(plain, plus)  # the boost changes the result


def test_passes_and_facts():
    from types import SimpleNamespace

    t = SimpleNamespace(terms=(object(), object()), params=())
    assert METHODS["ram"].passes_for(t) == (ELEMENTWISE,)
    assert METHODS["ramplus_tl"].passes_for(t) == ("ram-counts", ELEMENTWISE)
    good = [{"shared": [1, 2], "unique": [3, 4], "lam": [1065353216, 1065353216]}, None]
    assert METHODS["ramplus_tl"].facts_problem(t, good, ["ram-counts"]) is None
    assert "lam" in METHODS["ramplus_tl"].facts_problem(t, [{"shared": [1, 2], "unique": [3, 4]}, None],
                                                         ["ram-counts"])
