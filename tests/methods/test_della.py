"""della and della_linear driven as the worker and the driver drive them: pieces of whole rows
(the planner cuts della's items at row boundaries), bit for bit against the whole-tensor reference
of test_sparse_methods (mergekit's order and rounding, raymerge's documented random draws), and
their kept fractions against the expected."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raymerge.methods import ELEMENTWISE, METHODS
from raymerge.methods.sparse import della_probabilities, rank_thresholds
from tests.methods.test_sparse_methods import N, assert_same_bits, gta_reference, run_pieces, sparse_reference

NAME = "model.layers.0.mlp.up_proj.weight"
ROW = 200  # the trio's tensors are 100 x 200
CUTS = {"whole": [], "rows": [ROW, 2 * ROW, 20 * ROW, N - ROW], "every row": list(range(ROW, N, ROW))}
CASES = [
    ("della", [(0.7, 0.3, 0.15), (0.5, 0.6, 0.1)], ()),
    ("della", [(1.0, 0.4, 0.3), (0.8, 0.5, 0.05), (0.6, 1.0, 0.1)], (("normalize", False), ("seed", 7))),
    ("della", [(0.9, 0.35, 0.2), (0.4, 0.0, 0.1)], (("rescale", False), ("lambda", 1.5))),
    ("della_linear", [(0.7, 0.3, 0.15), (0.5, 0.6, 0.2)], ()),
    ("della_linear", [(0.7, 0.5, 0.45), (-0.3, 0.2, 0.1)], (("normalize", True), ("seed", 3))),
]


def _vectors(base, chats, terms):
    return [(w, chats[i], base, {"density": d, "epsilon": e}) for i, (w, d, e) in enumerate(terms)]


@pytest.mark.parametrize("keep", [False, True], ids=["drawn-again", "kept"])  # the L1 pass's masks carried to the output
@pytest.mark.parametrize("compute", [None, "BF16"])
@pytest.mark.parametrize("method,terms,params", CASES)
def test_every_cut_gives_the_whole_tensor_reference_bits(bf16_trio, method, terms, params, compute, keep):
    base, chats, anchor = bf16_trio
    vectors = _vectors(base, chats, terms)
    p = dict(params)
    kw = dict(normalize=p.get("normalize", method == "della"), rescale=p.get("rescale", True),
              lam=p.get("lambda", 1.0), seed=p.get("seed", 0))
    want = gta_reference(NAME, anchor, vectors, method, **kw) if compute else \
        sparse_reference(NAME, anchor, vectors, method, **kw)
    assert not torch.equal(want, anchor)
    for cut, starts in CUTS.items():
        # chunks of whole rows (333: one row, the rest of the chunk unused), and chunks shorter than a
        # row (150), each of which reads its rows again to rank them
        for chunk in (None, 333, 150):
            got, _ = run_pieces(method, NAME, anchor, vectors, starts, params, chunk=chunk, shuffle=len(starts),
                                compute=compute, keep=keep)
            assert_same_bits(got, want, f"{method} {compute} cut {cut} chunk {chunk}")


def test_f16_works_in_float32_as_mergekit_does():
    g = torch.Generator().manual_seed(5)
    base = (0.02 * torch.randn(50, 80, generator=g)).half()
    chats = [(base.float() + 0.01 * torch.randn(50, 80, generator=g)).half() for _ in range(2)]
    vectors = _vectors(base, chats, [(0.7, 0.3, 0.15), (0.5, 0.6, 0.2)])
    want = gta_reference(NAME, base, vectors, "della", normalize=True, rescale=True)
    got, _ = run_pieces("della", NAME, base, vectors, [80, 800, 3920], compute="F16")
    assert_same_bits(got, want, "f16")


def test_a_piece_with_part_of_a_row_is_refused(bf16_trio):
    base, chats, anchor = bf16_trio
    with pytest.raises(ValueError, match="part of a row"):
        run_pieces("della", NAME, anchor, _vectors(base, chats, [(0.7, 0.3, 0.15)]), [ROW + 1])


def test_kept_fractions_follow_the_probabilities():
    """On a 10M-element tensor the kept fraction is within 0.1% of the density, and in each rank
    band of its rows within noise of that band's probability."""
    g = torch.Generator().manual_seed(9)
    rows, row = 2_500, 4_000
    delta = torch.randn(rows, row, generator=g)
    zero = torch.zeros_like(delta)
    got, _ = run_pieces("della_linear", "big", zero, [(1.0, delta, None, {"density": 0.3, "epsilon": 0.2})],
                        list(range(row * 250, rows * row, row * 250)), (("rescale", False),))
    kept = (got != 0).reshape(rows, row)
    assert abs(kept.float().mean().item() - 0.3) < 0.001
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    for band in range(5):  # p from 0.1 (smallest) to 0.5 (largest)
        inside = (ranks >= band * row // 5) & (ranks < (band + 1) * row // 5)
        expected = 0.1 + 0.4 * (band + 0.5) / 5
        assert abs(kept[inside].float().mean().item() - expected) < 0.002


def test_probabilities_in_bf16_round_each_step():
    x = np.float32(np.random.default_rng(2).standard_normal((3, 1000)))
    p32 = della_probabilities(x, 0.4, 0.1, None)
    p16 = della_probabilities(x, 0.4, 0.1, "BF16")
    assert np.all((p32 >= 0.3 - 1e-6) & (p32 <= 0.5 + 1e-6))
    assert not np.array_equal(p32, p16)
    assert np.array_equal(p16, torch.from_numpy(p16).to(torch.bfloat16).float().numpy())  # bf16 values


def test_epsilon_validation_and_passes():
    m = METHODS["della"]

    def tensor(density, epsilon, shape=(4, 8)):
        return SimpleNamespace(shape=shape, params=(("rescale", True),),
                               terms=(SimpleNamespace(density=density, limit=None,
                                                      param=lambda n, d: epsilon if n == "epsilon" else d),))

    assert m.check(tensor(0.3, 0.15)) is None
    assert "give an epsilon below 0.3" in m.check(tensor(0.3, 0.3))
    assert "below 0.1" in m.check(tensor(0.9, 0.1))
    assert m.check(tensor(1.0, 0.5)) is None and m.check(tensor(0.0, 0.5)) is None  # mergekit checks neither
    assert "3" in m.check(tensor(0.3, 0.1, (2, 3, 4)))
    assert m.passes_for(tensor(0.3, 0.1)) == ("l1-norm", ELEMENTWISE)
    assert METHODS["della_linear"].default("normalize") is False and m.default("normalize") is True


def test_a_one_element_rows_nan_probability_keeps_nothing():
    """mergekit's norm of a one-element row is 0 / 0: its probability NaN, which no draw is below
    (a comparison with NaN is false), so the element is dropped; the threshold per rank says so."""
    assert np.isnan(della_probabilities(np.float32([[0.5], [-2.0]]), 0.5, 0.1, None)).all()
    assert rank_thresholds(1, 0.5, 0.1, None).tolist() == [0]
    assert rank_thresholds(1, 0.5, 0.1, "BF16").tolist() == [0]
    p = della_probabilities(np.float32([[0.3, -0.1, 0.2]]), 0.5, 0.1, None)[0]  # ranks 2, 0, 1
    assert rank_thresholds(3, 0.5, 0.1, None).tolist() == [int(np.floor(np.float64(x) * 2**32)) for x in sorted(p)]


def test_the_output_takes_the_masks_the_l1_pass_kept(bf16_trio, monkeypatch):
    """With what the L1 pass keeps, each mask is drawn once (in that pass), not again for the output."""
    from raymerge.methods.sparse import Della

    base, chats, anchor = bf16_trio
    drawn = []
    mask = Della._della_mask
    monkeypatch.setattr(Della, "_della_mask", lambda self, *a: drawn.append(1) or mask(self, *a))
    vectors = _vectors(base, chats, [(0.7, 0.3, 0.15), (0.5, 0.6, 0.1)])
    want = sparse_reference(NAME, anchor, vectors, "della", normalize=True, rescale=True, lam=1.0, seed=0)
    counts = []
    for keep in (False, True):
        drawn.clear()
        got, _ = run_pieces("della", NAME, anchor, vectors, [20 * ROW], chunk=333, keep=keep)
        assert_same_bits(got, want, f"keep={keep}")
        counts.append(len(drawn))
    assert counts[1] * 2 == counts[0] > 0  # drawn in both passes, or in the first alone


@pytest.mark.parametrize("method,terms,params", CASES[:2])
def test_numpys_loops_draw_the_same_masks(bf16_trio, method, terms, params, monkeypatch):
    """Without the compiled loops (raymerge/ops/_native.c), della's ranks and draws are numpy's:
    the same bits."""
    from raymerge.ops import native

    base, chats, anchor = bf16_trio
    vectors = _vectors(base, chats, terms)
    compiled, _ = run_pieces(method, NAME, anchor, vectors, [20 * ROW], params, compute="BF16")
    monkeypatch.setattr(native, "loops", None)
    got, _ = run_pieces(method, NAME, anchor, vectors, [20 * ROW], params, compute="BF16")
    assert_same_bits(got, compiled, method)
    assert not torch.equal(got, anchor)
