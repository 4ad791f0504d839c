"""mergekit's Karcher mean: the weighted Riemannian mean of the models on the unit hypersphere,
found by iteration, over each tensor as one vector, as mergekit 0.1.5 (`merge_methods/karcher.py`)
computes on tensors of the compute dtype (every model weighs 1/N, the base model one of them):

    n_i = |x_i| (float32);  u_i = x_i / n_i;  the valid models: n_i > tol, weights w_i = 1/V each
    m = sum_i w_i u_i;  m = m / |m|  (or the first valid unit where |m| < tol)
    up to max_iter times:
        d_i = clamp(m . u_i, -1, 1);  theta_i = acos(d_i)  (a model with theta_i < tol is skipped)
        tangent = sum_i w_i (theta_i / sin theta_i) (u_i - d_i m)
        tn = |tangent|;  stop where tn < tol
        m = cos(tn) m + sin(tn) (tangent / tn);  m = m / |m|  (where |m| > tol)
    out = (sum_i n_i / N) m

Every whole-tensor reduction is a statistics pass, exact and rounded once (to float32, then the
compute dtype where mergekit's is in it): `karcher-norms`, `karcher-mean`, then per iteration k
`karcher-dots-k`, `karcher-tangent-k` and `karcher-unit-k`. In a compute dtype a dots pass from
iteration 2 on also makes the iteration's tangent, betting that the dots, rounded to a few bits,
repeat the iteration before's (`_speculates`); where they do, the tangent pass does not run (where
every model is skipped, neither: the tangent is zeros). `karcher-mean` and each unit pass keep
the piece's mean before its normalization, the pass that makes a tangent the tangent, for the passes after
(steps.keep: the labels below say which state they hold; a pass that only reads a value does not
keep it again, and divides the mean by its norm itself: one step); where none was kept (a resumed
run, a lost node, the driver's budget, a value no BF16 holds) the pass computes the mean of the iterations before it again
from the inputs and the facts, to the same bits, so a resumed run goes on from the last finished
pass. A pass given all it needs reads no input (a unit pass: the mean and the tangent). A tensor
that has converged (tn < tol), or has no valid model, needs none of the passes after
(`Method.needs`): the driver skips its pieces. The driver makes the scalars with torch on 0-dim
tensors of mergekit's dtypes (steps.in_torch), or in BF16 without it where they are surely torch's
(`_scalars_bf16`), and rounds a float32 scalar to the compute dtype where torch does: as the first
operand of a product.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from raymerge.methods.base import Method, Operands, Parameter, Pass, mergekit_kind, param
from raymerge.methods.steps import (add_sum, apply_chunks, bits, carried, chunks, facts_problem, in_torch, keep,
                                    quiet, step, tensor_bits, torch_dtype, total, value, vector_length, widen_rows)
from raymerge.ops.exact import Lanes
from raymerge.ops.fused import discard, fused
from raymerge.ops.kernel import round_scalar

NORMS, MEAN = "karcher-norms", "karcher-mean"
DOTS, TANGENT, UNIT = "dots", "tangent", "unit"  # an iteration's passes: karcher-dots-1, ...
_STEPS = (DOTS, TANGENT, UNIT)
MAX_ITER = 100  # the iterations raymerge declares passes for
_ROWS = "karcher-rows"
_ONLY = ("where its dots pass did not settle the tangent (zeros where every model is left out; from iteration 2, "
         "in a compute dtype, the dots pass's own where the dots are the iteration before's)")

_MAX_ITER = Parameter("max_iter", "the most iterations of the Karcher mean", "number", 10, mergekit="max_iter")
_TOL = Parameter("tol", "the tolerance: a norm, angle or step below it counts as zero", "number", 1e-5,
                 mergekit="tol")


def iteration_pass(k: int, what: str) -> str:
    return f"karcher-{what}-{k}"


def _parse(pass_name: str) -> tuple[str, int]:
    """(what, iteration) of an iteration's pass; (pass_name, 0) of the first two."""
    if pass_name in (NORMS, MEAN):
        return pass_name, 0
    _, what, k = pass_name.split("-")
    return what, int(k)


class Karcher(Method):
    name = "karcher"
    torch_scalars = True  # reduce computes with torch, as mergekit does (steps.in_torch)
    wide_chunks = True  # a chunk's fused program and sums cost more in Python than in arithmetic
    parameters = (_MAX_ITER, _TOL)
    statistics = (Pass(NORMS, 100), Pass(MEAN, 101),
                  *(Pass(iteration_pass(k, what), 100 + 3 * k + j, only=_ONLY if what == TANGENT else "")
                    for k in range(1, MAX_ITER + 1) for j, what in enumerate(_STEPS)))
    recipes = (mergekit_kind("karcher", anchor=None, minus=None, base_joins=True, at_least=1),)
    mergekit_ignores = ("weight",)  # mergekit weighs every model 1/N, whatever weights the file gives

    def refuses(self, params: dict[str, Any]) -> str | None:
        n = params.get("max_iter", _MAX_ITER.default)
        if n != int(n) or not 0 <= n <= MAX_ITER:
            return f"max_iter {n:g}: karcher runs a whole number of iterations, from 0 to {MAX_ITER}"
        return None

    def passes_for(self, tensor: Any) -> tuple[str, ...]:
        if len(tensor.terms) < 2:  # one model: mergekit returns it as it is
            return ("elementwise",)
        iters = int(param(tensor.params, "max_iter", _MAX_ITER.default))
        return (NORMS, MEAN, *(iteration_pass(k, what) for k in range(1, iters + 1) for what in _STEPS),
                "elementwise")

    def keeps(self, tensor: Any) -> int:
        """The mean and the tangent, each of the compute dtype (kept as float32 without one)."""
        return 0 if len(tensor.terms) < 2 else 2 * (2 if tensor.compute == "BF16" else 4)

    def needs(self, pass_name: str, facts: Any) -> bool:
        """Past the norms, nothing where no model is valid; past convergence, no iteration's pass."""
        f = (facts or [None])[0] or {}
        what, k = _parse(pass_name)
        if what == NORMS or "n" not in f:
            return True
        if not f.get("valid"):
            return False
        if what == TANGENT and f"tn{k}" in f:  # the dots pass made the tangent (_speculates)
            return False
        done = f.get("done")
        return done is None or k < done or (k == done and what != UNIT)

    def reads_inputs(self, pass_name: str, carried: Any, facts: Any = None) -> bool:
        """A unit pass given the mean it steps from and its iteration's tangent reads no input."""
        what, it = _parse(pass_name)
        c, f = carried or {}, (facts or [None])[0] or {}
        return not (what == UNIT and c.get("tangent-of") == _tangent_label(f, it, it)
                    and c.get("at") == _mean_label(it - 1) and c.get("mean") is not None
                    and c.get("tangent") is not None)

    def spends(self, pass_name: str) -> tuple[str, ...]:
        """A unit pass reads the tangent last: the next iteration's tangent pass makes its own."""
        return ("tangent", "tangent-of") if _parse(pass_name)[0] == UNIT else ()

    def facts_problem(self, tensor: Any, facts: Any, passes: list[str]) -> str | None:
        k = len(tensor.terms)
        f = facts[0] if isinstance(facts, list) and facts and isinstance(facts[0], dict) else {}
        wanted: dict[str, int] = {}
        for p in passes:
            what, it = _parse(p)
            if not (self.needs(p, [f]) or what == TANGENT and f"tn{it}" in f):  # (or its dots pass made it)
                break
            wanted.update({NORMS: {"n": k, "w": k, "valid": 0, "scale": 0}, MEAN: {"mn": 0},
                           DOTS: {f"d{it}": k, f"c{it}": k, f"skip{it}": k},
                           TANGENT: {f"tn{it}": 0, f"cos{it}": 0, f"sin{it}": 0}, UNIT: {f"un{it}": 0}}[what])
        problem = facts_problem(facts, k, wanted)
        if problem is None and "done" in f and not (isinstance(f["done"], int) and 1 <= f["done"] <= MAX_ITER):
            problem = "vector 1's done: expected an iteration"
        return problem

    # --- statistics ------------------------------------------------------------------------------

    @quiet
    def statistic(self, kernel: Any, pass_name: str, operands: Operands, scratch: Any) -> list:
        f = (operands.facts or [None])[0] or {}
        if len(operands.vectors) < 2:
            return []
        what, it = _parse(pass_name)
        narrow = operands.compute is not None  # every value summed is rounded to it
        lanes = None  # the piece's sums
        n = vector_length(operands)
        # the iteration whose coefficients a tangent made here takes: a dots pass's, the one before's
        basis = it if what == TANGENT else it - 1 if what == DOTS and _speculates(f, it, operands.compute) else None
        for at, m in chunks(n, scratch):
            kept = None  # what the chunk's last summed value is kept as
            with fused(kernel) as k:  # the steps before the sums, one compiled loop where they can be
                s = _State(k, operands, scratch, f, at, m)
                summed: list = []  # (x, y): x * y summed (y None: x squared)
                if what == NORMS:
                    summed = [(x, None) for x in s.x]
                elif what == MEAN:
                    summed = [(s.first_mean(), None)]
                    kept = _mean_label(0)
                elif what == UNIT:
                    s.mean_after(it - 1)
                    s.tangent(it)
                    summed = [(s.step_along(it), None)]
                    kept = _mean_label(it)
                else:
                    mean = s.mean_after(it - 1)  # normalized from the kept step: not kept again
                    if what == DOTS:
                        s.units()
                        summed = [(s.x[i], mean) for i in s.valid]
                    if basis is not None:
                        summed.append((s.tangent(it, basis), None))
                        kept = "tangent"
                lanes = lanes or Lanes(len(summed))
                for j, (x, y) in enumerate(summed):
                    add_sum(k, lanes, j, x, scratch, square=y is None, narrow=narrow, times=y)
                last = summed[-1][0]
                if kept == "tangent":  # its halves a step of the program: no row is read after it
                    keep(k, operands, scratch, "tangent", last, at, n)
                elif kept is not None:
                    s.keep(last, kept, n)
                discard(k, *s.rows)
        if operands.keep and "tangent" in operands.keep:
            operands.keep["tangent-of"] = _tangent_label(f, it, basis)
        return [[x.to_json() for x in lanes.sums()]] if lanes is not None else []

    def reduce(self, pass_name: str, tensor: Any, results: list[tuple[int, list]], facts: Any) -> Any:
        k = len(tensor.terms)
        facts = [dict(f) if f else {} for f in (facts or [{}] * k)]
        params = dict(tensor.params)
        tol = float(params.get("tol", _TOL.default))
        what, it = _parse(pass_name)
        compute = getattr(tensor, "compute", None)
        count = k if what == NORMS else len(_valid(facts[0], tol)) if what == DOTS else 1
        made = what == DOTS and _speculates(facts[0], it, compute)  # its last sum: the tangent's
        totals = [total(results, 0, i) for i in range(count + int(made))]  # a dot as it is, a norm's root
        sums = [float(t.to_float32() if what == DOTS and i < count else t.sqrt_float32()) for i, t in enumerate(totals)]
        f = facts[0]
        f.update(_facts(what, it, sums[:count], f, k, tol, compute))
        if what != DOTS:
            return facts
        if all(f[f"skip{it}"]):  # no model adds a term: the tangent is zeros, its norm 0 (no tangent pass)
            f.update(_facts(TANGENT, it, [0.0], f, k, tol, compute))
        elif made and all(f[f"{x}{it}"] == f[f"{x}{it - 1}"] for x in _COEFFICIENTS):  # the bet won
            f.update(_facts(TANGENT, it, sums[count:], f, k, tol, compute))
        return facts

    def needs_torch(self, tensor: Any) -> bool:
        """In BF16 the driver makes the scalars without torch but in rare cases (`_facts`)."""
        return getattr(tensor, "compute", None) != "BF16"

    # --- the elementwise rule ------------------------------------------------------------------

    @quiet
    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        f = (operands.facts or [None])[0] or {}
        iters = int(self.value(operands, "max_iter"))
        return apply_chunks(kernel, out, operands, scratch, [v.a for v in operands.vectors],
                            lambda k, at, m, xs: _State(k, operands, scratch, f, at, m, xs).result(iters))


class _State:
    """One chunk's elements of the quantities the passes reduce, each operation rounded to the
    compute dtype as mergekit's: the inputs, turned into units in place, the mean, the tangent.
    `given`: the inputs already widened (a NaN replay's, on the host), else read from the operands,
    with what the piece's earlier passes kept.

    What a pass keeps (steps.keep), labelled by the state it holds: "mean" is the first mean before
    it is normalized ("first") or iteration n's step before it is normalized ("u<n>"); "tangent" is
    the one "tangent-of" names: an iteration and the coefficients it was made with (_tangent_label)."""

    def __init__(self, kernel: Any, operands: Operands, scratch: Any, facts: dict, at: int, m: int,
                 given: tuple = ()) -> None:
        self.k, self.o, self.f, self.s, self.at, self.m = kernel, operands, facts, scratch, at, m
        self.carried = None if given else operands.carried or None
        count = len(operands.vectors)
        if given:
            rows = list(given) + [np.empty(len(given[0]), np.float32) for _ in range(3)]
        else:  # the inputs are widened where a step reads them (`x`): a pass given what it needs reads none
            rows = widen_rows(kernel, scratch, _ROWS, [], at, m, spare=count + 3)
        self.rows, self._x, (self.mean, self.tan, self.work) = rows, rows[:count], rows[count:]
        self._widened = bool(given)
        self.tol = float(operands.param("tol", _TOL.default))
        self.valid = _valid(facts, self.tol) if "n" in facts else []
        self._units = False

    @property
    def x(self) -> list:
        """The inputs' elements, widened (first read here)."""
        if not self._widened:  # into the same rows of the table (steps.widen_rows)
            widen_rows(self.k, self.s, _ROWS, [v.a for v in self.o.vectors], self.at, self.m)
            self._widened = True
        return self._x

    def rnd(self, x: Any) -> Any:
        return self.o.rounded(self.k, x)

    def units(self) -> None:
        """u_i = x_i / n_i, in place, for the valid models (mergekit's division by a float32 norm)."""
        if not self._units:
            for i in self.valid:
                self.rnd(step(self.k.divide, self.x[i], value(self.f["n"][i]), self.x[i]))
            self._units = True

    def first_mean(self) -> Any:
        """sum_i w_i u_i: each product rounded, added in turn (mergekit's `mean += alpha * unit`)."""
        self.units()
        k = self.k
        k.fill(self.mean, 0)
        for i in self.valid:
            self.rnd(step(k.add, self.mean, self.rnd(step(k.multiply, self.x[i], value(self.f["w"][i]), self.work)),
                          self.mean))
        return self.mean

    def keep(self, x: Any, label: str, n: int) -> Any:
        """x, kept as the piece's "mean" in state `label` for the next pass (steps.keep)."""
        keep(self.k, self.o, self.s, "mean", x, self.at, n)
        if self.o.keep is not None:
            self.o.keep["at"] = label
        return x

    def mean_after(self, iterations: int) -> Any:
        """The mean once `iterations` iterations are done (0: the normalized first mean); an
        iteration that found a step below tol (`done`) leaves the mean as it was."""
        done = self.f.get("done")
        if done is not None and done <= iterations:
            iterations = done - 1
        label = (self.carried or {}).get("at")
        if label == _mean_label(iterations) and \
                carried(self.k, self.o, "mean", self.mean, self.at, self.m):
            self._normalize(iterations)  # what was kept is the mean before it
            return self.mean
        self.first_mean()
        self._normalize(0)
        for it in range(1, iterations + 1):
            self.tangent(it)
            self.step_along(it)
            self._normalize(it)
        return self.mean

    def _normalize(self, it: int) -> None:
        """The mean after iteration `it`'s step (0: the first mean) divided by its norm; the first
        valid unit for a first mean of norm below tol, and a step of norm below tol unchanged."""
        if it == 0:
            mn = value(self.f["mn"])
            if float(mn) < self.tol:
                self.units()
                self.k.copy(self.mean, self.x[self.valid[0]])
            else:
                self.rnd(step(self.k.divide, self.mean, mn, self.mean))
            return
        un = value(self.f[f"un{it}"])
        if float(un) > self.tol:
            self.rnd(step(self.k.divide, self.mean, un, self.mean))

    def tangent(self, it: int, basis: int | None = None) -> Any:
        """sum_i c_i (u_i - d_i m) over the models iteration `it` does not skip, added in turn (or
        as a pass of the piece kept it): with iteration `basis`'s coefficients (d_i, c_i and the
        models skipped), its own where None; a dots pass's, the iteration before's (_speculates)."""
        k, f, b = self.k, self.f, it if basis is None else basis
        if self.carried and self.carried.get("tangent-of") == _tangent_label(f, it, b) and \
                carried(k, self.o, "tangent", self.tan, self.at, self.m):
            return self.tan
        self.units()
        k.fill(self.tan, 0)
        for i in self.valid:
            if f[f"skip{b}"][i]:
                continue
            self.rnd(step(k.multiply, self.mean, value(f[f"d{b}"][i]), self.work))
            self.rnd(step(k.subtract, self.x[i], self.work, self.work))
            self.rnd(step(k.multiply, self.work, value(f[f"c{b}"][i]), self.work))
            self.rnd(step(k.add, self.tan, self.work, self.tan))
        return self.tan

    def step_along(self, it: int) -> Any:
        """m = cos(tn) m + sin(tn) (tangent / tn), before it is normalized (the tangent is consumed)."""
        k, f = self.k, self.f
        self.rnd(step(k.multiply, self.mean, value(f[f"cos{it}"]), self.mean))
        self.rnd(step(k.divide, self.tan, value(f[f"tn{it}"]), self.tan))
        self.rnd(step(k.multiply, self.tan, value(f[f"sin{it}"]), self.tan))
        return self.rnd(step(k.add, self.mean, self.tan, self.mean))

    def result(self, iterations: int) -> Any:
        """The output before its last rounding."""
        k = self.k
        if len(self._x) == 1:  # mergekit returns the one model as it is
            return self.x[0]
        if not self.valid:  # no model's norm above tol: mergekit's sum of each model times 0
            k.fill(self.mean, 0)
            for x in self.x:
                self.rnd(step(k.add, self.mean, self.rnd(step(k.multiply, x, np.float32(0), self.work)), self.mean))
            return self.mean
        mean = self.mean_after(iterations)
        return self.rnd(step(k.multiply, mean, value(self.f["scale"]), mean))


def _mean_label(iterations: int) -> str:
    """The label of the kept mean once `iterations` iterations are done, before its normalization:
    "first" (the first mean), else "u<n>" (_State)."""
    return f"u{iterations}" if iterations else "first"


_COEFFICIENTS = ("d", "c", "skip")  # an iteration's facts its tangent is made with


def _speculates(facts: dict, it: int, compute: str | None) -> bool:
    """Whether dots pass `it` also makes the iteration's tangent, with the coefficients of the
    iteration before, on the bet that its dots, rounded to the compute dtype, come out the same:
    where they do (reduce compares), the tangent is the one its own would make, bit for bit, and
    the tangent pass does not run (`needs`); where they do not, it runs. Bet where a dot's few
    bits (8 in BF16) moved not at all in the iteration before (iteration 2: in a compute dtype);
    in float32 they move every iteration."""
    if it < 2 or compute is None:
        return False
    return it == 2 or all(facts.get(f"{x}{it - 1}") == facts.get(f"{x}{it - 2}") for x in _COEFFICIENTS)


def _tangent_label(facts: dict, it: int, basis: int | None) -> tuple:
    """What a kept tangent of iteration `it` is known by: the iteration and the coefficients it was
    made with (iteration `basis`'s), so that a bet lost is never read as the tangent."""
    return (it, *(tuple(facts.get(f"{x}{basis}") or ()) for x in _COEFFICIENTS))


def _valid(facts: dict, tol: float) -> list[int]:
    """The models whose norm is above tol (a NaN norm is not)."""
    return [i for i, n in enumerate(facts["n"]) if float(value(n)) > tol]  # compared as doubles, as mergekit


def _scalars(what: str, it: int, sums: list[float], f: dict, count: int, tol: float, compute: str | None) -> dict:
    """The facts a pass records from its sums (float32: norms, dots), with torch on 0-dim tensors
    of mergekit's dtypes: the norms, weights, valid models and the output's scale; the mean's norm;
    an iteration's clamped dots, the coefficients theta / sin(theta) w and which models it skips;
    the tangent's norm with its cos and sin (as the first operand of a product: in the compute dtype);
    the new mean's norm."""
    import torch

    dtype = torch_dtype(compute)
    got = torch.tensor(sums, dtype=torch.float32)
    if what == NORMS:
        valid = [i for i, n in enumerate(got.tolist()) if n > tol]
        weights = _weights(count, valid)
        scale = sum(1.0 / count * n for n in got)  # a python sum of float32 0-dim tensors, from int 0
        return {"n": tensor_bits(got), "w": [bits(np.float32(w)) for w in weights], "valid": int(bool(valid)),
                "scale": tensor_bits(scale.to(dtype))[0]}
    if what == MEAN:
        return {"mn": tensor_bits(got)[0]}
    if what == DOTS:
        valid = _valid(f, tol)
        weights = _weights(count, valid)
        dots, coefs, skips = [0] * count, [0] * count, [1] * count
        for i, s in zip(valid, got):
            dot = torch.clamp(s.to(dtype), -1.0, 1.0)
            theta = torch.arccos(dot)
            dots[i] = tensor_bits(dot)[0]
            if theta.item() < tol:
                continue
            coefs[i] = tensor_bits(weights[i] * (theta / torch.sin(theta)))[0]
            skips[i] = 0
        return {f"d{it}": dots, f"c{it}": coefs, f"skip{it}": skips}
    if what == TANGENT:
        tn = got[0]
        out = {f"tn{it}": tensor_bits(tn)[0], f"cos{it}": tensor_bits(torch.cos(tn).to(dtype))[0],
               f"sin{it}": tensor_bits(torch.sin(tn).to(dtype))[0]}
        if tn.item() < tol:
            out["done"] = it
        return out
    return {f"un{it}": tensor_bits(got)[0]}


def _facts(what: str, it: int, sums: list[float], f: dict, count: int, tol: float, compute: str | None) -> dict:
    """The facts `_scalars` records: in BF16 made here (`_scalars_bf16`) where they are surely
    torch's, else by `_scalars` in torch."""
    got = _scalars_bf16(what, it, sums, f, count, tol) if compute == "BF16" else None
    return got if got is not None else in_torch(_scalars, what, it, sums, f, count, tol, compute)


def _scalars_bf16(what: str, it: int, sums: list[float], f: dict, count: int, tol: float) -> dict | None:
    """`_scalars` in BF16 without torch: the same facts, or None where one could differ from torch's.
    torch's arithmetic on float32 and BF16 0-dim tensors is IEEE float32's, a BF16 result rounded to
    nearest even (a Python number times a BF16 tensor: the number as a float32); its acos, sin and cos
    are its float32 kernels', each within an ulp of the exact value (SLEEF's u10), which the exact
    value (float64) decides where every float32 within _ULPS ulps of it rounds to one BF16 (all but
    about one argument in 10,000: `_bf16_of`). Non-finite sums go to torch too."""
    s = np.array(sums, np.float32)
    if not np.isfinite(s).all():
        return None
    if what == NORMS:
        valid = [i for i, n in enumerate(s.tolist()) if n > tol]
        scale = np.float32(0)
        for n in s:  # mergekit's python sum of 1/count * n, from 0
            scale = np.float32(scale + np.float32(np.float32(1.0 / count) * n))
        return {"n": [bits(n) for n in s], "w": [bits(np.float32(w)) for w in _weights(count, valid)],
                "valid": int(bool(valid)), "scale": bits(_bf16(scale))}
    if what == MEAN:
        return {"mn": bits(s[0])}
    if what == UNIT:
        return {f"un{it}": bits(s[0])}
    if what == TANGENT:
        tn = s[0]
        cos, sin = _bf16_of(math.cos, tn), _bf16_of(math.sin, tn)
        if cos is None or sin is None:
            return None
        return {f"tn{it}": bits(tn), f"cos{it}": bits(cos), f"sin{it}": bits(sin),
                **({"done": it} if float(tn) < tol else {})}
    valid = _valid(f, tol)
    weights = _weights(count, valid)
    dots, coefs, skips = [0] * count, [0] * count, [1] * count
    for i, x in zip(valid, s):
        dot = min(max(_bf16(x), np.float32(-1.0)), np.float32(1.0))
        theta = _bf16_of(math.acos, dot)
        if theta is None:
            return None
        dots[i] = bits(dot)
        if float(theta) < tol:
            continue
        sin = _bf16_of(math.sin, theta)
        if sin is None:
            return None
        coefs[i] = bits(_bf16(np.float32(weights[i]) * _bf16(theta / sin)))
        skips[i] = 0
    return {f"d{it}": dots, f"c{it}": coefs, f"skip{it}": skips}


_ULPS = 2  # torch's float32 acos, sin and cos are within one ulp of the exact value: twice that, to spare


def _bf16(x: float) -> np.float32:
    """A finite number as float32, rounded to BF16 as torch's .to(torch.bfloat16) (round_scalar)."""
    return round_scalar(x, "BF16")


def _bf16_of(fn: Any, x: np.float32) -> np.float32 | None:
    """fn(x) as torch makes it in float32 and rounds to BF16: the one BF16 that every float32
    within _ULPS ulps of the exact value rounds to; None where two do (it lies near a midpoint), or
    it is not a normal float32. An exact zero (acos(1), sin(0)) is every kernel's."""
    exact = fn(float(x))
    if exact == 0.0:
        return np.float32(exact)
    if not 2.0 ** -125 <= abs(exact) <= 2.0 ** 127:
        return None
    ulp = float(np.spacing(np.float32(abs(exact))))
    low, high = _bf16(exact - _ULPS * ulp), _bf16(exact + _ULPS * ulp)
    return low if low == high else None


def _weights(count: int, valid: list[int]) -> list[float]:
    """mergekit's normalized alphas (python floats): 1/count each, over their sum among the valid models."""
    alpha = 1.0 / count
    total_ = sum([alpha] * len(valid))
    return [alpha / total_ if i in valid else 0.0 for i in range(count)]
