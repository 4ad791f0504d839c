"""mergekit's Reinforced Agent Merging (`ram`, `ramplus_tl`; mergekit 0.1.5 `merge_methods/ram.py`),
in its operations' order, each rounded to the compute dtype where mergekit's torch operation on
tensors of that dtype is:

    d_i = m_i - base;  nz_i = |d_i| > epsilon (epsilon in the compute dtype);  c = sum_i nz_i
    unique = c == 1;  overlap = c > 1;  z_i = d_i * nz_i
    ram:         out = base + sum_i (z_i * unique + z_i * overlap / max(c, 1))
    ramplus_tl:  out = base + sum_i (z_i * unique * lambda_i + z_i * overlap / max(c, 1))
                 lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha), float32

shared_i and unique_i count model i's elements above epsilon where others are too, or it alone
is: one statistics pass, `ram-counts`, exact integer counts summed by the driver. lambda_i is a
float32 tensor in mergekit, so its products, the sum over the models and the result are float32
whatever the compute dtype (torch promotes): `result_float32`. The sums over the models are
float32, rounded once to the compute dtype (torch's sum(0)) where mergekit's are in it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raymerge.methods.base import Method, Operands, Parameter, Pass, mergekit_kind
from raymerge.methods.steps import (apply_chunks, bits, chunks, facts_problem, quiet, step, value, vector_length,
                                    widen_rows)
from raymerge.ops.kernel import round_scalar

COUNTS = "ram-counts"
_ROWS = "ram-rows"

_EPSILON = Parameter("ram_epsilon", "a change of at most this magnitude counts as none (ram)", "number", 1e-5,
                     mergekit="epsilon")
_R = Parameter("ram_r", "how much a model's unique changes are reinforced (ramplus_tl)", "number", 0.1, mergekit="r")
_ALPHA = Parameter("ram_alpha", "the largest shared-to-unique ratio reinforcing (ramplus_tl)", "number", 0.2,
                   mergekit="alpha")


class Ram(Method):
    """Each element's changes above epsilon: a model's alone kept whole, several averaged."""

    name = "ram"
    parameters = (_EPSILON,)
    recipes = (mergekit_kind("ram"),)
    reinforced = False

    @quiet
    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        lams = [value(x) for x in ((operands.facts or [None])[0] or {}).get("lam", [])]
        return apply_chunks(kernel, out, operands, scratch, _inputs(operands),
                            lambda k, at, m, xs: _Chunk(k, operands, scratch, at, m, xs, self).result(lams))

    def epsilon(self, operands: Operands) -> np.float32:
        """epsilon in the compute dtype: torch compares a tensor with a number in the tensor's dtype."""
        return round_scalar(self.value(operands, "ram_epsilon"), operands.compute)


class RamplusTl(Ram):
    """ram, each model's unique changes reinforced by how many of its changes others share."""

    name = "ramplus_tl"
    parameters = (_EPSILON, _R, _ALPHA)
    statistics = (Pass(COUNTS, 80, records=("shared", "unique", "lam")),)
    recipes = (mergekit_kind("ramplus_tl"),)
    reinforced = True
    result_float32 = True

    def passes_for(self, tensor: Any) -> tuple[str, ...]:
        return super().passes_for(tensor) if tensor.terms else ("elementwise",)

    def facts_problem(self, tensor: Any, facts: Any, passes: list[str]) -> str | None:
        k = len(tensor.terms)
        return facts_problem(facts, k, {"shared": k, "unique": k, "lam": k}) if passes else None

    @quiet
    def statistic(self, kernel: Any, pass_name: str, operands: Operands, scratch: Any) -> list:
        k = len(operands.vectors)
        shared, unique = [0] * k, [0] * k
        for at, m in chunks(vector_length(operands), scratch):
            c = _Chunk(kernel, operands, scratch, at, m, (), self)
            one, many = c.masks()
            for i, nz in enumerate(c.nonzero):
                shared[i] += int(np.count_nonzero(kernel.to_host(step(kernel.multiply, nz, many, c.work), scratch)))
                unique[i] += int(np.count_nonzero(kernel.to_host(step(kernel.multiply, nz, one, c.work), scratch)))
        return [[shared, unique]] if k else []

    def reduce(self, pass_name: str, tensor: Any, results: list[tuple[int, list]], facts: Any) -> Any:
        k = len(tensor.terms)
        shared, unique = [0] * k, [0] * k
        for _, r in results:
            if r:
                shared = [a + b for a, b in zip(shared, r[0][0])]
                unique = [a + b for a, b in zip(unique, r[0][1])]
        p = dict(tensor.params)
        eps, r, alpha = (np.float32(p.get(n.name, n.default)) for n in (_EPSILON, _R, _ALPHA))
        lam = []
        with np.errstate(all="ignore"):  # float32 as torch computes it: counts as float32, clamps, then r
            for s, u in zip(shared, unique):
                rho = np.float32(s) / (np.float32(u) if u else eps)  # unique.clamp(min=epsilon): float32
                lam.append(bits(np.float32(1) + r * min(max(rho, np.float32(0)), alpha)))
        return [{"shared": shared, "unique": unique, "lam": lam}] + [None] * (k - 1)


class _Chunk:
    """One chunk's deltas, their masks above epsilon and the result (module doc), every step rounded
    to the compute dtype where mergekit's is. `given`: the inputs already widened (a NaN replay's)."""

    def __init__(self, kernel: Any, operands: Operands, scratch: Any, at: int, m: int, given: tuple,
                 method: Ram) -> None:
        self.k, self.o = kernel, operands
        count = len(operands.vectors)
        if given:
            rows = list(given) + [np.empty(len(given[0]), np.float32) for _ in range(count + 4)]
        else:
            rows = widen_rows(kernel, scratch, _ROWS, _inputs(operands), at, m, spare=count + 4)
        self.deltas, self.base = rows[:count], rows[count]
        self.nonzero = rows[count + 1:2 * count + 1]
        self.count, self.acc, self.work, self.other = rows[2 * count + 1:]
        eps = method.epsilon(operands)
        kernel.fill(self.count, 0)
        for d, nz in zip(self.deltas, self.nonzero):
            operands.rounded(kernel, step(kernel.subtract, d, self.base, d))
            kernel.absolute(d, self.work)
            kernel.greater(self.work, eps, nz)  # 1.0 where above epsilon (never for a NaN)
            kernel.add(self.count, nz, self.count)  # whole numbers: exact

    def masks(self) -> tuple[Any, Any]:
        """unique (c == 1) in work's neighbour `other`, overlap (c > 1) in acc: 1.0 or 0.0."""
        self.k.equal(self.count, np.float32(1), self.other)
        self.k.greater(self.count, np.float32(1), self.acc)
        return self.other, self.acc

    def result(self, lams: list) -> Any:
        k, rnd = self.k, self.o.rounded
        one, many = self.masks()
        for d, nz in zip(self.deltas, self.nonzero):
            k.multiply(d, nz, d)  # z_i: times 1.0 or 0.0, exact
        k.maximum(self.count, np.float32(1), self.count)  # the divisor, max(c, 1)
        total = self.nonzero[0]  # the masks are spent: the sum over the models goes there
        k.fill(total, 0)  # torch's sum starts at +0.0: of terms that are all -0.0 it gives +0.0
        for i, d in enumerate(self.deltas):
            k.multiply(d, many, self.work)
            rnd(k, step(k.divide, self.work, self.count, self.work))  # z_i * overlap / max(c, 1)
            k.multiply(d, one, d)  # z_i * unique
            if lams:  # ramplus_tl: a float32 product, and float32 from here on
                k.multiply(d, lams[i], d)
                k.add(d, self.work, d)
            else:
                rnd(k, step(k.add, d, self.work, d))
            k.add(total, d, total)
        if not lams:
            rnd(k, total)
        return step(k.add, total, self.base, total)


def _inputs(operands: Operands) -> list:
    """The models, then the base each is taken minus."""
    vecs = operands.vectors
    return [v.a for v in vecs] + ([vecs[0].b] if vecs else [])
