"""TIES and DARE driven as the worker and the driver drive them: a tensor cut into pieces, each
statistics pass's results per piece reduced into the tensor's facts, then every piece computed
with the numpy kernel; bit for bit against a whole-tensor torch reference written here in
mergekit 0.1.5's order (`sparse_reference`, also used by the end-to-end tests), for every cut."""

from __future__ import annotations

import hashlib
import random
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raymerge.methods import ELEMENTWISE, METHODS, Operands, Vector
from raymerge.ops.numpy_kernel import NUMPY
from raymerge.planning.plan import Term

F32_MAX = Fraction(float(np.finfo(np.float32).max))


# --- the reference ------------------------------------------------------------------------------

def float32_of(value: Fraction) -> np.float32:
    """An exact non-negative value rounded once to float32 (nearest, ties to even)."""
    if value >= F32_MAX + Fraction(2 ** 103):
        return np.float32(np.inf)
    guess = np.float32(float(value))
    near = [c for c in (np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf)))
            if np.isfinite(c) and c >= 0]
    return min(near, key=lambda c: (abs(Fraction(float(c)) - value), int(c.view(np.uint32)) & 1))


def l1(x: torch.Tensor) -> np.float32:
    """sum |x| of a float32 tensor, exactly, rounded once to float32 (finite values only)."""
    units = sum(int(v) for v in (x.double().abs() * 2.0 ** 149).flatten().tolist())  # float32 * 2**149: integers
    return float32_of(Fraction(units, 2 ** 149))


def dare_keep(seed: int, name: str, n: int, density: float) -> torch.Tensor:
    """The documented DARE mask of a whole tensor."""
    digest = hashlib.sha256(f"raymerge-dare\0{seed}\0{name}".encode()).digest()
    key = np.frombuffer(digest[:16], dtype="<u8").copy()
    words = np.random.Philox(key=key, counter=0).random_raw((n + 1) // 2).view(np.uint32)[:n]
    return torch.from_numpy(words < min(2 ** 32, int(density * 2 ** 32)))


def ties_keep(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The k largest magnitudes, k = max(1, int(density * n)); ties at the k-th kept lowest index first."""
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def della_keep(delta: torch.Tensor, density: float, epsilon: float, seed: int, name: str) -> torch.Tensor:
    """The documented della mask: each row's magnitudes ranked ascending (equal ones lowest index
    first), keep probabilities (density - epsilon) + norm * 2 * epsilon with torch's operations in
    delta's dtype (mergekit's), and element i kept where its 32 random bits of the Philox stream keyed
    by (seed, name) fall below p * 2**32. delta: of one or two dimensions."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    order = torch.sort(rows.abs().float(), dim=1, stable=True).indices
    ranks = order.argsort(dim=1).to(delta.dtype) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - low) / (high - low)).clamp(0, 1) * 2 * epsilon
    digest = hashlib.sha256(f"raymerge-della\0{seed}\0{name}".encode()).digest()
    key = np.frombuffer(digest[:16], dtype="<u8").copy()
    n = rows.numel()
    words = np.random.Philox(key=key, counter=0).random_raw((n + 1) // 2).view(np.uint32)[:n]
    return torch.from_numpy(words < np.floor(probs.reshape(-1).double().numpy() * 2.0**32))


def breadcrumbs_keep(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's magnitude_outliers: of the ascending sort of |delta|, ranks n_bot .. n_bot + target - 1
    (ties ranked as in ties_keep: in descending order, lowest index first)."""
    flat = delta.reshape(-1)
    n = flat.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices  # ascending rank r is position n - 1 - r
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[n - n_bot - target:n - n_bot]] = True
    return keep


def sparse_reference(name: str, anchor: torch.Tensor, vectors: list, method: str, *, normalize: bool | None = None,
                     rescale: bool | None = None, lam: float = 1.0, seed: int = 0) -> torch.Tensor:
    """mergekit 0.1.5's generalized task arithmetic on whole tensors in float32, rounded once to the
    anchor's dtype, with raymerge's documented masks. vectors: (weight, a, b or None, density)."""
    normalize = (method in ("ties", "della")) if normalize is None else normalize
    rescale = method.startswith(("dare", "della")) if rescale is None else rescale
    f32 = [(w, a.float(), b.float() if b is not None else None, d) for w, a, b, d in vectors]
    return gta_reference(name, anchor.float(), f32, method, normalize=normalize, rescale=rescale, lam=lam,
                         seed=seed).to(anchor.dtype)


def gta_reference(name: str, anchor: torch.Tensor, vectors: list, method: str, *, normalize: bool,
                  rescale: bool = False, lam: float = 1.0, seed: int = 0) -> torch.Tensor:
    """mergekit 0.1.5's generalized task arithmetic (task_arithmetic, ties, dare_*) with every tensor
    in the anchor's dtype, each operation a torch operation on tensors of that dtype (its compute
    dtype), in its order, with raymerge's documented masks (TIES: ties kept lowest index first; DARE:
    its Philox draw) and exact L1 sums rounded to float32, then to the dtype. vectors: (weight, a, b
    or None, density or {"density": .., "gamma": ..} (breadcrumbs))."""
    dtype = anchor.dtype
    consensus = method in ("ties", "dare_ties", "breadcrumbs_ties", "della")
    deltas = []
    for weight, a, b, values in vectors:
        density, gamma = (values["density"], values.get("gamma", 0.01)) if isinstance(values, dict) else (values, 0.01)
        delta = (a - b if b is not None else a).reshape(-1)
        if method.startswith("della") and 0 < density < 1:  # in bf16 for bf16, else in float32 (mergekit's)
            work = dtype if dtype == torch.bfloat16 else torch.float32
            d = (a - b if b is not None else a).to(work)
            keep = della_keep(d, density, values.get("epsilon", 0.15), seed, name).reshape(-1)
            masked = d.reshape(-1) * keep.to(work)
            if rescale:
                before, after = (torch.tensor(l1(x.float())).to(work) for x in (d, masked))
                if not (float(before) < np.float32(1e-7) or float(after) < np.float32(1e-7)):
                    masked = masked * (before / after)
            delta = masked.to(dtype)
        elif method != "task_arithmetic" and density < 1:
            if density <= 0:
                delta = torch.zeros_like(delta) if method in ("ties", "della", "della_linear") else delta * 0
            else:
                keep = ties_keep(delta.float(), density) if method == "ties" else \
                    breadcrumbs_keep(delta.float(), density, gamma) if method.startswith("breadcrumbs") else \
                    dare_keep(seed, name, delta.numel(), density)
                masked = delta * keep.to(dtype)
                if rescale:
                    before, after = (torch.tensor(l1(x.float())).to(dtype) for x in (delta, masked))
                    if not (float(before) < np.float32(1e-7) or float(after) < np.float32(1e-7)):
                        masked = masked * (before / after)
                delta = masked
        deltas.append(delta)
    deltas = torch.stack(deltas)
    weights = torch.tensor([v[0] for v in vectors], dtype=dtype).unsqueeze(-1)
    deltas = deltas * weights
    if consensus:
        majority = (deltas.sum(dim=0) >= 0).to(dtype) * 2 - 1
        mask = deltas.sign() == majority
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return (anchor.reshape(-1) + mixed).reshape(anchor.shape)


# --- driving the method as raymerge does ----------------------------------------------------------

def bits16(t: torch.Tensor) -> np.ndarray:
    """A bf16 tensor as the kernel holds it: its bits, uint16."""
    return t.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return bits16(t) if t.dtype == torch.bfloat16 else t.contiguous().numpy().reshape(-1)


def run_pieces(method: str, name: str, anchor: torch.Tensor, vectors: list, cuts: list[int], params=(),
               chunk: int | None = None, shuffle: int = 0, compute: str | None = None, anchored: bool = True,
               keep: bool = False):
    """The tensor computed piece by piece: `cuts` are the first elements of its pieces after the
    first; a vector's last item is its density, or its per-vector values as (name, value) pairs. Every
    statistics pass's results go to reduce (in a shuffled order, as they may arrive),
    then apply writes each piece. Vectors shorter than the anchor cover its first elements (an
    expanded vocabulary's shared rows): a piece past them has no operands of them, as in the worker.
    `compute`: mergekit's compute dtype (the inputs' own, as the worker casts them). Without
    `anchored`, the anchor only gives the output's shape and dtype (a recipe without one). `keep`:
    what each pass keeps of a piece is carried to its next passes, as the worker carries it.
    Returns (output as a torch tensor, the tensor's facts)."""
    m = METHODS[method]
    n = anchor.numel()
    limits = [a.numel() if a.numel() < n else None for _, a, _, _ in vectors]
    values = [tuple(d.items()) if isinstance(d, dict) else d if isinstance(d, tuple) else (("density", d),)
              for _, _, _, d in vectors]
    tensor = SimpleNamespace(name=name, shape=tuple(anchor.shape), params=tuple(params), method=method, compute=compute,
                             terms=tuple(Term(w, None, None, limit, vals)
                                         for (w, _, _, _), limit, vals in zip(vectors, limits, values)))
    arrays = [(w, as_numpy(a), as_numpy(b) if b is not None else None, vals) for (w, a, b, _), vals in zip(vectors, values)]
    anchor_np = as_numpy(anchor)
    bounds = [0, *cuts, n]
    pieces = list(zip(bounds, bounds[1:]))
    scratch = NUMPY.scratch(chunk)
    facts = None

    kept: dict[int, dict] = {}  # piece's first element -> what its passes kept

    def operands(lo: int, hi: int, with_anchor: bool, new: dict | None = None) -> Operands:
        vecs = tuple(Vector(w, a[lo:hi], b[lo:hi] if b is not None else None, term=j, values=vals)
                     for j, (w, a, b, vals) in enumerate(arrays) if lo < len(a))
        return Operands(anchor_np[lo:hi] if with_anchor and anchored else None, vecs, tuple(params), name, lo, facts, compute,
                        tuple(anchor.shape), keep=new,
                        carried=dict(kept[lo]) if lo in kept and (new is not None or with_anchor) else None)

    def statistic(p: str, lo: int, hi: int) -> list:
        new: dict | None = {} if keep else None
        result = m.statistic(NUMPY, p, operands(lo, hi, False, new), scratch)
        if new:  # a later pass's value of a name replaces an earlier one's (the worker's `merged`)
            kept.setdefault(lo, {}).update({k: v.copy() if isinstance(v, np.ndarray) else v for k, v in new.items()})
        return result

    passes = m.passes_for(tensor)
    assert passes[-1] == ELEMENTWISE
    for p in passes[:-1]:
        if not m.needs(p, facts):
            continue  # as the driver skips it (an iterative method's, converged)
        results = [(lo, statistic(p, lo, hi)) for lo, hi in pieces]
        random.Random(shuffle).shuffle(results)
        facts = m.reduce(p, tensor, results, facts)
    out = np.empty(n, anchor_np.dtype)
    for lo, hi in pieces:
        m.apply(NUMPY, out[lo:hi], operands(lo, hi, True), scratch)
    got = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16) if anchor.dtype == torch.bfloat16 \
        else torch.from_numpy(out)
    return got.reshape(anchor.shape), facts


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    differ = got.contiguous().view(torch.uint8) != want.contiguous().view(torch.uint8)
    assert not differ.any(), f"{what}: {int(differ.sum())} bytes differ"


N = 20_000
CUTS = {  # first elements of the pieces after the first
    "whole": [],
    "1000": list(range(1000, N, 1000)),
    "4097": list(range(4097, N, 4097)),
    "ragged": [1, 2, 3, 1001, 1002, 7777, 7778, 15_000, N - 1],
}


def _straddling_ties(base, chat, density) -> bool:
    """Whether the k-th largest |delta| is tied with elements kept and elements dropped."""
    d = (chat.float() - base.float()).reshape(-1).abs()
    k = max(1, int(density * d.numel()))
    kth = torch.sort(d, descending=True).values[k - 1]
    return int((d > kth).sum()) < k - 1 and int((d >= kth).sum()) > k


CASES = [
    ("ties", [(0.7, 0.3), (0.5, 0.6)], ()),
    ("ties", [(1.0, 0.2), (0.8, 0.5), (0.6, 0.9)], (("normalize", False), ("lambda", 1.5))),
    ("ties", [(0.9, 0.35), (0.4, 1.0)], (("rescale", True),)),  # TIES with the L1 rescale too
    ("ties", [(0.9, 0.0), (0.4, 0.00001)], ()),  # nothing kept of one; k = 1 of the other
    ("dare_ties", [(0.7, 0.3), (0.5, 0.6)], (("seed", 5),)),
    ("dare_ties", [(1.0, 0.2), (0.8, 0.5), (0.6, 1.0)], (("normalize", True), ("lambda", 0.9))),
    ("dare_linear", [(0.7, 0.3), (0.5, 0.6)], ()),
    ("dare_linear", [(0.7, 0.3), (0.5, 0.6)], (("rescale", False), ("normalize", True), ("seed", 123))),
    ("dare_linear", [(0.3, 0.5), (-0.3, 0.5)], (("normalize", True),)),  # weights summing to 0: not divided
]


@pytest.mark.parametrize("keep", [False, True], ids=["made-again", "kept"])  # the L1 pass's masks, if it runs
@pytest.mark.parametrize("method,terms,params", CASES)
def test_every_cut_gives_the_whole_tensor_reference_bits(bf16_trio, method, terms, params, keep):
    base, chats, anchor = bf16_trio
    vectors = [(w, chats[i], base, d) for i, (w, d) in enumerate(terms)]
    if method == "ties" and min(d for _, d in terms) >= 0.1:  # the k-th largest |delta| is tied across kept and dropped
        assert any(_straddling_ties(base, chats[i], d) for i, (_, d) in enumerate(terms) if 0 < d < 1)
    p = dict(params)
    want = sparse_reference("model.layers.0.mlp.up_proj.weight", anchor, vectors, method,
                            normalize=p.get("normalize"), rescale=p.get("rescale"), lam=p.get("lambda", 1.0),
                            seed=int(p.get("seed", 0)))
    assert not torch.equal(want, anchor)
    for cut, starts in CUTS.items():
        for chunk in (None, 1000):  # the default chunk, and chunks that split the pieces
            got, _ = run_pieces(method, "model.layers.0.mlp.up_proj.weight", anchor, vectors, starts, params,
                                chunk=chunk, shuffle=len(starts), keep=keep)
            assert_same_bits(got, want, f"{method} cut {cut} chunk {chunk}")


def test_the_sign_election_and_the_drop_matter(bf16_trio):
    """The reference is not trivially met: TIES differs from plain weighted sums and from no drop."""
    base, chats, anchor = bf16_trio
    vectors = [(0.7, chats[0], base, 0.3), (0.5, chats[1], base, 0.6)]
    ties = sparse_reference("t", anchor, vectors, "ties")
    no_drop = sparse_reference("t", anchor, [(w, a, b, 1.0) for w, a, b, _ in vectors], "ties")
    linear = sparse_reference("t", anchor, vectors, "dare_linear", rescale=False)
    assert not torch.equal(ties, no_drop) and not torch.equal(ties, linear)
    d0, d1 = ((c.float() - base.float()) for c in chats[:2])
    assert ((d0 * d1) < 0).float().mean() > 0.3  # the signs disagree often


def test_dare_masks_follow_the_seed_and_the_name(bf16_trio):
    base, chats, anchor = bf16_trio
    vectors = [(1.0, chats[0], base, 0.5), (1.0, chats[1], base, 0.5)]
    a, _ = run_pieces("dare_linear", "x", anchor, vectors, CUTS["4097"], (("seed", 1),))
    b, _ = run_pieces("dare_linear", "x", anchor, vectors, CUTS["1000"], (("seed", 1),))
    c, _ = run_pieces("dare_linear", "x", anchor, vectors, [], (("seed", 2),))
    d, _ = run_pieces("dare_linear", "y", anchor, vectors, [], (("seed", 1),))
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert not torch.equal(a.view(torch.int16), c.view(torch.int16))
    assert not torch.equal(a.view(torch.int16), d.view(torch.int16))


def test_ties_thresholds_and_rescale_factors_do_not_depend_on_the_cut(bf16_trio):
    base, chats, anchor = bf16_trio
    vectors = [(0.7, chats[0], base, 0.3), (0.5, chats[1], base, 0.6)]
    seen = []
    for starts in CUTS.values():
        _, facts = run_pieces("ties", "t", anchor, vectors, starts, (("rescale", True),))
        seen.append([(f["k"], f["threshold"], f["factor"]) for f in facts])
    assert all(s == seen[0] for s in seen)
    assert [k for k, _, _ in seen[0]] == [int(0.3 * N), int(0.6 * N)]


def test_float32_ties_with_many_equal_magnitudes_and_both_signs():
    """Deltas of a few small integers (every magnitude tied hundreds of times), float32 throughout."""
    g = torch.Generator().manual_seed(3)
    n = 9_999
    base = torch.randn(n, generator=g)
    chats = [base + torch.randint(-4, 5, (n,), generator=g).float() for _ in range(2)]
    anchor = torch.randn(n, generator=g)
    for method, params in (("ties", ()), ("ties", (("rescale", True),)), ("dare_ties", ()), ("dare_linear", ())):
        vectors = [(0.6, chats[0], base, 0.25), (0.4, chats[1], base, 0.7)]
        p = dict(params)
        want = sparse_reference("f", anchor, vectors, method, rescale=p.get("rescale"))
        for starts in ([], list(range(333, n, 333)), [1, 4096, 4097, 9000]):
            for keep in (False, True):  # the ties each chunk keeps: from the L1 pass, or selected again
                got, _ = run_pieces(method, "f", anchor, vectors, starts, params, chunk=500, keep=keep)
                assert_same_bits(got, want, f"{method} {params} {len(starts)} cuts keep={keep}")


def test_stored_vectors_without_b():
    """apply's vectors: a stored float32 vector (no b), TIES on it."""
    g = torch.Generator().manual_seed(4)
    anchor = torch.randn(5000, generator=g).to(torch.bfloat16)
    vecs = [torch.randn(5000, generator=g) * 0.01, torch.randn(5000, generator=g) * 0.01]
    vectors = [(1.0, vecs[0], None, 0.4), (0.5, vecs[1], None, 0.1)]
    want = sparse_reference("v", anchor, vectors, "ties")
    for starts in ([], [2500], list(range(100, 5000, 700))):
        got, _ = run_pieces("ties", "v", anchor, vectors, starts)
        assert_same_bits(got, want, f"{len(starts)} cuts")


def test_passes_each_tensor_needs():
    def tensor(*densities, **params):
        return SimpleNamespace(terms=tuple(SimpleNamespace(density=d, limit=None) for d in densities),
                               params=tuple(params.items()))

    assert METHODS["ties"].passes_for(tensor(0.5, 1.0)) == ("magnitude-high", "magnitude-low", ELEMENTWISE)
    assert METHODS["ties"].passes_for(tensor(0.5, rescale=True)) == (
        "magnitude-high", "magnitude-low", "l1-norm", ELEMENTWISE)
    assert METHODS["ties"].passes_for(tensor(1.0, 1.0)) == (ELEMENTWISE,)  # nothing dropped: no statistics
    assert METHODS["ties"].passes_for(tensor(0.0, 1.0)) == (ELEMENTWISE,)  # everything dropped: none either
    assert METHODS["dare_ties"].passes_for(tensor(0.5)) == ("l1-norm", ELEMENTWISE)
    assert METHODS["dare_linear"].passes_for(tensor(0.5, rescale=False)) == (ELEMENTWISE,)
    assert METHODS["dare_linear"].passes_for(tensor(1.0)) == (ELEMENTWISE,)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_vectors_over_the_first_elements_only(bf16_trio, method):
    """An expanded vocabulary: the anchor has 600 more elements than the vectors; those keep the
    anchor's values, and the drop counts the shared elements alone (k of the vectors' own size)."""
    base, chats, anchor = bf16_trio
    g = torch.Generator().manual_seed(8)
    bigger = torch.cat([anchor.reshape(-1), (0.02 * torch.randn(600, generator=g)).to(torch.bfloat16)])
    vectors = [(0.7, chats[0].reshape(-1), base.reshape(-1), 0.3), (0.5, chats[1].reshape(-1), base.reshape(-1), 0.6)]
    want = torch.cat([sparse_reference("e", anchor.reshape(-1), vectors, method), bigger[N:]])
    for starts in ([], [N], list(range(1000, N + 600, 1000)), [4097, 8194, N - 1, N + 1]):
        for chunk in (None, 1000):
            got, facts = run_pieces(method, "e", bigger, vectors, starts, chunk=chunk)
            assert_same_bits(got, want, f"{len(starts)} cuts, chunk {chunk}")
    if method == "ties":
        assert [f["k"] for f in facts] == [int(0.3 * N), int(0.6 * N)]


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_nonfinite_deltas_follow_torch(method):
    """Infinities and NaNs among the deltas: a NaN magnitude ranks above +inf (torch's descending
    sort puts NaNs first), and the outputs are NaN, infinite or finite where the reference's are."""
    g = torch.Generator().manual_seed(9)
    n = 3000
    base = torch.randn(n, generator=g)
    chats = [base + torch.randn(n, generator=g) for _ in range(2)]
    chats[0][[5, 700, 2999]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    chats[1][[6, 700, 1500]] = torch.tensor([float("-inf"), float("nan"), float("inf")])
    anchor = torch.randn(n, generator=g)
    vectors = [(0.6, chats[0], base, 0.2), (0.4, chats[1], base, 0.5)]
    want = sparse_reference("nf", anchor, vectors, method, rescale=False)
    for starts in ([], [1, 700, 701, 2000]):
        got, _ = run_pieces(method, "nf", anchor, vectors, starts, (("rescale", False),), chunk=512)
        assert torch.equal(got.isnan(), want.isnan()), method
        assert torch.equal(torch.nan_to_num(got).view(torch.int32), torch.nan_to_num(want).view(torch.int32)), method
