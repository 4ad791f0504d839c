"""Every method in the registry gives the same bits on the torch kernel (its device steps on the
CPU) as on the numpy kernel: outputs byte for byte, NaN payloads included, the non-finite counts,
and every statistics pass's results and facts; and the same bits however a tensor is cut. Driven
as the worker and the driver drive a method: a tensor cut into pieces, each statistics pass's
per-piece results reduced with `Method.reduce`, then every piece applied. Plus FP8 inputs (torch
only) for the sparsifying methods, against a float32 reference in mergekit's order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raymerge.methods import METHODS, Operands, Vector
from raymerge.ops.numpy_kernel import NUMPY
from raymerge.ops.torch_kernel import TorchKernel
from raymerge.planning.plan import TensorPlan, Term
from tests.methods.test_sparse_methods import assert_same_bits, sparse_reference

TORCH = TorchKernel("cpu")
N = 2_500
RAW = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32, "F64": np.uint64}
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
SPECIAL = {  # NaNs (quiet, signalling, payloads, both signs), infinities, subnormals, zeros
    "BF16": [0x7FC0, 0xFFC0, 0x7F81, 0xFF81, 0x7FA5, 0xFFFF, 0x7F80, 0xFF80, 0x0001, 0x8001, 0x0000, 0x8000],
    "F16": [0x7E00, 0xFE00, 0x7C01, 0xFC01, 0x7D55, 0xFFFF, 0x7C00, 0xFC00, 0x0001, 0x83FF, 0x0000, 0x8000],
    "F32": [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FA5A5A5, 0xFFFFFFFF, 0x7F800000, 0xFF800000,
            0x00000001, 0x807FFFFF, 0x00000000, 0x80000000],
    "F64": [0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001, 0x7FF4A5A5A5A5A5A5, 0xFFFFFFFFFFFFFFFF,
            0x7FF0000000000000, 0xFFF0000000000000, 0x0000000000000001, 0x36A0000000000000, 0x0000000000000000,
            0x8000000000000000],  # 0x36A0...: a float32 subnormal
}
CUTS = ([], [1, 700, 701, 1999], [1250])  # the first elements of the pieces after the first
ROWS = (25, 100)  # the shape of a method's tensors whose pieces hold whole rows (Method.whole_rows)
ROW_CUTS = ([], [100, 700, 800, 2000], [1200])


def raw_values(dtype: str, n: int, rng: np.random.Generator, special: float) -> np.ndarray:
    """n raw values of dtype: a few repeated values (equal magnitudes: ties at any threshold) and
    weight-like normals, with NaNs, infinities, zeros and subnormals spread among them."""
    x = np.where(rng.random(n) < 0.5, rng.choice(np.float32([0.5, -0.25, 0.125, 1.5]), n),
                 rng.standard_normal(n).astype(np.float32))
    raw = {"BF16": lambda: (x.view(np.uint32) >> 16).astype(np.uint16),
           "F16": lambda: x.astype(np.float16).view(np.uint16),
           "F32": lambda: x.view(np.uint32).copy(),
           "F64": lambda: x.astype(np.float64).view(np.uint64)}[dtype]()
    where = rng.random(n) < special
    raw[where] = rng.choice(np.array(SPECIAL[dtype], RAW[dtype]), int(where.sum()))
    return raw


def tensor_plan(method: str, dtype: str, anchor: bool, terms: list, params: tuple, n: int = N,
                compute: str | None = None) -> TensorPlan:
    """The plan of one tensor of n elements (ROWS for a method that needs whole rows): terms as
    (scale, has b, density, limit)."""
    shape = ROWS if METHODS[method].whole_rows and n == N else (n,)
    return TensorPlan("model.layers.3.mlp.up_proj.weight", dtype, shape, 0, 0, 0, None if not anchor else "cp",
                      tuple(Term(s, None, None, limit, (("density", d),)) for s, _, d, limit in terms),
                      method=method, params=params, compute=compute)


def run(kernel, t: TensorPlan, raw: dict, cuts: list[int], chunk: int | None):
    """(output bytes, summed Sums, every statistics pass's results and facts) of tensor t computed
    piece by piece with `kernel`; `raw` holds the inputs' bytes, `cuts` where pieces begin."""
    m = METHODS[t.method]
    n = math.prod(t.shape)
    bounds = [0, *cuts, n]
    size = ITEMSIZE[t.dtype]
    out = bytearray(n * size)
    scratch = kernel.scratch(chunk)

    def view(key, lo, hi):
        return kernel.view(memoryview(raw[key])[lo * size:hi * size], t.dtype)

    def operands(lo: int, hi: int, facts) -> Operands:
        vecs = []
        for j, term in enumerate(t.terms):
            end = hi if term.limit is None else min(hi, term.limit)
            if lo < end:  # a term past its limit has no operands in this piece
                b = view(("b", j), lo, end) if ("b", j) in raw else None
                vecs.append(Vector(term.scale, view(("a", j), lo, end), b, term=j, values=term.values))
        anchor = view("anchor", lo, hi) if "anchor" in raw else None
        return Operands(anchor, tuple(vecs), t.params, t.name, lo, facts, t.compute, t.shape)

    facts, seen = None, []
    for p in m.passes_for(t)[:-1]:
        if not m.needs(p, facts):
            continue  # as the driver skips it (an iterative method's, converged)
        results = [(lo, m.statistic(kernel, p, operands(lo, hi, facts), scratch))
                   for lo, hi in zip(bounds, bounds[1:])]
        facts = m.reduce(p, t, results[::-1], facts)  # in any order
        seen.append((p, results, facts))
    total = [0.0, 0.0, 0, 0]
    for lo, hi in zip(bounds, bounds[1:]):
        s = m.apply(kernel, kernel.view(memoryview(out)[lo * size:hi * size], t.dtype), operands(lo, hi, facts),
                    scratch)
        total = [x + y for x, y in zip(total, s)]
    return bytes(out), total, seen


def cases():
    """(method, dtype, has an anchor, terms as (scale, has b, density, limit), params, compute dtype) for
    every method in the registry, every dtype, each of its recipe kinds' shapes, its defaults and other
    values of its global parameters; for BF16 and F16, computing at that dtype too (mergekit's)."""
    for name, m in METHODS.items():
        other = tuple((p.name, p.other()) for p in m.parameters if not p.per_vector)
        shapes = {(r.anchor is not None, r.minus is not None) for r in m.recipes}
        for dtype in RAW:
            for anchor, minus in sorted(shapes):
                for params in ((), other):
                    # With other parameters, an expanded vocabulary: the vectors cover the anchor's first rows
                    # (the planner gives every term of a tensor one limit).
                    limit = N - 600 if anchor and params else None
                    terms = [(0.7, minus, 0.3, limit), (-0.4, minus, 1.0, limit), (1.3, minus, 0.0, limit),
                             (0.5, minus, 0.3, limit)]
                    counts = (1,) if any(r.single for r in m.recipes) else (4, 2)  # and fewer vectors
                    for compute in (None, dtype) if dtype in ("BF16", "F16") else (None,):
                        for count in counts:
                            yield name, dtype, anchor, terms[:count], params, compute


@pytest.mark.parametrize("method", list(METHODS))
def test_the_torch_kernel_gives_the_numpy_kernels_bits(method):
    rng = np.random.default_rng(sum(map(ord, method)))
    count = 0
    # Each case meets each proportion of special values in one of the three cuts, the pairing turning
    # from case to case: every (proportion, cut) pair over a method's cases, a third of the runs.
    specials = (0.0, 0.03, 0.4)  # no NaN; a few; so many that TIES thresholds are NaN magnitudes
    cut_sets = list(zip(ROW_CUTS if METHODS[method].whole_rows else CUTS, (None, 256, 333)))
    for case, (name, dtype, anchor, terms, params, compute) in enumerate(c for c in cases() if c[0] == method):
        t = tensor_plan(name, dtype, anchor, terms, params, compute=compute)
        for s, special in enumerate(specials):
            raw = {("a", j): raw_values(dtype, N, rng, special) for j in range(len(terms))}
            for j, (_, minus, _, _) in enumerate(terms):
                if minus:  # NaNs of b meet NaNs of a at some elements
                    raw[("b", j)] = raw_values(dtype, N, rng, special)
            if anchor:
                raw["anchor"] = raw_values(dtype, N, rng, special)
            raw = {k: bytes(v.tobytes()) for k, v in raw.items()}
            whole = run(NUMPY, t, raw, [], None)[0]
            for cuts, chunk in [cut_sets[(s + case) % len(cut_sets)]]:
                want, ws, wstats = run(NUMPY, t, raw, cuts, chunk)
                got, gs, gstats = run(TORCH, t, raw, cuts, chunk)
                what = f"{name} {dtype} at {compute} anchor={anchor} {len(terms)} terms {params} special={special} " \
                    f"cuts={cuts}"
                assert want == whole, f"{what}: the cut into pieces and chunks changes the numpy kernel's bits"
                if got != want:
                    g, w = np.frombuffer(got, RAW[dtype]), np.frombuffer(want, RAW[dtype])
                    i = np.flatnonzero(g != w)
                    raise AssertionError(f"{what}: {i.size} elements differ, first at {i[0]}: {g[i[0]]:#x} != "
                                         f"{w[i[0]]:#x}")
                assert gs[2:] == ws[2:], what  # the non-finite counts
                for x, y in zip(gs[:2], ws[:2]):  # sums of squares: float32 sums, up to the order of summation
                    assert (math.isnan(x) and math.isnan(y)) or x == y or abs(x - y) <= 1e-5 * max(abs(x), abs(y))
                assert gstats == wstats, what  # statistics results and facts
                count += 1
    assert count >= 2 * len(RAW) * len(specials)


def test_nan_thresholds_and_nans_made_inside_the_sparse_arithmetic():
    """The cases above reach what they are meant to: TIES thresholds among NaN magnitudes, and
    NaNs that the sparse arithmetic makes from numbers (inf * 0 of a dropped infinity, inf - inf)."""
    rng = np.random.default_rng(5)
    t = tensor_plan("ties", "F32", True, [(0.7, True, 0.3, None), (0.4, True, 0.3, None)], ())
    raw = {k: raw_values("F32", N, rng, 0.4).tobytes() for k in ("anchor", ("a", 0), ("b", 0), ("a", 1), ("b", 1))}
    out, _, stats = run(NUMPY, t, raw, [], None)
    facts = stats[-1][2]
    assert all(f["threshold"] == 0x7F800001 for f in facts)  # every NaN has the one NaN magnitude
    bits = np.frombuffer(out, np.uint32)
    nans = bits[np.isnan(bits.view(np.float32))]
    assert 0xFFC00000 in nans and len(set(nans.tolist())) > 2  # made from numbers, and inputs' payloads
    assert run(TORCH, t, raw, [], None)[0] == out


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_fp8_inputs_follow_the_mergekit_order_reference(method, dtype):
    """FP8 has no numpy type: the torch kernel computes it, on the CPU, and gives the float32
    reference's bits (widening FP8 is exact; both round the result with torch's conversion)."""
    g = torch.Generator().manual_seed(2)
    n = 3_000
    base = (0.5 * torch.randn(n, generator=g)).to(dtype)
    chats = [(base.float() + 0.25 * torch.randn(n, generator=g)).to(dtype) for _ in range(2)]
    anchor = (base.float() + 0.25 * torch.randn(n, generator=g)).to(dtype)
    vectors = [(0.7, chats[0], base, 0.3), (0.5, chats[1], base, 0.6)]
    name = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}[dtype]
    t = tensor_plan(method, name, True, [(w, True, d, None) for w, _, _, d in vectors], (), n)
    want = sparse_reference(t.name, anchor, vectors, method)
    raw = {"anchor": anchor, ("a", 0): chats[0], ("b", 0): base, ("a", 1): chats[1], ("b", 1): base}
    raw = {k: v.view(torch.uint8).numpy().tobytes() for k, v in raw.items()}
    for cuts in ([], [1, 999, 2000]):
        out, sums, _ = run(TORCH, t, raw, cuts, 512)
        got = torch.frombuffer(bytearray(out), dtype=dtype)
        assert_same_bits(got, want, f"{method} {name} cuts {cuts}")
        assert sums[2:] == [0, 0]

