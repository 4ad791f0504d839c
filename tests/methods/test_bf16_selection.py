"""In BF16 a radix selection's keys are 16 bits: the high pass alone settles the threshold (and the
tie cut), and the low pass is skipped (`Method.needs`), unless the selection lands in NaN's bin
(+inf's too), where the low pass runs as before. The facts must be those the low pass finds."""

from __future__ import annotations

import pytest
import torch

from raymerge.methods import METHODS
from raymerge.methods.arcee_fusion import LOW as FUSION_LOW
from raymerge.methods.sce import LOW as SCE_LOW
from raymerge.methods.sparse import LOW
from raymerge.ops import sparse
from tests.methods.test_sparse_methods import CUTS, N, assert_same_bits, run_pieces

ROW_CUTS = {"whole": [], "rows": [200, 400, 7800], "every row": list(range(200, N, 200))}  # arcee_fusion: whole rows

CASES = [  # method, its low pass, vectors' per-vector values, parameters
    ("ties", LOW, [{"density": 0.3}, {"density": 0.6}], (("rescale", True),)),
    ("breadcrumbs_ties", LOW, [{"density": 0.3, "gamma": 0.01}, {"density": 0.6, "gamma": 0.05}], ()),
    ("sce", SCE_LOW, [(), ()], (("select_topk", 0.3),)),
    ("arcee_fusion", FUSION_LOW, [()], ()),
]


def _low_runs(monkeypatch, method: str, low: str, forced: bool) -> list:
    """Count the low pass's statistics calls; with `forced`, the method needs it always."""
    m = type(METHODS[method])
    calls: list = []
    statistic = m.statistic
    monkeypatch.setattr(m, "statistic", lambda self, k, p, o, s: (calls.append(p) if p == low else None)
                        or statistic(self, k, p, o, s))
    if forced:
        monkeypatch.setattr(m, "needs", lambda self, p, f: True)
    return calls


@pytest.mark.parametrize("method,low,values,params", CASES, ids=[c[0] for c in CASES])
def test_the_high_pass_settles_what_the_low_pass_finds(bf16_trio, monkeypatch, method, low, values, params):
    base, chats, _ = bf16_trio
    vectors = [(1.0, chats[i], base, v) for i, v in enumerate(values)]
    for cut, starts in (ROW_CUTS if method == "arcee_fusion" else CUTS).items():
        with monkeypatch.context() as mp:
            calls = _low_runs(mp, method, low, forced=False)
            got, facts = run_pieces(method, "t", base, vectors, starts, params, compute="BF16")
            assert not calls, f"{method} cut {cut}: the low pass ran"
        with monkeypatch.context() as mp:
            calls = _low_runs(mp, method, low, forced=True)
            want, low_facts = run_pieces(method, "t", base, vectors, starts, params, compute="BF16")
            assert calls, "the forced low pass did not run"
        assert facts == low_facts, f"{method} cut {cut}"
        assert_same_bits(got, want, f"{method} cut {cut}")


def test_a_float32_selection_still_runs_the_low_pass(bf16_trio, monkeypatch):
    base, chats, _ = bf16_trio
    calls = _low_runs(monkeypatch, "ties", LOW, forced=False)
    run_pieces("ties", "t", base, [(1.0, chats[0], base, 0.3)], CUTS["1000"])
    assert calls


def test_a_threshold_in_nans_bin_runs_the_low_pass(monkeypatch):
    """Deltas of NaN, +-inf and numbers: the k-th largest magnitude is an infinity, in the bin NaNs
    share; only the low pass tells them apart, and it runs for that tensor."""
    n = 6000
    g = torch.Generator().manual_seed(5)
    base = torch.zeros(n, dtype=torch.bfloat16)
    other = torch.randn(n, generator=g)
    where = torch.rand(n, generator=g)
    other[where < 0.2] = float("nan")
    other[(where >= 0.2) & (where < 0.5)] = float("inf")
    other[(where >= 0.5) & (where < 0.6)] = -float("inf")
    other = other.to(torch.bfloat16)
    calls = _low_runs(monkeypatch, "ties", LOW, forced=False)
    for starts in ([], list(range(1000, n, 1000))):
        calls.clear()
        _, facts = run_pieces("ties", "t", base, [(1.0, other, base, 0.4)], starts, compute="BF16")
        assert facts[0]["high"] == sparse.NAN_BIN and facts[0]["threshold"] == 0x7F800000  # +inf
        assert len(calls) == len(starts) + 1
        kept = int(((other.float().isnan()) | (other.float().abs() == float("inf"))).sum())
        assert facts[0]["k"] < kept  # the cut falls among the infinities


def test_arcee_fusions_nan_quartile_from_the_high_pass_alone(bf16_trio, monkeypatch):
    """A NaN in a row makes the row's importances NaN: with 40% of rows so, q3 is a NaN, whose key
    (all ones) the high pass alone gives."""
    base, chats, _ = bf16_trio
    other = chats[0].clone()
    other[::5, 3] = float("nan")
    other[1::5, 7] = float("nan")
    got = []
    for forced in (False, True):
        with monkeypatch.context() as mp:
            calls = _low_runs(mp, "arcee_fusion", FUSION_LOW, forced)
            _, facts = run_pieces("arcee_fusion", "t", base, [(1.0, other, base, ())], ROW_CUTS["rows"], compute="BF16")
            assert bool(calls) == forced
        got.append(facts)
    assert got[0] == got[1] and got[0][0]["quartiles"][2] == 0xFFFFFFFF
