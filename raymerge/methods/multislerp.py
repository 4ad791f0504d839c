"""mergekit's Multi-SLERP: barycentric interpolation of several models (or their changes from a
base) on the hypersphere, over each tensor as one vector, every operation in the compute dtype as
mergekit 0.1.5 (`merge_methods/multislerp.py`) computes on tensors of that dtype:

    d_i = m_i - base (rounded), or m_i;  w = weights (over their sum with normalize_weights)
    n_i = |d_i|;  u_i = d_i / (n_i + eps)
    mean = sum_i u_i w_i;  m = mean / |mean|
    tangent = sum_i (u_i - (u_i . m) m) w_i;  tn = |tangent| + eps
    out = (m cos(tn) + tangent (sin(tn) / tn)) * sum_i n_i w_i  (+ base)

Each whole-tensor reduction is a statistics pass, exact and rounded once (to float32, then the
compute dtype): `multislerp-norms` (|d_i|), `multislerp-mean` (|mean|), `multislerp-dots` (u_i . m)
and `multislerp-tangent` (|tangent|). A pass computes every element's u_i, mean and tangent again
from the inputs (a worker keeps no tensor); the driver makes the scalars with torch on tensors of
the compute dtype, as mergekit's are. Sums over the models are float32, rounded once (torch's
`sum(0)`). One model: that model, as mergekit returns it. A mean of norm below eps: with two
models their weighted sum (mergekit's fallback); with more, refused as mergekit refuses it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raymerge.errors import PlanError
from raymerge.methods.base import SCALE, Method, Operands, Parameter, Pass, mergekit_kind
from raymerge.methods.steps import (add_sum, apply_chunks, chunks, facts_problem, in_torch, quiet, step,
                                    tensor_bits, torch_dtype, total, value, vector_length, widen_rows)
from raymerge.ops.exact import Lanes
from raymerge.ops.fused import discard, fused

NORMS, MEAN, DOTS, TANGENT = "multislerp-norms", "multislerp-mean", "multislerp-dots", "multislerp-tangent"
_ROWS = "multislerp-rows"

_NORMALIZE_WEIGHTS = Parameter("normalize_weights", "divide the weights by their sum", "flag", True,
                               mergekit="normalize_weights")
_EPS = Parameter("eps", "added to norms before dividing by them", "number", 1e-8, mergekit="eps")


class Multislerp(Method):
    name = "multislerp"
    torch_scalars = True  # reduce computes with torch, as mergekit does (steps.in_torch)
    wide_chunks = True  # a chunk's fused program and sums cost more in Python than in arithmetic
    parameters = (SCALE, _NORMALIZE_WEIGHTS, _EPS)
    statistics = (Pass(NORMS, 70, records=("n", "w", "s")), Pass(MEAN, 71, records=("mn", "fallback")),
                  Pass(DOTS, 72, records=("dots",)), Pass(TANGENT, 73, records=("c", "sn", "avg")))
    recipes = (mergekit_kind("multislerp", anchor_optional=True, at_least=1),)

    def passes_for(self, tensor: Any) -> tuple[str, ...]:
        return super().passes_for(tensor) if len(tensor.terms) > 1 else ("elementwise",)

    def facts_problem(self, tensor: Any, facts: Any, passes: list[str]) -> str | None:
        k = len(tensor.terms)
        wanted = {NORMS: {"n": k, "w": k, "s": k}, MEAN: {"mn": 0, "fallback": 0}, DOTS: {"dots": k},
                  TANGENT: {"c": 0, "sn": 0, "avg": 0}}
        return facts_problem(facts, k, {name: n for p in passes for name, n in wanted[p].items()}) if passes \
            else None

    # --- statistics ------------------------------------------------------------------------------

    @quiet
    def statistic(self, kernel: Any, pass_name: str, operands: Operands, scratch: Any) -> list:
        f = (operands.facts or [None])[0] or {}
        k = len(operands.vectors)
        if k < 2:  # past the models' rows, or one model: nothing to sum
            return []
        lanes = None  # the piece's sums
        narrow = operands.compute is not None  # every value summed is rounded to it
        for at, m in chunks(vector_length(operands), scratch):
            with fused(kernel) as k:  # the steps and the sums, one compiled loop where they can be
                s = _State(k, operands, scratch, f, at, m)
                if pass_name == NORMS:
                    summed = s.deltas
                elif pass_name == MEAN:
                    summed = [s.mean()]
                elif pass_name == DOTS:
                    mean = s.mean()
                    summed = [operands.rounded(k, step(k.multiply, u, mean, u)) for u in s.units()]
                else:
                    summed = [s.tangent()]
                lanes = lanes or Lanes(len(summed))
                for j, x in enumerate(summed):
                    add_sum(k, lanes, j, x, scratch, square=pass_name != DOTS, narrow=narrow)
                discard(k, *s.rows)  # summed in the block: nothing is read after it
        return [[x.to_json() for x in lanes.sums()]] if lanes is not None else []

    def reduce(self, pass_name: str, tensor: Any, results: list[tuple[int, list]], facts: Any) -> Any:
        k = len(tensor.terms)
        facts = [dict(f) if f else {} for f in (facts or [{}] * k)]
        params = dict(tensor.params)
        count, root = {NORMS: (k, True), MEAN: (1, True), DOTS: (k, False), TANGENT: (1, True)}[pass_name]
        sums = [float(s.sqrt_float32() if root else s.to_float32()) for s in (total(results, 0, i)
                                                                            for i in range(count))]
        got = in_torch(_scalars, pass_name, sums, facts[0], [t.scale for t in tensor.terms],
                       bool(params.get("normalize_weights", _NORMALIZE_WEIGHTS.default)),
                       float(params.get("eps", _EPS.default)), getattr(tensor, "compute", None))
        if got.get("fallback") and k != 2:
            raise PlanError(f"multislerp: {tensor.name}: the weighted sum of the models is zero (antipodal models "
                            "whose weights balance out, as mergekit says); use other weights")
        facts[0].update(got)
        return facts

    # --- the elementwise rule ------------------------------------------------------------------

    @quiet
    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        f = (operands.facts or [None])[0] or {}
        def rule(k: Any, at: int, m: int, xs: tuple) -> Any:
            s = _State(k, operands, scratch, f, at, m, xs)
            result = s.result()
            discard(k, *s.rows, keep=(result,))  # read after the block: the result alone
            return result

        return apply_chunks(kernel, out, operands, scratch, _inputs(operands), rule)


class _State:
    """One chunk's elements of the quantities the passes reduce, each step rounded to the compute
    dtype as mergekit's: the deltas, the units, the mean, the tangent, the result. `given`: the
    inputs already widened (a NaN replay's, on the host), else read from the operands."""

    def __init__(self, kernel: Any, operands: Operands, scratch: Any, facts: dict, at: int, m: int,
                 given: tuple = ()) -> None:
        self.k, self.o, self.f = kernel, operands, facts
        count = len(operands.vectors)
        if given:
            rows = list(given) + [np.empty(len(given[0]), np.float32) for _ in range(count + 2)]
        else:
            rows = widen_rows(kernel, scratch, _ROWS, _inputs(operands), at, m, spare=count + 2)
        self.rows, self.deltas = rows, rows[:count]
        base = rows[count] if operands.vectors[0].b is not None else None
        extra = rows[count + (base is not None):]
        self.units_rows, self.acc, self.work = extra[:count], extra[count], extra[count + 1]
        if base is not None and count > 1:
            for d in self.deltas:
                operands.rounded(kernel, step(kernel.subtract, d, base, d))
        self.base = base
        self._units = None
        if base is not None and count == 1:  # mergekit returns the one model as it is: no delta
            self.base = None

    def rnd(self, x: Any) -> Any:
        return self.o.rounded(self.k, x)

    def units(self) -> list:
        """u_i = d_i / s_i (s_i = n_i + eps, rounded)."""
        if self._units is None:
            for d, s, u in zip(self.deltas, self.f["s"], self.units_rows):
                self.rnd(step(self.k.divide, d, value(s), u))
            self._units = self.units_rows
        return self._units

    def weighted_sum(self, rows: list) -> Any:
        """sum_i rows_i * w_i: each product rounded, their float32 sum rounded once (torch's sum(0))."""
        self.k.fill(self.acc, 0)
        for x, w in zip(rows, self.f["w"]):
            self.k.add(self.acc, self.rnd(step(self.k.multiply, x, value(w), self.work)), self.acc)
        return self.rnd(self.acc)

    def mean(self) -> Any:
        """The weighted mean of the units; divided by its norm once that is known (m)."""
        mean = self.weighted_sum(self.units())
        if "mn" in self.f:
            self.rnd(step(self.k.divide, mean, value(self.f["mn"]), mean))
        return mean

    def tangent(self) -> Any:
        """sum_i (u_i - dots_i * m) w_i, into the units' rows and acc."""
        units, mean = self.units(), self.mean()
        for u, dot in zip(units, self.f["dots"]):
            self.rnd(step(self.k.multiply, mean, value(dot), self.work))
            self.rnd(step(self.k.subtract, u, self.work, u))
        mean_copy = self.deltas[0]  # the deltas are no longer needed: keep m there
        self.k.copy(mean_copy, mean)
        return self.weighted_sum(units)

    def result(self) -> Any:
        """The output before its last rounding (the base added where there is one)."""
        k, f = self.k, self.f
        if len(self.deltas) == 1:  # mergekit returns the one model as it is
            return self.deltas[0]
        if f.get("fallback"):  # two models whose mean is zero: their weighted sum
            d0, d1 = self.deltas
            self.rnd(step(k.multiply, d0, value(f["w"][0]), d0))
            self.rnd(step(k.multiply, d1, value(f["w"][1]), d1))
            out = self.rnd(step(k.add, d0, d1, d0))
        else:
            tangent = self.tangent()
            mean = self.deltas[0]
            self.rnd(step(k.multiply, mean, value(f["c"]), mean))
            self.rnd(step(k.multiply, tangent, value(f["sn"]), tangent))
            out = self.rnd(step(k.add, mean, tangent, mean))
            self.rnd(step(k.multiply, out, value(f["avg"]), out))
        return out if self.base is None else step(k.add, out, self.base, out)


def _inputs(operands: Operands) -> list:
    """The models, then the base (what each is taken minus) where there is one."""
    vecs = operands.vectors
    return [v.a for v in vecs] + ([vecs[0].b] if vecs and vecs[0].b is not None else [])


def _scalars(pass_name: str, sums: list[float], f: dict, weights: list[float], normalize: bool, eps: float,
             compute: str | None) -> dict:
    """The facts a pass records from its sums (each rounded once to float32), with torch on tensors of
    the compute dtype, as mergekit's: norms, weights and norms + eps; the mean's norm and whether it
    is below eps; the dots; cos and sin of the tangent's norm, and the norms' weighted sum."""
    import torch

    dtype = torch_dtype(compute)
    got = torch.tensor(sums, dtype=torch.float32).to(dtype)
    if pass_name == NORMS:
        w = torch.tensor(weights, dtype=dtype)
        if normalize:
            w = w / w.sum()
        return {"n": tensor_bits(got), "w": tensor_bits(w), "s": tensor_bits(got + eps)}
    if pass_name == MEAN:
        return {"mn": tensor_bits(got)[0], "fallback": int(bool(got[0] < eps))}
    if pass_name == DOTS:
        return {"dots": tensor_bits(got)}
    tn = got[0] + eps
    norms, w = (torch.tensor([float(value(x)) for x in f[k]]).to(dtype) for k in ("n", "w"))
    return {"c": tensor_bits(torch.cos(tn))[0], "sn": tensor_bits(torch.sin(tn) / tn)[0],
            "avg": tensor_bits((norms * w).sum())[0]}
