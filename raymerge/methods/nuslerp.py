"""mergekit's NuSLERP: spherical interpolation of two models (or of their changes from a base), at
t = w1 / (w0 + w1) of their weights (0.5 where the sum is below 1e-6), over each tensor as one
vector (`nuslerp_flatten`, the default) or each row of it (`nuslerp_flatten: false`), in the
compute dtype: unlike slerp, mergekit 0.1.5 (`merge_methods/nuslerp.py`) makes every operation on
tensors of that dtype, so each is rounded to it here (`Operands.rounded`):

    v_i = m_i - base (rounded), or m_i without a base
    n_i = max(|v_i|, 1e-7)               per vector (a norm: an exact sum, rounded once)
    cos = clamp(sum (v0/n0) * (v1/n1), -1, 1)
    colinear: 1 - cos**2 <= 1e-16 -> (1 - t) * v0 + t * v1
    else (sin((1 - t) theta) * v0 + sin(t theta) * v1) / sin(theta), theta = acos(cos)
    out = base + that (or that)

Statistics passes: `nuslerp-norms` (sums of v_i**2) and `nuslerp-cos` (sums of the rounded
products). A piece reduces the rows it holds whole itself (their sums are complete: it sends their
rounded values); the driver adds the parts of the rows that cross pieces, rounds, and computes the
coefficients with torch on tensors of the compute dtype shaped as mergekit's are, so its acos and
sin take the same code path. `nuslerp_row_wise` (vectors along the first dimension: a column's
elements lie in every piece) is refused.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from raymerge.methods.base import SCALE, Method, Operands, Parameter, Pass, mergekit_kind, param
from raymerge.methods.steps import (apply_rows, bits, facts_problem, grouped_values, host_rows, in_torch, per_row,
                                    quiet, row_sums, step, tensor_bits, torch_dtype, value, widen_rows)
from raymerge.ops.fused import discard, fused
from raymerge.ops.kernel import round_scalar
from raymerge.ops.numpy_kernel import NUMPY

NORMS, COS = "nuslerp-norms", "nuslerp-cos"
_ROWS = "nuslerp-rows"
_NORM_FLOOR = np.float32(1e-7)  # mergekit's _normalize: a norm is at least this

_ROW_WISE = Parameter("nuslerp_row_wise", "interpolate each column's vector (the first dimension) instead", "flag",
                      False, mergekit="nuslerp_row_wise")
_FLATTEN = Parameter("nuslerp_flatten", "interpolate each tensor as one vector (off: each row of it)", "flag", True,
                     mergekit="nuslerp_flatten")


class Nuslerp(Method):
    name = "nuslerp"
    torch_scalars = True  # reduce computes with torch, as mergekit does (steps.in_torch)
    wide_chunks = True  # a chunk's fused program and sums cost more in Python than in arithmetic
    parameters = (SCALE, _ROW_WISE, _FLATTEN)
    statistics = (Pass(NORMS, 50, records=("n0", "n1")), Pass(COS, 51, records=("sa", "sb", "st", "colinear",
                                                                                  "ta", "tb")))
    recipes = (mergekit_kind("nuslerp", anchor_optional=True, count=2),)

    def refuses(self, params: dict[str, Any]) -> str | None:
        # Flattened (the default), row_wise changes nothing: mergekit flattens first.
        if params.get("nuslerp_row_wise") and not params.get("nuslerp_flatten", _FLATTEN.default):
            return ("nuslerp_row_wise: true (vectors along the first dimension, with nuslerp_flatten: false) is not "
                    "supported: raymerge runs nuslerp flattened (the default) or row by row (nuslerp_flatten: false)")
        return None

    def facts_problem(self, tensor: Any, facts: Any, passes: list[str]) -> str | None:
        groups = _groups(tensor.shape, tensor.params)[0]
        wanted = {NORMS: {"n0": groups, "n1": groups},
                  COS: {"sa": groups, "sb": groups, "st": groups, "colinear": groups, "ta": 0, "tb": 0}}
        return facts_problem(facts, len(tensor.terms), {k: n for p in passes for k, n in wanted[p].items()})

    # --- statistics ------------------------------------------------------------------------------

    @quiet
    def statistic(self, kernel: Any, pass_name: str, operands: Operands, scratch: Any) -> list:
        """Per vector (row) of the piece, its sums (steps.row_sums): `nuslerp-norms` the squares of
        both vectors, `nuslerp-cos` the rounded products of their units."""
        if len(operands.vectors) < 2:
            return []
        length = _groups(operands.shape, operands.params)[1]
        if pass_name == NORMS:
            def quantities(at: int, m: int) -> list:
                with fused(kernel) as k:
                    return _deltas(k, operands, scratch, at, m)
        else:
            f = operands.facts[0]
            norms = [host_rows(f["n0"]), host_rows(f["n1"])]

            def quantities(at: int, m: int) -> list:
                n = [per_row(kernel, scratch, f"nuslerp-n{i}", operands.begin + at, m, length, norms[i])
                     for i in range(2)]  # each row's norm
                with fused(kernel) as k:
                    units = _deltas(k, operands, scratch, at, m)
                    for v, norm in zip(units, n):
                        operands.rounded(k, step(k.divide, v, norm, v))
                    discard(k, units[1])  # the product alone is summed
                    return [operands.rounded(k, step(k.multiply, units[0], units[1], units[0]))]
        return row_sums(kernel, scratch, operands.begin, _length(operands), length,
                        (True, True) if pass_name == NORMS else (False,), quantities, operands.compute is not None)

    def reduce(self, pass_name: str, tensor: Any, results: list[tuple[int, list]], facts: Any) -> Any:
        count = _groups(tensor.shape, tensor.params)[0]
        values = grouped_values(results, count, 2 if pass_name == NORMS else 1, _finish(pass_name))
        facts = [dict(f) if f else {} for f in (facts or [{}] * len(tensor.terms))]
        compute = getattr(tensor, "compute", None)
        if pass_name == NORMS:
            for i, name in enumerate(("n0", "n1")):
                facts[0][name] = _norms(values[i], compute)
        else:
            facts[0].update(in_torch(_coefficients, values[0].tolist(), _t(tensor), compute,
                                     _shape(tensor, count)))
        return facts

    # --- the elementwise rule ------------------------------------------------------------------

    @quiet
    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        if len(operands.vectors) < 2:  # past the models' rows: the base's (zeros without one)
            return kernel.weighted_sum(out, operands.anchor, [], scratch)
        f = operands.facts[0]
        length = _groups(operands.shape, operands.params)[1]
        ta, tb = value(f["ta"]), value(f["tb"])
        n = _length(operands)
        a, b = operands.vectors[:2]
        inputs = [a.a, b.a] + ([a.b] if a.b is not None else [])  # the models, and the base (also the anchor)
        # Per row: the coefficients of v0 and v1 and the divisor (1 where colinear: x / 1 is x).
        colinear = np.asarray(f["colinear"], bool)
        rows = (np.where(colinear, ta, host_rows(f["sa"])).astype(np.float32),
                np.where(colinear, tb, host_rows(f["sb"])).astype(np.float32),
                np.where(colinear, np.float32(1), host_rows(f["st"])).astype(np.float32))

        def rule(k: Any, m0: Any, m1: Any, base: Any = None, *, coef: tuple) -> Any:
            """mergekit's result, each operation rounded to the compute dtype: into m0."""
            for v in (m0, m1) if base is not None else ():
                operands.rounded(k, step(k.subtract, v, base, v))
            operands.rounded(k, step(k.multiply, m0, coef[0], m0))
            operands.rounded(k, step(k.multiply, m1, coef[1], m1))
            operands.rounded(k, step(k.add, m0, m1, m0))
            operands.rounded(k, step(k.divide, m0, coef[2], m0))
            return m0 if base is None else step(k.add, base, m0, m0)  # rounded once, to the output

        return apply_rows(kernel, out, operands, scratch, inputs, n, length, rows, _ROWS, rule)


def _deltas(kernel: Any, operands: Operands, scratch: Any, at: int, m: int) -> list:
    """The two vectors at the piece's elements at .. at + m, widened: m_i - base (rounded), or m_i."""
    a, b = operands.vectors[:2]
    base = a.b
    arrays = [a.a, b.a] + ([base] if base is not None else [])
    rows = widen_rows(kernel, scratch, _ROWS, arrays, at, m)
    if base is not None:
        for v in rows[:2]:
            kernel.subtract(v, rows[2], v)
            operands.rounded(kernel, v)
        discard(kernel, rows[2])  # read by the subtractions alone
    return rows[:2]


def _length(operands: Operands) -> int:
    return min(len(v.a) for v in operands.vectors[:2])


def _groups(shape: tuple[int, ...], params) -> tuple[int, int]:
    """(how many vectors a tensor is, each one's length): one, or one per row (the last dimension)."""
    n = math.prod(shape)
    flatten = bool(param(params, "nuslerp_flatten", _FLATTEN.default))
    length = n if flatten or len(shape) < 2 else shape[-1]
    return (n // length if length else 1), max(length, 1)


def _finish(pass_name: str):
    """How a vector's exact sum is rounded: a norm's square root, or the sum itself."""
    return (lambda i, s: s.sqrt_float32()) if pass_name == NORMS else (lambda i, s: s.to_float32())


def _shape(tensor: Any, count: int) -> tuple[int, ...]:
    """The shape of mergekit's per-vector statistics: (1,) flattened, else the tensor's but its last
    dimension, then 1 (keepdim)."""
    flatten = bool(param(tensor.params, "nuslerp_flatten", _FLATTEN.default))
    return (1,) if flatten or len(tensor.shape) < 2 else (*tensor.shape[:-1], 1)


def _t(tensor: Any) -> float:
    """mergekit's t, in Python floats: w1 / (w0 + w1), 0.5 where the sum is below 1e-6."""
    w0, w1 = (t.scale for t in tensor.terms[:2])
    return 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)


def _norms(values: np.ndarray, compute: str | None) -> list[int]:
    """Norms (rounded once to float32) in the compute dtype, then clamped to at least 1e-7 there
    (mergekit's torch clamp: the floor rounded to the dtype): bits. Without torch, so that the
    driver does not wait for the torch actor (tests/methods/test_geometric.py), but where a norm is
    a NaN, whose bits torch's clamp makes its own."""
    x = np.array(values, np.float32)
    if np.isnan(x).any():
        return in_torch(_torch_norms, x.tolist(), compute)
    if compute is not None:
        NUMPY.round_to(x, compute)
    floor = round_scalar(_NORM_FLOOR, compute)
    return np.where(x < floor, floor, x).view(np.uint32).tolist()


def _torch_norms(values: list[float], compute: str | None) -> list[int]:
    """`_norms` with torch's own steps."""
    import torch

    n = torch.tensor(values, dtype=torch.float32).to(torch_dtype(compute))
    return tensor_bits(n.clamp(min=float(_NORM_FLOOR)))


def _coefficients(cos: list, t: float, compute: str | None, shape: tuple[int, ...]) -> dict:
    """mergekit's coefficients from each vector's cos, with torch on tensors of the compute dtype and
    of mergekit's shape (the same code path, so the same bits): sin((1-t) theta), sin(t theta),
    sin(theta), colinear; and 1 - t and t as its scalar products take them (float32)."""
    import torch

    dtype = torch_dtype(compute)
    c = torch.tensor(cos, dtype=torch.float32).to(dtype).reshape(shape).clamp(-1, 1)
    colinear = (1 - c.square()) <= 1e-8 ** 2
    theta = torch.acos(torch.where(colinear, 0, c))
    out = {"sa": torch.sin((1 - t) * theta), "sb": torch.sin(t * theta), "st": torch.sin(theta)}
    facts = {k: tensor_bits(v) for k, v in out.items()}
    facts["colinear"] = [int(x) for x in colinear.reshape(-1).tolist()]
    facts["ta"], facts["tb"] = bits(np.float32(1 - t)), bits(np.float32(t))
    return facts
