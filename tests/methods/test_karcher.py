"""karcher driven as the worker and the driver drive it (every statistics pass per piece, reduced,
then every piece applied; tests.methods.test_sparse_methods.run_pieces), bit for bit against a
whole-tensor reference written here: mergekit 0.1.5's iteration, on tensors of the compute dtype,
with its float reductions (norms, dot products) made exact and rounded once."""

from __future__ import annotations

import pytest
import torch

from raymerge.methods import METHODS
from tests.methods.test_geometric import COMPUTE, exact_sum, rounded, rounded_sqrt
from tests.methods.test_sparse_methods import assert_same_bits, run_pieces


def karcher_reference(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]

    def norm(x: torch.Tensor) -> torch.Tensor:  # float32, as torch.linalg.vector_norm(x.float())
        return torch.tensor(float(rounded_sqrt(exact_sum(x.double().reshape(-1) ** 2))))

    def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # in x's dtype, as torch.dot
        return torch.tensor(float(rounded(exact_sum(x.double().reshape(-1) * y.double().reshape(-1))))).to(x.dtype)

    norms = [norm(t) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(t * 0 for t in tensors)
    alphas = [1.0 / len(tensors)] * len(tensors)
    weights = [alphas[i] / sum(alphas[i] for i in valid) for i in valid]
    chosen = [units[i] for i in valid]
    mean = torch.zeros_like(chosen[0])
    for w, u in zip(weights, chosen):
        mean += w * u
    mn = norm(mean)
    mean = chosen[0].clone() if mn.item() < tol else (mean / mn).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, chosen):
            d = torch.clamp(dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(d)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - d * mean)
        tn = norm(tangent)
        if tn.item() < tol:
            break
        mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(mean.dtype)
        un = norm(mean)
        if un.item() > tol:
            mean = (mean / un).to(mean.dtype)
    return sum(a * n for a, n in zip(alphas, norms)) * mean


@pytest.fixture(scope="module")
def models():
    g = torch.Generator().manual_seed(43)
    base = 0.02 * torch.randn(60, 100, generator=g)
    return [base + s * torch.randn(60, 100, generator=g) for s in (0.01, 0.012, 0.008, 0.02)]


def karcher_pieces(tensors: list[torch.Tensor], cuts: list[int], max_iter: int = 10, tol: float = 1e-5,
                   compute: str | None = None, keep: bool = False):
    return run_pieces("karcher", "m", tensors[0], [(1.0, t, None, ()) for t in tensors], cuts,
                      (("max_iter", max_iter), ("tol", tol)), chunk=64, compute=compute, anchored=False, keep=keep)


# keep: each pass keeps the piece's mean and tangent for the next (the worker's way when the
# driver's budget allows), or computes every earlier iteration again (a resumed run's way)
KEEP = pytest.mark.parametrize("keep", [False, True], ids=["recomputed", "kept"])


CUTS = ([], [1, 99, 100, 101, 2500, 5999], list(range(750, 6000, 750)))  # whole, ragged, pieces of 7.5 rows


@KEEP
@pytest.mark.parametrize("dtype", list(COMPUTE))
@pytest.mark.parametrize("k", [2, 3, 4])
def test_karcher_gives_the_reference_bits_for_every_cut(models, dtype, k, keep):
    tensors = [m.to(dtype) for m in models[:k]]
    want = karcher_reference(tensors, 5)
    assert not torch.equal(want, (sum(t.float() for t in tensors) / k).to(dtype))  # not a plain average
    for starts in CUTS[1:2] if keep else CUTS:  # kept: the ragged cut (what passes keep is per piece)
        got, facts = karcher_pieces(tensors, starts, 5, compute=COMPUTE[dtype], keep=keep)
        assert_same_bits(got, want, f"karcher {dtype} k={k} {len(starts)} cuts")
    iterations = facts[0].get("done", 5)
    assert all(f"un{i}" in facts[0] for i in range(1, iterations)) and "d6" not in facts[0]


@KEEP
def test_a_converged_tensor_needs_no_more_passes(models, keep):
    """Float32 models near one another converge in a few iterations: the passes after are skipped
    (Method.needs), and the result is the reference's at max_iter 50."""
    tensors = [models[0], models[0] + 1e-4 * models[1], models[0] - 1e-4 * models[2]]
    want = karcher_reference(tensors, 50)
    got, facts = karcher_pieces(tensors, [1000, 3001], 50, keep=keep)
    assert_same_bits(got, want, "converged")
    done = facts[0]["done"]
    assert 1 <= done < 10 and f"d{done}" in facts[0] and f"un{done}" not in facts[0] and f"d{done + 1}" not in facts[0]
    karcher = METHODS["karcher"]
    before = [{k: v for k, v in facts[0].items() if k not in (f"tn{done}", f"cos{done}", f"sin{done}", "done")}]
    assert karcher.needs(f"karcher-tangent-{done}", before)  # the pass that found the step below tol
    assert not karcher.needs(f"karcher-tangent-{done}", facts)  # ... and once it has, no more
    assert not karcher.needs(f"karcher-unit-{done}", facts) and not karcher.needs(f"karcher-dots-{done + 1}", facts)


@KEEP
def test_models_of_norm_below_tol_are_left_out_and_all_of_them_give_zeros(models, keep):
    tiny = (1e-9 * models[2]).to(torch.bfloat16)
    tensors = [models[0].to(torch.bfloat16), tiny, models[1].to(torch.bfloat16)]
    want = karcher_reference(tensors, 3)
    got, _ = karcher_pieces(tensors, [77, 3000], 3, compute="BF16", keep=keep)
    assert_same_bits(got, want, "one model left out")
    tensors = [tiny, (-1e-9 * models[3]).to(torch.bfloat16)]
    want = karcher_reference(tensors, 3)
    got, facts = karcher_pieces(tensors, [77], 3, compute="BF16", keep=keep)
    assert_same_bits(got, want, "none valid")
    assert facts[0]["valid"] == 0 and "mn" not in facts[0] and not got.float().any()


def _passes_run(monkeypatch) -> list[str]:
    """The statistics passes karcher runs from here on, in order, once per piece."""
    from raymerge.methods import karcher

    ran, statistic = [], karcher.Karcher.statistic
    monkeypatch.setattr(karcher.Karcher, "statistic",
                        lambda self, kernel, p, operands, scratch: ran.append(p) or statistic(self, kernel, p, operands,
                                                                                              scratch))
    return ran


@KEEP
@pytest.mark.parametrize("k", [2, 3], ids=["dots-repeat", "dots-move"])
def test_a_dots_pass_makes_the_tangent_where_its_dots_repeat(models, monkeypatch, keep, k):
    """In a compute dtype, dots pass K >= 2 also makes iteration K's tangent, with the coefficients
    of iteration K - 1 (karcher._speculates): where its dots, rounded, come out as they were (two
    models here, every iteration), that is the tangent and no tangent pass runs after the first;
    where they moved (three models), the tangent pass runs and makes its own, and the one the dots
    pass kept is not read as it. The bits are the reference's either way."""
    ran = _passes_run(monkeypatch)
    tensors = [m.to(torch.bfloat16) for m in models[:k]]
    got, facts = karcher_pieces(tensors, [2500], 5, compute="BF16", keep=keep)
    assert_same_bits(got, karcher_reference(tensors, 5), f"k={k}")
    tangents = sorted({p for p in ran if "-tangent-" in p})
    assert {p for p in ran if "-dots-" in p} == {f"karcher-dots-{i}" for i in range(1, 6)}
    f = facts[0]
    if k == 2:
        assert all(f[f"d{i}"] == f["d1"] for i in range(2, 6)) and tangents == ["karcher-tangent-1"]
    else:
        assert f["d2"] != f["d1"] and tangents == [f"karcher-tangent-{i}" for i in range(1, 6)]
    assert all(f"tn{i}" in f for i in range(1, 6))


def test_an_iteration_whose_every_model_is_skipped_needs_no_tangent_pass(models, monkeypatch):
    """Models so near one another that every dot rounds to 1 in BF16: each angle is 0, below tol,
    so every model is skipped, the tangent is zeros, its norm 0, and the iteration stops there.
    The dots pass's reduce records that (mergekit's break): the tangent pass does not run."""
    ran = _passes_run(monkeypatch)
    tensors = [(models[0] + e * models[1]).to(torch.bfloat16) for e in (0, 1e-3, -1e-3)]
    got, facts = karcher_pieces(tensors, [2500], 5, compute="BF16")
    assert_same_bits(got, karcher_reference(tensors, 5), "every model skipped")
    assert facts[0]["done"] == 1 and facts[0]["tn1"] == 0 and all(facts[0]["skip1"])
    assert sorted(set(ran)) == ["karcher-dots-1", "karcher-mean", "karcher-norms"]


def test_one_model_is_that_model(models):
    one = models[0].to(torch.bfloat16)
    got, facts = karcher_pieces([one], [10], 3, compute="BF16")
    assert_same_bits(got, one, "one model")
    assert facts is None


def test_kept_means_spare_the_passes_every_earlier_iteration(models, monkeypatch):
    """With what each pass keeps, the first mean is computed once, in its own pass (one call per
    chunk), and never again; without, every later pass and the output compute it from the inputs."""
    from raymerge.methods import karcher

    calls = []
    first_mean = karcher._State.first_mean
    monkeypatch.setattr(karcher._State, "first_mean", lambda self: calls.append(1) or first_mean(self))
    tensors = [m.to(torch.bfloat16) for m in models[:3]]
    want = karcher_reference(tensors, 4)
    chunks = 6000 // 64 + 1  # of the one piece, 64 elements each
    # recomputed: the mean pass, the 3 passes of each of 4 iterations, the output
    for keep, wanted in ((True, chunks), (False, (1 + 3 * 4 + 1) * chunks)):
        calls.clear()
        got, facts = karcher_pieces(tensors, [], 4, compute="BF16", keep=keep)
        assert_same_bits(got, want, f"keep={keep}")
        assert "done" not in facts[0] and len(calls) == wanted, (keep, len(calls))


@KEEP
@pytest.mark.parametrize("k", [2, 3], ids=["tangent-of-the-dots-pass", "tangent-of-the-tangent-pass"])
def test_a_unit_pass_given_its_mean_and_tangent_reads_no_input(models, monkeypatch, keep, k):
    """Method.reads_inputs: a unit pass that was handed the mean it steps from and its iteration's
    tangent (made by the tangent pass, or by the dots pass where its bet won: two models here) says
    it reads no input (the worker then maps its local inputs without reading them), and indeed
    touches none; without them (a resumed run) it says it reads them."""
    from raymerge.methods import karcher

    seen, touched = [], []
    statistic, x = karcher.Karcher.statistic, karcher._State.x
    monkeypatch.setattr(karcher._State, "x", property(lambda self: touched.append(1) or x.fget(self)))

    def watched(self, kernel, pass_name, operands, scratch):
        touched.clear()
        result = statistic(self, kernel, pass_name, operands, scratch)
        seen.append((pass_name, self.reads_inputs(pass_name, operands.carried, operands.facts), bool(touched)))
        return result

    monkeypatch.setattr(karcher.Karcher, "statistic", watched)
    tensors = [m.to(torch.bfloat16) for m in models[:k]]
    got, _ = karcher_pieces(tensors, [2500], 3, compute="BF16", keep=keep)
    assert_same_bits(got, karcher_reference(tensors, 3), f"keep={keep}")
    assert ("karcher-tangent-2" in {name for name, _, _ in seen}) == (k == 3)
    units = [(reads, read) for name, reads, read in seen if "-unit-" in name]
    assert len(units) == 2 * 3  # two pieces, three iterations
    assert all(reads == (not keep) and read == (not keep) for reads, read in units), units
    assert all(reads for name, reads, _ in seen if "-unit-" not in name)


def test_bf16_scalars_made_without_torch_are_torch_s_wherever_they_are_made():
    """`_scalars_bf16` gives `_scalars`' facts (torch on 0-dim tensors) for every pass, or None: the
    dots for BF16 values over [-1.02, 1.02] on and off the grid (two and three models, one of them
    below tol), the tangent's cos and sin for norms over [0, 3.2] and tiny ones, the norms, the mean's
    and the unit's; and None for almost none of them (so a run seldom starts torch's process)."""
    import numpy as np

    from raymerge.methods import karcher

    rng = np.random.default_rng(3)
    grid = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)
    grid = grid[np.isfinite(grid) & (np.abs(grid) <= 1.02)][::5]
    made = asked = 0
    for count, norms in ((2, [1.0, 2.0]), (3, [1.0, 0.5, 3.0]), (3, [1.0, 2.0, 0.0])):
        f = {"n": [karcher.bits(np.float32(n)) for n in norms]}
        valid = len(karcher._valid(f, 1e-5))
        for j in range(0, grid.size - valid, valid):
            sums = [float(np.float32(x * (1 + rng.uniform(-1e-3, 1e-3)) if rng.random() < 0.5 else x))
                    for x in grid[j:j + valid]]
            got, asked = karcher._scalars_bf16(karcher.DOTS, 2, sums, f, count, 1e-5), asked + 1
            if got is not None:
                made += 1
                assert got == karcher._scalars(karcher.DOTS, 2, sums, f, count, 1e-5, "BF16"), sums
    norms = np.concatenate([rng.uniform(0, 3.2, 4000), 10.0 ** rng.uniform(-9, 0, 4000), [0.0, 1e-5, np.pi]])
    for tn in norms.astype(np.float32).tolist():
        got, asked = karcher._scalars_bf16(karcher.TANGENT, 3, [tn], {}, 3, 1e-5), asked + 1
        if got is not None:
            made += 1
            assert got == karcher._scalars(karcher.TANGENT, 3, [tn], {}, 3, 1e-5, "BF16"), tn
    assert made > 0.999 * asked
    for _ in range(500):
        count = int(rng.integers(2, 5))
        sums = (rng.choice([0, 1e-6, 1e-5, 3.0, 1e5], count) * rng.uniform(0.5, 2, count)).astype(np.float32).tolist()
        for what, it in ((karcher.NORMS, 0), (karcher.MEAN, 0), (karcher.UNIT, 4)):
            given = sums if what == karcher.NORMS else sums[:1]
            assert karcher._scalars_bf16(what, it, given, {}, count, 1e-5) == \
                karcher._scalars(what, it, given, {}, count, 1e-5, "BF16")
    assert karcher._scalars_bf16(karcher.NORMS, 0, [float("inf"), 1.0], {}, 2, 1e-5) is None  # torch's, as before
    assert METHODS["karcher"].needs_torch(type("T", (), {"compute": "BF16"})()) is False
    assert METHODS["karcher"].needs_torch(type("T", (), {"compute": None})()) is True
