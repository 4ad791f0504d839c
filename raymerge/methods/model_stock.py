"""mergekit's Model Stock (Jang et al.): the average of the models, pulled toward the base by how
much their changes from the base agree, over each tensor as one vector or each row of it
(`filter_wise`); every operation in the compute dtype, as mergekit 0.1.5
(`merge_methods/model_stock.py`) computes on tensors of that dtype:

    off_i = w_i - base (rounded)
    cos_ij = clamp(sum(off_i * off_j) / max(|off_i| * |off_j|, 1e-6), -1, 1)   for each pair i < j
    c = mean of the cos_ij;  t = k c / (1 + (k - 1) c)  (0 where that denominator is below 1e-6)
    out = t * (sum_i w_i / k) + (1 - t) * base

One statistics pass, `model-stock-sums`, sums exactly each |off_i|**2 and each pair's products
(rounded as mergekit's are), per vector (steps.row_sums: a piece rounds the rows it holds whole);
the driver rounds each sum once and computes t and 1 - t with torch on tensors of the compute dtype
shaped as mergekit's. mergekit reduces in float, in an order of its own: where that rounds
otherwise, a vector's t differs (README: exactness).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from raymerge.methods.base import Method, Operands, Parameter, Pass, mergekit_kind, param
from raymerge.methods.steps import (apply_rows, facts_problem, grouped_values, host_rows, in_torch, quiet,
                                    row_sums, step, tensor_bits, torch_dtype, vector_length, widen_rows)
from raymerge.ops.fused import fused

SUMS = "model-stock-sums"
_ROWS = "model-stock-rows"
_FILTER_WISE = Parameter("filter_wise", "one t per row of each tensor (off: per tensor)", "flag", False,
                         mergekit="filter_wise")


class ModelStock(Method):
    name = "model_stock"
    torch_scalars = True  # reduce computes with torch, as mergekit does (steps.in_torch)
    wide_chunks = True  # a chunk's fused program and sums cost more in Python than in arithmetic
    parameters = (_FILTER_WISE,)
    statistics = (Pass(SUMS, 60, records=("t", "u")),)
    recipes = (mergekit_kind("model_stock", at_least=2),)

    def facts_problem(self, tensor: Any, facts: Any, passes: list[str]) -> str | None:
        count = _groups(tensor.shape, tensor.params)[0]
        return facts_problem(facts, len(tensor.terms), {"t": count, "u": count} if passes else {})

    @quiet
    def statistic(self, kernel: Any, pass_name: str, operands: Operands, scratch: Any) -> list:
        """Per vector (row, steps.row_sums): |off_i|**2 for each model, then sum(off_i * off_j) for
        each pair i < j, the products rounded as mergekit's."""
        k = len(operands.vectors)
        if k < 2:
            return []
        pairs = list(itertools.combinations(range(k), 2))

        def quantities(at: int, m: int) -> list:
            with fused(kernel) as fk:  # one compiled loop where the steps can be
                off = _offsets(fk, operands, scratch, at, m, len(pairs))
                products = [operands.rounded(fk, step(fk.multiply, off[i], off[j], work))
                            for (i, j), work in zip(pairs, off[k:])]
            return off[:k] + products

        return row_sums(kernel, scratch, operands.begin, vector_length(operands), _groups(operands.shape, operands.params)[1],
                        (True,) * k + (False,) * len(pairs), quantities, operands.compute is not None)

    def reduce(self, pass_name: str, tensor: Any, results: list[tuple[int, list]], facts: Any) -> Any:
        k = len(tensor.terms)
        count = _groups(tensor.shape, tensor.params)[0]
        values = grouped_values(results, count, k + k * (k - 1) // 2, _finish(k))
        facts = [dict(f) if f else {} for f in (facts or [{}] * len(tensor.terms))]
        facts[0].update(in_torch(_coefficients, [v.tolist() for v in values], k,
                                 getattr(tensor, "compute", None), _shape(tensor)))
        return facts

    @quiet
    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        k = len(operands.vectors)
        if k < 2:  # fewer than mergekit's three inputs: the base, as it is
            return kernel.weighted_sum(out, operands.anchor, [], scratch)
        f = operands.facts[0]
        n = vector_length(operands)
        inputs = [operands.anchor, *(v.a for v in operands.vectors)]
        length = _groups(operands.shape, operands.params)[1]
        rows = (host_rows(f["t"]), host_rows(f["u"]))

        def rule(kern: Any, base: Any, *models: Any, coef: tuple) -> Any:
            """t * (sum(models) / k) + (1 - t) * base, each operation rounded as mergekit's."""
            avg = models[0]
            kern.add(avg, np.float32(0), avg)  # Python's sum starts at 0: -0.0 becomes +0.0
            for w in models[1:]:
                operands.rounded(kern, step(kern.add, avg, w, avg))
            operands.rounded(kern, step(kern.divide, avg, np.float32(k), avg))
            operands.rounded(kern, step(kern.multiply, avg, coef[0], avg))
            operands.rounded(kern, step(kern.multiply, base, coef[1], base))
            return step(kern.add, avg, base, avg)  # rounded once, to the output

        return apply_rows(kernel, out, operands, scratch, inputs, n, length, rows, _ROWS, rule)


def _offsets(kernel: Any, operands: Operands, scratch: Any, at: int, m: int, spare: int) -> list:
    """Each model's offset from the base at the piece's elements at .. at + m (rounded), then `spare`
    work rows."""
    vecs = operands.vectors
    rows = widen_rows(kernel, scratch, _ROWS, [vecs[0].b, *(v.a for v in vecs)], at, m, spare=spare)
    for x in rows[1:1 + len(vecs)]:
        operands.rounded(kernel, step(kernel.subtract, x, rows[0], x))
    return rows[1:]


def _groups(shape: tuple[int, ...], params) -> tuple[int, int]:
    """(how many vectors a tensor is, each one's length): one, or with filter_wise one per row."""
    n = math.prod(shape)
    length = shape[-1] if param(params, "filter_wise", False) and len(shape) >= 2 else n
    return (n // length if length else 1), max(length, 1)


def _shape(tensor: Any) -> tuple[int, ...]:
    """mergekit's shape of its per-vector statistics: (1,) per tensor; with filter_wise, the rows'."""
    if param(tensor.params, "filter_wise", False):
        return tuple(tensor.shape[:-1]) if len(tensor.shape) >= 2 else (1,)
    return ()


def _finish(k: int):
    """A vector's sums rounded: the first k are squares (a norm: its root), the rest sums."""
    return lambda i, s: s.sqrt_float32() if i < k else s.to_float32()


def _coefficients(values: list, k: int, compute: str | None, shape: tuple[int, ...]) -> dict:
    """t and 1 - t of each vector, with torch on tensors of the compute dtype and mergekit's shape."""
    import torch

    dtype = torch_dtype(compute)

    def tensor(x: list) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.float32).to(dtype).reshape(shape)

    norms = [tensor(values[i]) for i in range(k)]
    cos = []
    for p, (i, j) in enumerate(itertools.combinations(range(k), 2)):
        product = norms[i] * norms[j]
        cos.append((tensor(values[k + p]) / product.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (k - 1) * c
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(c), (k * c) / safe)
    return {"t": tensor_bits(t), "u": tensor_bits(1 - t)}
