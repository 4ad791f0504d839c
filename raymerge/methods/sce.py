"""mergekit's SCE (select, calculate, erase; mergekit 0.1.5 `merge_methods/sce.py`), in its
operations' order, each rounded to the compute dtype where mergekit's torch operation on tensors
of that dtype is:

    tv_i = m_i - base
    select (select_topk < 1): keep the elements of the k largest variances across the models,
        var = var_i(tv_i) (population), k = int(float32(count of var != 0) * float32(select_topk))
    calculate: w_i = mean(tv_i ** 2) / sum_j mean(tv_j ** 2)  (1/N each where that sum is below 1e-6)
    erase: e_i = [sign(tv_i) == sign of sum_j tv_j (+ where it is 0)]
    out = base + sum_i tv_i (w_i e_i) / max(sum_i w_i e_i, 1e-6)

The variance is torch's: Welford's algorithm in float64 over the models, then rounded to float32
and to the compute dtype (it gives torch.var's bits). Its k largest are a radix selection as
TIES's threshold is (`sce-variance-high`, `sce-variance-low`; equal variances kept lowest flat
index first, where mergekit's torch.topk keeps an unspecified subset; in BF16 the high pass alone
settles it, as sparse.bin_facts says), and `sce-weights` sums
each model's squares of what is kept exactly (mergekit sums in float32: its last bit can differ).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raymerge.methods.base import Method, Operands, Parameter, Pass, mergekit_kind
from raymerge.methods.sparse import LOW_ONLY, bin_facts, keep_bits, kept_bits, merged_counts, threshold_facts, top_mask
from raymerge.methods.steps import (bits, chunks, counted, exact_sum, facts_problem, past_rows, quiet, replay_nans,
                                    step, total, value, vector_length, widen_rows)
from raymerge.ops import native, sparse
from raymerge.ops.kernel import round_scalar

HIGH, LOW, WEIGHTS = "sce-variance-high", "sce-variance-low", "sce-weights"
_ROWS, _BITS = "sce-rows", "sce-bits"
_FLOOR = 1e-6  # mergekit: the weights' sum below it means equal weights; the divisor is at least it

_SELECT_TOPK = Parameter("select_topk", "the fraction of elements kept, those of largest variance across the "
                         "models (sce)", "number", 1.0, mergekit="select_topk")


class Sce(Method):
    name = "sce"
    parameters = (_SELECT_TOPK,)
    statistics = (Pass(HIGH, 93, records=("nonzero", "k", "high", "above")),
                  Pass(LOW, 94, records=("threshold", "cut", "keep"), only=LOW_ONLY),
                  Pass(WEIGHTS, 95, records=("w",)))
    recipes = (mergekit_kind("sce"),)
    mergekit_ignores = ("int8_mask",)

    def passes_for(self, tensor: Any) -> tuple[str, ...]:
        if not tensor.terms:
            return ("elementwise",)
        return (*((HIGH, LOW) if _selects(tensor.params) else ()), WEIGHTS, "elementwise")

    def keeps(self, tensor: Any) -> int:
        """The selection's mask, a bit an element (the weights pass's, for the output)."""
        return 1 if tensor.terms and _selects(tensor.params) else 0

    def facts_problem(self, tensor: Any, facts: Any, passes: list[str]) -> str | None:
        if not passes:
            return None
        k = len(tensor.terms)
        wanted = {"w": k} if WEIGHTS in passes else {}
        problem = facts_problem(facts, k, wanted)
        if problem is None:
            for key in (p for name in passes for p in _RECORDS.get(name, ())):
                if not (isinstance(facts[0].get(key), int) and 0 <= facts[0][key] < 2**62):
                    return f"vector 1's {key}: expected a count or float32 bits"
        return problem

    # --- statistics ------------------------------------------------------------------------------

    @quiet
    def statistic(self, kernel: Any, pass_name: str, operands: Operands, scratch: Any) -> list:
        f = (operands.facts or [None])[0] or {}
        k = len(operands.vectors)
        if not k:  # past the models' rows: nothing to count
            return []
        seen: dict = {}
        histogram, nonzero = np.zeros(sparse.HIGH_BINS, np.int64), 0
        low = np.zeros(sparse.LOW_BINS, np.int64) if pass_name == LOW else None  # the bin's low halves, counted
        sums = [None] * k
        for at, m in chunks(vector_length(operands), scratch):
            c = _Chunk(kernel, operands, scratch, at, m, ())
            if pass_name == WEIGHTS:
                c.select(f, seen)
                for i, d in enumerate(c.deltas):
                    square = operands.rounded(kernel, step(kernel.multiply, d, d, c.work))
                    s = exact_sum(kernel, square, scratch, narrow=operands.compute is not None)
                    sums[i] = s if sums[i] is None else sums[i] + s
                continue
            b = kernel.to_host(kernel.magnitude_bits(c.variance(), c.bits, nans_equal=pass_name == LOW and
                                                     f.get("high") == sparse.NAN_BIN), scratch)
            if pass_name == HIGH:
                sparse.high_histogram(b, histogram, np.empty(b.size, np.int64))
                nonzero += int(np.count_nonzero(b))  # a NaN's bits are not 0: torch counts it too
            else:
                sparse.count_lows(b, f["high"], low)
        if pass_name == WEIGHTS:
            return [[s.to_json() for s in sums]] if sums[0] is not None else []  # no elements: nothing
        if pass_name == HIGH:
            return [[*sparse.nonzero_bins(histogram), nonzero]]
        return [sparse.nonzero_bins(low)]

    def needs(self, pass_name: str, facts: Any) -> bool:
        """LOW only where HIGH left the threshold open (sparse.bin_facts)."""
        return pass_name != LOW or not facts or "threshold" not in (facts[0] or {})

    def reduce(self, pass_name: str, tensor: Any, results: list[tuple[int, list]], facts: Any) -> Any:
        n = len(tensor.terms)
        facts = [dict(f) if f else {} for f in (facts or [{}] * n)]
        f = facts[0]
        got = sorted((begin, r[0]) for begin, r in results if r)
        params = dict(tensor.params)
        if pass_name == HIGH:
            nonzero = sum(r[2] for _, r in got)
            k = int(np.float32(nonzero) * np.float32(params.get("select_topk", 1.0)))  # torch: float32
            histograms = [(b, r[:2]) for b, r in got]
            high, above = sparse.select(merged_counts(histograms), k) if k else (0, 0)
            f.update(nonzero=nonzero, k=k, high=high, above=above)
            if tensor.compute == "BF16":  # 16-bit variances: the bin may settle the threshold (LOW's facts)
                f.update(bin_facts(f, histograms))
        elif pass_name == LOW:
            f.update(threshold_facts(f, got) if f["k"] else {"threshold": 0, "cut": 0, "keep": 0})
        else:
            f["w"] = _weights([total(results, 0, i) for i in range(n)], _elements(tensor), tensor.compute)
        return facts

    # --- the elementwise rule ------------------------------------------------------------------

    @quiet
    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        f = (operands.facts or [None])[0] or {}
        seen: dict = {}
        inputs = _inputs(operands)
        n = vector_length(operands)
        sums = past_rows(kernel, out, operands, scratch, n)
        for at, m in chunks(n, scratch):
            c = _Chunk(kernel, operands, scratch, at, m, ())
            mask = c.select(f, seen)
            result = c.result(f)

            def again(k: Any, xs: list, idx: np.ndarray) -> Any:  # a NaN replay: the chunk's mask there
                c = _Chunk(k, operands, scratch, at, len(idx), tuple(xs))
                if mask is not None:
                    c.masked(mask[idx])
                return c.result(f)

            replay_nans(kernel, result, scratch, inputs, at, again, indexed=True)
            sums = counted(sums, kernel.weighted_sum(out[at:at + m], result, [], scratch))
        return sums


_RECORDS = {HIGH: ("nonzero", "k", "high", "above"), LOW: ("threshold", "cut", "keep")}


class _Chunk:
    """One chunk's deltas (rounded), their variance and the selection's mask, the result. `given`:
    the inputs already widened (a NaN replay's, on the host)."""

    def __init__(self, kernel: Any, operands: Operands, scratch: Any, at: int, m: int, given: tuple) -> None:
        self.k, self.o, self.scratch, self.at = kernel, operands, scratch, at
        count = len(operands.vectors)
        if given:
            rows = list(given) + [np.empty(len(given[0]), np.float32) for _ in range(5)]
        else:
            rows = widen_rows(kernel, scratch, _ROWS, _inputs(operands), at, m, spare=5)
        self.deltas, self.base = rows[:count], rows[count]
        self.mask, self.acc, self.work, self.other, self.merged = rows[count + 1:]
        self.bits = kernel.table(scratch, _BITS, 1, bits=True)[0][:m] if not given else np.empty(m, np.uint32)
        for d in self.deltas:
            operands.rounded(kernel, step(kernel.subtract, d, self.base, d))

    def variance(self) -> Any:
        """torch.var over the models (population): Welford's steps in float64, then float32, then
        the compute dtype; in `other`. Compiled where raymerge/ops/_native.c was built (the same
        float64 operations, element by element: the same values, a NaN's payload aside, which the
        selection does not tell apart), else numpy's."""
        if all(native.takes(x, np.float32) for x in (self.other, *self.deltas)):  # numpy's kernel: host arrays
            native.loops.welford_variance(self.deltas, self.other)
            return self.o.rounded(self.k, self.other)
        mean = m2 = np.zeros(len(self.base), np.float64)
        for n, d in enumerate(self.deltas, start=1):
            x = self.k.to_host(d, self.scratch).astype(np.float64)  # a copy: to_host's buffer is reused
            delta = x - mean
            mean = mean + delta / np.float64(n)
            m2 = m2 + delta * (x - mean)
        self.k.from_host(self.other, (m2 / np.float64(len(self.deltas))).astype(np.float32))
        return self.o.rounded(self.k, self.other)

    def select(self, f: dict, seen: dict) -> np.ndarray | None:
        """Each delta times the selection's mask (1.0 or 0.0), returned on the host (a NaN replay
        takes it again); None without a selection (select_topk 1 or more)."""
        topk = self.o.param("select_topk", 1.0)
        if topk >= 1:
            return None
        if topk <= 0:
            self.k.fill(self.mask, 0)
        elif not kept_bits(self.k, self.o, "select", self.mask, self.at):  # the weights pass's, else drawn here
            top_mask(self.k, self.variance(), self.mask, f, "", self.o.begin, seen, 0, self.bits,
                     self.scratch)
            keep_bits(self.o, "select", self.k.to_host(self.mask, self.scratch) != 0, self.at)
        self.masked(self.mask)
        return self.k.to_host(self.mask, self.scratch).copy()

    def masked(self, mask: Any) -> None:
        for d in self.deltas:
            self.k.multiply(d, mask, d)

    def result(self, f: dict) -> Any:
        k, rnd = self.k, self.o.rounded
        weights = [value(w) for w in f["w"]]
        majority, divisor = self.acc, self.other
        k.fill(majority, 0)
        for d in self.deltas:
            k.add(majority, d, majority)
        rnd(k, majority)  # +1 where the changes sum to >= 0 (not NaN), else -1
        k.greater_equal(majority, 0, majority)
        k.multiply(majority, 2, majority)
        k.subtract(majority, 1, majority)
        merged = self.merged
        k.fill(merged, 0)
        k.fill(divisor, 0)
        for d, w in zip(self.deltas, weights):
            k.multiply(d, majority, self.work)
            k.greater(self.work, 0, self.work)  # sign(tv) == majority: 1.0 or 0.0
            k.multiply(self.work, w, self.work)  # the erased weight: exact
            k.add(divisor, self.work, divisor)
            rnd(k, step(k.multiply, d, self.work, d))
            k.add(merged, d, merged)
        rnd(k, merged)
        rnd(k, divisor)
        k.maximum(divisor, round_scalar(_FLOOR, self.o.compute), divisor)  # clamp(min=1e-6)
        rnd(k, step(k.divide, merged, divisor, merged))
        return step(k.add, merged, self.base, merged)


def _selects(params: Any) -> bool:
    """Whether a tensor's parameters select the largest variances (0 < select_topk < 1)."""
    return 0 < dict(params).get("select_topk", 1.0) < 1


def _weights(sums: list, n: int, compute: str | None) -> list[int]:
    """The models' weights (float32 bits of compute-dtype values) from their exact sums of squares:
    each mean as torch takes a bf16/f16 mean (the float32 sum divided by n, then rounded), their sum
    in the compute dtype, then each divided by it (equal weights where it is below 1e-6)."""
    means = [round_scalar(np.float32(s.to_float32()) / np.float32(n), compute) for s in sums]
    total = np.float32(0)
    for x in means:
        total = np.float32(total + x)
    total = round_scalar(total, compute)
    with np.errstate(all="ignore"):
        if abs(float(total)) < _FLOOR:
            return [bits(round_scalar(np.float32(1) / np.float32(len(sums)), compute))] * len(sums)
        return [bits(round_scalar(np.float32(x) / total, compute)) for x in means]


def _elements(tensor: Any) -> int:
    """How many elements every model covers (a model may cover the tensor's first rows only)."""
    n = int(np.prod(tensor.shape))
    return min([t.limit for t in tensor.terms if t.limit is not None] or [n])


def _inputs(operands: Operands) -> list:
    """The models, then the base each is taken minus."""
    vecs = operands.vectors
    return [v.a for v in vecs] + ([vecs[0].b] if vecs else [])
