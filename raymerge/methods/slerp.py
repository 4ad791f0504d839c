"""mergekit's SLERP: spherical interpolation between the base model (v0) and one other model (v1),
over each tensor as one vector, in float32 (mergekit 0.1.5, `merge_methods/slerp.py`):

    na = |v0|, nb = |v1|  (1 where not above 1e-8)
    dot = clamp(sum (v0 / na) * (v1 / nb), -1, 1)
    theta = acos(dot), unless |dot| > 0.9995: then linear (ca = 1 - t, cb = t)
    ca = sin((1 - t) * theta) / sin(theta),  cb = sin(t * theta) / sin(theta)
    out = round(ca * v0 + cb * v1)

Two statistics passes (docs/ARCHITECTURE.md: passes): `slerp-norms` sums v0**2 and v1**2, exactly,
and the driver takes the square roots, rounded once; `slerp-dot` sums the float32 products
(v0 / na) * (v1 / nb), each rounded as mergekit's, exactly, and the driver rounds the sum once,
then computes the coefficients with torch's float32 operations as mergekit does. mergekit's own
norms and sums are float reductions whose order depends on the tensor's size and the CPU: where
they round otherwise, the coefficients differ in their last bit (README: SLERP's exactness).

The recipe's term: a = v1, b = v0 (the base: the anchor and what the term would be taken minus,
which SLERP does not subtract). `t` is per tensor: a gradient over the layers, or filters.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raymerge.methods.base import Method, Operands, Parameter, Pass, mergekit_kind
from raymerge.methods.steps import bits, chunks, each_chunk, exact_sum, in_torch, is_narrow, total, value, widen_rows

NORMS, DOT = "slerp-norms", "slerp-dot"
_ROWS = "slerp-rows"
_EPS = np.float32(1e-8)  # mergekit's: a norm not above it divides by 1
DOT_THRESHOLD = 0.9995  # mergekit's: above it (in magnitude), interpolate linearly

T = Parameter("t", "where the result lies between the base model (0) and the other (1)", "weight", 0.5,
              per_vector=True, schedulable=True, mergekit="t", required=True)


class Slerp(Method):
    name = "slerp"
    torch_scalars = True  # reduce computes with torch, as mergekit does (steps.in_torch)
    wide_chunks = True  # a chunk's fused program and sums cost more in Python than in arithmetic
    parameters = (T,)
    statistics = (Pass(NORMS, 40, records=("na", "nb"), bits=("na", "nb")),
                  Pass(DOT, 41, records=("dot", "ca", "cb"), bits=("dot", "ca", "cb")))
    recipes = (mergekit_kind("slerp", single=True),)

    def statistic(self, kernel: Any, pass_name: str, operands: Operands, scratch: Any) -> list:
        if not operands.vectors:
            return []
        v = operands.vectors[0]
        sums = []
        f = operands.facts[v.term] if pass_name == DOT else None
        for lo, m in chunks(len(v.a), scratch):
            x, y = widen_rows(kernel, scratch, _ROWS, [v.b, v.a], lo, m)
            if pass_name == NORMS:  # the inputs' values, widened: narrow where they are BF16, F16 or FP8
                parts = [exact_sum(kernel, x, scratch, square=True, narrow=is_narrow(v.b)),
                         exact_sum(kernel, y, scratch, square=True, narrow=is_narrow(v.a))]
            else:
                kernel.divide(x, value(f["na"]), x)
                kernel.divide(y, value(f["nb"]), y)
                kernel.multiply(x, y, x)
                parts = [exact_sum(kernel, x, scratch)]
            sums = [a + b for a, b in zip(sums, parts)] if sums else parts
        out: list = [None] * (v.term + 1)
        out[v.term] = [s.to_json() for s in sums] if sums else None
        return out

    def reduce(self, pass_name: str, tensor: Any, results: list[tuple[int, list]], facts: Any) -> Any:
        facts = [dict(f) if f else {} for f in (facts or [{}] * len(tensor.terms))]
        for j, term in enumerate(tensor.terms):
            if not self.works_on(term):
                continue
            if pass_name == NORMS:
                norms = (total(results, j, i).sqrt_float32() for i in (0, 1))
                na, nb = (n if n > _EPS else np.float32(1) for n in norms)
                facts[j].update(na=bits(na), nb=bits(nb))
            else:
                dot = total(results, j, 0).to_float32()
                ca, cb = in_torch(coefficients, dot, term.param("t", T.default))
                facts[j].update(dot=bits(dot), ca=bits(ca), cb=bits(cb))
        return facts

    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        f = operands.facts[operands.vectors[0].term] if operands.vectors else None

        def rule(k: Any, x: Any, y: Any, work: Any) -> Any:
            """x = ca * x + cb * y, each operation rounded to float32 (mergekit's `coef_a * x + coef_b * y`)."""
            k.multiply(x, value(f["ca"]), x)
            k.multiply(y, value(f["cb"]), y)
            k.add(x, y, x)
            return x

        return each_chunk(kernel, out, operands, scratch, rule, 2)


def coefficients(dot: np.float32, t: float) -> tuple[np.float32, np.float32]:
    """SLERP's coefficients of v0 and v1 from the clamped dot product, with torch's float32 operations
    on one-element tensors, as mergekit computes them (torch's acos and sin, not numpy's, whose
    last bits can differ)."""
    import torch  # in_torch's process

    t = torch.tensor([[t]], dtype=torch.float64).to(torch.float32)
    d = torch.tensor([[float(dot)]], dtype=torch.float32).clamp(-1, 1)
    linear = d.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, d))
    sin_theta = torch.sin(theta)
    ca = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    cb = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return np.float32(ca.item()), np.float32(cb.item())
