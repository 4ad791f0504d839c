"""Breadcrumbs (mergekit's magnitude_outliers) driven as the worker and the driver drive it: two
selections from the same magnitude histograms, bit for bit against the whole-tensor reference of
test_sparse_methods (mergekit's order, every operation in the compute dtype), for every cut."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from raymerge.methods import ELEMENTWISE, METHODS
from tests.methods.test_sparse_methods import (CUTS, N, assert_same_bits, breadcrumbs_keep, gta_reference, run_pieces,
                                               sparse_reference)

NAME = "model.layers.0.mlp.up_proj.weight"
CASES = [
    ("breadcrumbs", [(0.7, 0.3, 0.01), (0.5, 0.6, 0.05)], ()),
    ("breadcrumbs", [(1.0, 0.2, 0.1), (0.8, 0.5, 0.0), (0.6, 0.9, 0.2)], (("normalize", True), ("lambda", 1.5))),
    ("breadcrumbs", [(0.9, 0.35, 0.02), (0.4, 0.9, 0.3)], (("rescale", True),)),  # gamma past 1 - density: t = n - target
    ("breadcrumbs", [(0.9, 0.00001, 0.0), (0.4, 0.00001, 0.01)], ()),  # target 0: nothing kept
    ("breadcrumbs_ties", [(0.7, 0.3, 0.01), (0.5, 0.6, 0.05)], ()),
    ("breadcrumbs_ties", [(1.0, 0.2, 0.1), (0.8, 0.5, 0.03), (0.6, 1.0, 0.5)], (("normalize", True),)),
    ("breadcrumbs_ties", [(0.9, 0.35, 0.02), (0.4, 0.7, 0.0)], (("rescale", True), ("lambda", 0.8))),
]


def _vectors(base, chats, terms):
    return [(w, chats[i], base, {"density": d, "gamma": g}) for i, (w, d, g) in enumerate(terms)]


@pytest.mark.parametrize("keep", [False, True], ids=["selected-again", "kept"])  # the L1 pass's masks, if it runs
@pytest.mark.parametrize("compute", [None, "BF16"])
@pytest.mark.parametrize("method,terms,params", CASES)
def test_every_cut_gives_the_whole_tensor_reference_bits(bf16_trio, method, terms, params, compute, keep):
    base, chats, anchor = bf16_trio
    vectors = _vectors(base, chats, terms)
    p = dict(params)
    kw = dict(normalize=p.get("normalize", False), rescale=p.get("rescale", False), lam=p.get("lambda", 1.0))
    want = gta_reference(NAME, anchor, vectors, method, **kw) if compute else \
        sparse_reference(NAME, anchor, vectors, method, **kw)
    nothing_kept = all(int(d * N) == 0 for _, d, _ in terms)
    assert torch.equal(want, anchor) == nothing_kept  # what the vectors keep changes the anchor
    for cut, starts in CUTS.items():
        for chunk in (None, 1000):  # the default chunk, and chunks that split the pieces
            got, _ = run_pieces(method, NAME, anchor, vectors, starts, params, chunk=chunk, shuffle=len(starts),
                                compute=compute, keep=keep)
            assert_same_bits(got, want, f"{method} {compute} cut {cut} chunk {chunk}")


def test_one_element_per_piece(bf16_trio):
    base, chats, anchor = (x.reshape(-1)[:300] if isinstance(x, torch.Tensor) else [c.reshape(-1)[:300] for c in x]
                           for x in bf16_trio)
    vectors = _vectors(base, chats, [(0.7, 0.3, 0.1), (0.5, 0.6, 0.05)])
    want = gta_reference("t", anchor, vectors, "breadcrumbs_ties", normalize=False, rescale=True)
    for keep in (False, True):
        got, _ = run_pieces("breadcrumbs_ties", "t", anchor, vectors, list(range(1, 300)), (("rescale", True),),
                            compute="BF16", keep=keep)
        assert_same_bits(got, want, f"one element per piece, keep={keep}")


def test_the_outliers_dropped_are_the_largest(bf16_trio):
    """The reference drops what it says: gamma's largest magnitudes go, the next `density` stay,
    and that differs from TIES's top k (so the bits above can fail)."""
    base, chats, anchor = bf16_trio
    delta = (chats[0].float() - base.float()).reshape(-1)
    keep = breadcrumbs_keep(delta, 0.3, 0.05)
    assert int(keep.sum()) == int(0.3 * N)
    mags = delta.abs()
    assert mags[keep].max() <= torch.sort(mags, descending=True).values[int(0.05 * N)]
    assert (mags[~keep] > mags[keep].max()).sum() == int(0.05 * N)
    crumbs = sparse_reference("t", anchor, _vectors(base, chats, [(0.7, 0.3, 0.05)]), "breadcrumbs_ties")
    ties = sparse_reference("t", anchor, [(0.7, chats[0], base, 0.3)], "ties", normalize=False)
    assert not torch.equal(crumbs, ties)


def test_facts_do_not_depend_on_the_cut_and_name_both_selections(bf16_trio):
    base, chats, anchor = bf16_trio
    vectors = _vectors(base, chats, [(0.7, 0.3, 0.05), (0.5, 0.6, 0.0)])
    seen = []
    for starts in CUTS.values():
        _, facts = run_pieces("breadcrumbs", "t", anchor, vectors, starts, (("rescale", True),))
        seen.append([(f["k"], f["threshold"], f["top_k"], f["top_threshold"], f["factor"]) for f in facts])
    assert all(s == seen[0] for s in seen)
    assert [(k, top) for k, _, top, _, _ in seen[0]] == [(int(0.35 * N), int(0.05 * N)), (int(0.6 * N), 0)]


def test_passes_and_damaged_facts():
    m = METHODS["breadcrumbs"]
    t = SimpleNamespace(terms=(SimpleNamespace(density=0.5, limit=None, param=lambda n, d: d),),
                        params=(("rescale", True),))
    passes = m.passes_for(t)
    assert passes == ("magnitude-high", "magnitude-low", "l1-norm", ELEMENTWISE)
    whole = {"k": 10, "high": 1, "above": 0, "top_k": 2, "top_high": 1, "top_above": 0}
    assert m.facts_problem(t, [whole], ["magnitude-high"]) is None
    assert "top_k" in m.facts_problem(t, [{"k": 10, "high": 1, "above": 0}], ["magnitude-high"])
    assert METHODS["ties"].facts_problem(t, [{"k": 10, "high": 1, "above": 0}], ["magnitude-high"]) is None


def test_the_output_takes_the_masks_the_l1_pass_kept(bf16_trio, monkeypatch):
    """With what the L1 pass keeps, each selection is made once (in that pass), not again for the output."""
    from raymerge.methods.sparse import Sparse

    made = []
    mask = Sparse._mask
    monkeypatch.setattr(Sparse, "_mask", lambda self, *a: made.append(1) or mask(self, *a))
    base, chats, anchor = bf16_trio
    vectors = _vectors(base, chats, [(0.7, 0.3, 0.01), (0.5, 0.6, 0.05)])
    want = sparse_reference(NAME, anchor, vectors, "breadcrumbs_ties", normalize=False, rescale=True)
    counts = []
    for keep in (False, True):
        made.clear()
        got, _ = run_pieces("breadcrumbs_ties", NAME, anchor, vectors, [7777], (("rescale", True),), chunk=1000,
                            keep=keep)
        assert_same_bits(got, want, f"keep={keep}")
        counts.append(len(made))
    assert counts[1] * 2 == counts[0] > 0  # made in both passes, or in the first alone
