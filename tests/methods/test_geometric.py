"""The geometric methods driven as the worker and the driver drive them (statistics passes per
piece, reduced, then every piece applied; tests.methods.test_sparse_methods.run_pieces), bit for
bit against whole-tensor references written here: mergekit 0.1.5's float32 operations, with its
float reductions (norms, dot products) made exact (Fractions) and rounded once."""

from __future__ import annotations

from decimal import Decimal, getcontext
from fractions import Fraction

import numpy as np
import pytest
import torch

from tests.methods.test_sparse_methods import assert_same_bits, float32_of, run_pieces

N = 6_000
CUTS = {"whole": [], "ragged": [1, 2, 999, 1000, 4097, N - 1], "1000": list(range(1000, N, 1000))}


# --- exact reductions, rounded once ----------------------------------------------------------------

def exact_sum(x: torch.Tensor) -> Fraction:
    return sum((Fraction(v) for v in x.double().reshape(-1).tolist()), Fraction(0))


def rounded(value: Fraction) -> np.float32:
    """An exact value rounded once to float32."""
    return -float32_of(-value) if value < 0 else float32_of(value)


def rounded_sqrt(value: Fraction) -> np.float32:
    """The square root of an exact non-negative value, rounded once to float32."""
    getcontext().prec = 90
    root = (Decimal(value.numerator) / Decimal(value.denominator)).sqrt()
    guess = np.float32(float(root))
    near = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(near, key=lambda c: (abs(Decimal(float(c)) - root), int(c.view(np.uint32)) & 1))


# --- references --------------------------------------------------------------------------------------

def slerp_reference(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's slerp of one tensor: float32, its norms and dot product exact, rounded once."""
    x, y = v0.float().reshape(-1), v1.float().reshape(-1)
    na, nb = (rounded_sqrt(exact_sum(z.double() * z.double())) for z in (x, y))  # exact squares (float64)
    na, nb = (n if n > np.float32(1e-8) else np.float32(1) for n in (na, nb))
    dot = rounded(exact_sum((x / torch.tensor(na)) * (y / torch.tensor(nb))))
    tt = torch.tensor([[t]], dtype=torch.float32)
    d = torch.tensor([[float(dot)]], dtype=torch.float32).clamp(-1, 1)
    linear = d.abs() > 0.9995
    theta = torch.acos(torch.where(linear, 0, d))
    ca = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / torch.sin(theta))
    cb = torch.where(linear, tt, torch.sin(tt * theta) / torch.sin(theta))
    return (ca.reshape(()) * x + cb.reshape(()) * y).to(v0.dtype).reshape(v0.shape)


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(31)
    v0 = 0.02 * torch.randn(N, generator=g)
    v1 = v0 + 0.015 * torch.randn(N, generator=g)
    return v0, v1


def slerp_pieces(v0: torch.Tensor, v1: torch.Tensor, t: float, cuts: list[int], chunk: int | None = None):
    """SLERP's term as the planner makes it: a = the other model, b = the base (also the anchor)."""
    return run_pieces("slerp", "model.layers.0.mlp.up_proj.weight", v0, [(1.0, v1, v0, (("t", t),))], cuts,
                      chunk=chunk)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [0.0, 0.35, 1.0, 1.3])
def test_slerp_gives_the_reference_bits_for_every_cut(pair, dtype, t):
    v0, v1 = (v.to(dtype) for v in pair)
    want = slerp_reference(v0, v1, t)
    if 0 < t < 1:
        linear = ((1 - t) * v0.float() + t * v1.float()).to(dtype)
        assert not torch.equal(want, linear)  # the spherical branch: not a plain interpolation
    for cut, starts in CUTS.items():
        for chunk in (None, 777):
            got, facts = slerp_pieces(v0, v1, t, starts, chunk)
            assert_same_bits(got, want, f"slerp t={t} {dtype} cut {cut} chunk {chunk}")
    assert set(facts[0]) == {"na", "nb", "dot", "ca", "cb"}


def test_slerp_one_element_per_piece_and_special_branches(pair):
    v0, v1 = (v[:300].to(torch.bfloat16) for v in pair)
    want = slerp_reference(v0, v1, 0.6)
    got, _ = slerp_pieces(v0, v1, 0.6, list(range(1, 300)))
    assert_same_bits(got, want, "one element per piece")
    # Collinear inputs take the linear branch; a zero base divides by 1.
    for a, b in ((v0, (2 * v0.float()).to(torch.bfloat16)), (torch.zeros_like(v0), v1)):
        want = slerp_reference(a, b, 0.25)
        got, _ = slerp_pieces(a, b, 0.25, [7, 150])
        assert_same_bits(got, want, "special branch")


def test_slerp_facts_do_not_depend_on_the_cut(pair):
    v0, v1 = (v.to(torch.bfloat16) for v in pair)
    seen = [slerp_pieces(v0, v1, 0.4, starts)[1] for starts in CUTS.values()]
    assert all(s == seen[0] for s in seen)


def nuslerp_reference(m0: torch.Tensor, m1: torch.Tensor, base: torch.Tensor | None, w0: float, w1: float,
                      flatten: bool = True) -> torch.Tensor:
    """mergekit's nuslerp: every operation on tensors of the inputs' dtype; its norms and its sum
    of products exact, rounded once to float32 and then to the dtype."""
    dtype = m0.dtype
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    v0, v1 = (m0 - base, m1 - base) if base is not None else (m0, m1)
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)

    def per_vector(x: torch.Tensor, reduce) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        return torch.tensor([float(reduce(r)) for r in rows], dtype=torch.float32).to(dtype).reshape(*x.shape[:-1], 1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / per_vector(x, lambda r: rounded_sqrt(exact_sum(r.double() * r.double()))).clamp(min=1e-7)

    cos = per_vector(unit(v0) * unit(v1), lambda r: rounded(exact_sum(r))).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-8 ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result).reshape(shape)
    return base + result if base is not None else result


COMPUTE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: None}


@pytest.fixture(scope="module")
def trio():
    g = torch.Generator().manual_seed(37)
    base = 0.02 * torch.randn(60, 100, generator=g)
    return base, base + 0.01 * torch.randn(60, 100, generator=g), base + 0.01 * torch.randn(60, 100, generator=g)


@pytest.mark.parametrize("dtype", list(COMPUTE))
@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_gives_the_reference_bits_for_every_cut(trio, dtype, flatten, with_base):
    base, m0, m1 = (x.to(dtype) for x in trio)
    want = nuslerp_reference(m0, m1, base if with_base else None, 0.7, 0.4, flatten)
    params = (("nuslerp_flatten", flatten),)
    for starts in ([], [1, 99, 100, 101, 2500, 5999], list(range(250, 6000, 250))):
        got, facts = run_pieces("nuslerp", "n", base if with_base else m0,
                                [(0.7, m0, base if with_base else None, ()), (0.4, m1, base if with_base else None, ())],
                                starts, params, chunk=64, compute=COMPUTE[dtype], anchored=with_base)
        assert_same_bits(got, want, f"nuslerp {dtype} flatten={flatten} base={with_base} {len(starts)} cuts")
    assert len(facts[0]["sa"]) == (1 if flatten else 60)


@pytest.mark.parametrize("dtype,compute", [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, None)])
def test_nuslerp_norms_are_torchs_clamp_in_the_compute_dtype(dtype, compute):
    """The driver rounds and clamps the norms without torch: the bits of mergekit's torch steps
    (float32 norms to the dtype, clamp(min=1e-7)), about the floor, zeros, infinities and NaNs."""
    from raymerge.methods.nuslerp import _norms

    g = torch.Generator().manual_seed(4)
    floor = np.float32(1e-7)
    near = np.float32([floor * (1 + d) for d in (-0.01, -0.004, -0.001, 0, 0.001, 0.004, 0.01)])
    special = np.float32([0, -0.0, np.inf, 1e-45, 1e-38, 65504, 7e4, 3e38, 1e-8, 1.0])
    values = np.concatenate([near, special, (torch.rand(3000, generator=g).numpy() *
                                             10.0 ** torch.randint(-12, 4, (3000,), generator=g).numpy())
                             .astype(np.float32)])
    for v in (values, np.append(values, np.nan)):  # a NaN: torch's steps (its clamp makes its own NaN)
        want = torch.tensor(v, dtype=torch.float32).to(dtype).clamp(min=float(floor)).float()
        assert _norms(v, compute) == want.numpy().view(np.uint32).tolist()


def test_nuslerp_colinear_vectors_and_weights_summing_to_zero(trio):
    base, m0, _ = (x.to(torch.bfloat16) for x in trio)
    m1 = (base.float() + 2 * (m0.float() - base.float())).to(torch.bfloat16)  # a multiple: colinear (in bf16, nearly)
    for w0, w1 in ((0.7, 0.4), (0.5, -0.5)):
        want = nuslerp_reference(m0, m1, base, w0, w1, flatten=False)
        got, facts = run_pieces("nuslerp", "n", base, [(w0, m0, base, ()), (w1, m1, base, ())], [1, 700, 3001],
                                (("nuslerp_flatten", False),), compute="BF16")
        assert_same_bits(got, want, f"colinear, weights {w0} {w1}")
    assert any(facts[0]["colinear"])


def model_stock_reference(base: torch.Tensor, models: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """mergekit's model_stock, every operation on tensors of the inputs' dtype, its norms and sums
    of products exact, rounded once to float32 and then to the dtype."""
    dtype = base.dtype
    w0, ws = base, list(models)
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]

    def per_vector(x: torch.Tensor, reduce) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        return torch.tensor([float(reduce(r)) for r in rows], dtype=torch.float32).to(dtype).reshape(x.shape[:-1])

    norms = [per_vector(o, lambda r: rounded_sqrt(exact_sum(r.double() * r.double()))) for o in offsets]
    cos_thetas = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = per_vector(offsets[i] * offsets[j], lambda r: rounded(exact_sum(r)))
            cos_thetas.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta),
                    (count * cos_theta) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / count
    return (t * average + (1 - t) * w0).reshape(shape)


@pytest.mark.parametrize("dtype", list(COMPUTE))
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("k", [2, 3])
def test_model_stock_gives_the_reference_bits_for_every_cut(trio, dtype, filter_wise, k):
    base, m0, m1 = (x.to(dtype) for x in trio)
    models = [m0, m1, (base.float() - 0.5 * (m0.float() - base.float())).to(dtype)][:k]
    want = model_stock_reference(base, models, filter_wise)
    for starts in ([], [1, 99, 100, 101, 2500, 5999], list(range(250, 6000, 250))):
        got, facts = run_pieces("model_stock", "m", base, [(1.0, m, base, ()) for m in models], starts,
                                (("filter_wise", filter_wise),), chunk=64, compute=COMPUTE[dtype])
        assert_same_bits(got, want, f"model_stock {dtype} filter_wise={filter_wise} k={k} {len(starts)} cuts")
    assert len(facts[0]["t"]) == (60 if filter_wise else 1)


def multislerp_reference(models: list[torch.Tensor], base: torch.Tensor | None, weights: list[float],
                         normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's multislerp, every operation on tensors of the inputs' dtype, its norms and dot
    products exact, rounded once to float32 and then to the dtype."""
    if len(models) == 1:
        return models[0]
    dtype = models[0].dtype

    def exact_norm(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(rounded_sqrt(exact_sum(x.double().reshape(-1) ** 2)))).to(dtype)

    tensors = torch.stack(models, dim=0)
    if base is not None:
        tensors -= base
    flat = tensors.view(tensors.shape[0], -1)
    w = torch.tensor(weights, dtype=dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.stack([exact_norm(x) for x in flat]).unsqueeze(-1)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    if exact_norm(mean) < eps:  # mergekit's fallback, for two models: their weighted sum
        result = (tensors[0] * w[0] + tensors[1] * w[1]).view(tensors.shape[1:])
        return result + base if base is not None else result
    mean = mean / exact_norm(mean)
    dots = torch.stack([torch.tensor(float(rounded(exact_sum(u * mean)))).to(dtype) for u in units]).unsqueeze(-1)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tn = exact_norm(tangent) + eps
    result = mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
    result = (result * (norms.squeeze(-1) * w).sum()).view(tensors.shape[1:])
    return result + base if base is not None else result


@pytest.mark.parametrize("dtype", list(COMPUTE))
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_multislerp_gives_the_reference_bits_for_every_cut(trio, dtype, with_base, k):
    base, m0, m1 = (x.to(dtype) for x in trio)
    models = [m0, m1, (base.float() - 0.5 * (m0.float() - base.float())).to(dtype)][:k]
    weights = [0.5, 0.3, 0.4][:k]
    b = base if with_base else None
    want = multislerp_reference(models, b, weights)
    for starts in ([], [1, 99, 100, 101, 2500, 5999], list(range(250, 6000, 250))):
        got, _ = run_pieces("multislerp", "m", base if with_base else m0,
                            [(w, m, b, ()) for w, m in zip(weights, models)], starts, chunk=64,
                            compute=COMPUTE[dtype], anchored=with_base)
        assert_same_bits(got, want, f"multislerp {dtype} base={with_base} k={k} {len(starts)} cuts")


def test_multislerp_antipodal_models_fall_back_to_their_weighted_sum(trio):
    g = torch.Generator().manual_seed(5)
    d = torch.randint(-20, 21, (6000,), generator=g).float() * 2.0**-7  # multiples of bf16's ulp at 1.0
    base = torch.ones(6000, dtype=torch.bfloat16)
    m0, m1 = (1 + d).to(torch.bfloat16), (1 - d).to(torch.bfloat16)
    assert torch.equal(m1 - base, -(m0 - base))  # exactly antipodal changes: the mean is zero
    want = multislerp_reference([m0, m1], base, [1.0, 1.0])
    got, facts = run_pieces("multislerp", "m", base, [(1.0, m0, base, ()), (1.0, m1, base, ())], [1, 3000],
                            compute="BF16")
    assert facts[0]["fallback"] == 1
    assert_same_bits(got, want, "fallback")


@pytest.mark.parametrize("method,params", [("nuslerp", (("nuslerp_flatten", False),)),
                                           ("model_stock", (("filter_wise", True),))])
def test_rows_past_the_models_limit_keep_the_base(trio, method, params):
    """An expanded vocabulary: the models cover the first 50 of the base's 60 rows."""
    base, m0, m1 = (x.to(torch.bfloat16) for x in trio)
    short = [m[:50] for m in (m0, m1)]
    if method == "nuslerp":
        head = nuslerp_reference(*short, base[:50], 0.7, 0.4, flatten=False)
        vectors = [(0.7, short[0].reshape(-1), base[:50].reshape(-1), ()), (0.4, short[1].reshape(-1),
                                                                         base[:50].reshape(-1), ())]
    else:
        head = model_stock_reference(base[:50], short, True)
        vectors = [(1.0, m.reshape(-1), base[:50].reshape(-1), ()) for m in short]
    want = torch.cat([head, base[50:]])
    for starts in ([], [100, 4999, 5000, 5001], list(range(700, 6000, 700))):
        got, _ = run_pieces(method, "r", base, vectors, starts, params, compute="BF16")
        assert_same_bits(got, want, f"{method} past the limit, {len(starts)} cuts")


@pytest.mark.parametrize("bad", [[1, True], [1, -1], [1, 2**32], [1, 2.0], [1, "2"], [1, None], [1]])
def test_a_facts_list_holds_float32_bit_patterns_alone(bad):
    from raymerge.methods.steps import facts_problem

    assert facts_problem([{"cos": [0, 2**32 - 1]}], 1, {"cos": 2}) is None
    assert facts_problem([{"cos": []}], 1, {"cos": 0}) is not None and facts_problem([{"cos": []}], 1, {"cos": 1})
    assert "cos" in facts_problem([{"cos": bad}], 1, {"cos": 2})
