"""TIES and DARE: mergekit's generalized task arithmetic with sparsified deltas, in mergekit's order.

For each vector i (delta_i = a_i - b_i in float32, or a stored vector a_i):
    sparsify: keep the `density` fraction of delta_i: TIES its largest magnitudes, DARE a random
              draw; the rest become delta_i * 0. With `rescale`, multiply what is kept by
              sum|delta_i| / sum|kept| (mergekit's L1 rescale; skipped where either is below 1e-7).
    weigh:    wd_i = delta_i * weight_i
combine (ties, dare_ties: sign consensus by sum):
    majority = +1 where sum_i wd_i >= 0, else -1;  mask_i = sign(wd_i) == majority
    mixed = sum_i wd_i * mask_i;  divisor = sum_i weight_i * mask_i (0 -> 1)
combine (dare_linear):  mixed = sum_i wd_i;  divisor = sum_i weight_i (|.| < 1e-8 -> 1)
    mixed /= divisor when normalizing;  mixed *= lambda;  out = round(anchor + mixed)
Sums over i run in the vectors' order, each operation rounded to float32, as mergekit 0.1.5
(`generalized_task_arithmetic.py`, `sparsify.py`) computes them.

Whole-tensor facts come from statistics passes (docs/ARCHITECTURE.md: passes), exact whatever the cut into items:
  - magnitude-high, magnitude-low: a radix selection of the k-th largest |delta| bits, k =
    max(1, int(density * n)) (ops.sparse). Magnitudes equal to that threshold are kept lowest flat
    index first, up to k in all: per-piece tie counts from the second pass say how many ties each
    piece keeps (mergekit keeps the ties its unstable argsort happens to put first).
  - l1-norm: exact sums of |delta| before and after the drop, each rounded once to float32.
DARE's mask: ops.sparse.keep_mask, keyed by (seed, tensor name) and indexed by element.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from raymerge.methods.base import (ELEMENTWISE, LAMBDA, NORMALIZE, SCALE, Method, Operands, Parameter, Pass,
                                   mergekit_kind, param)
from raymerge.ops import sparse
from raymerge.ops.kernel import Sums
from raymerge.ops.numpy_kernel import CHUNK, _widen

HIGH, LOW, L1 = "magnitude-high", "magnitude-low", "l1-norm"
_EPS = np.float32(1e-7)  # mergekit's: below it, a norm is not rescaled
_DELTAS, _WORK = "sparse-deltas", "sparse-work"  # float32 buffer tables kept in a thread's scratch


class Sparse(Method):
    """One of mergekit's sparsifying task arithmetics; the subclasses are data."""

    sparsify: ClassVar[str]  # "magnitude" (TIES) or "random" (DARE)
    consensus: ClassVar[bool]  # elect a sign per element, by the sum of the weighted deltas
    default_normalize: ClassVar[bool]
    default_rescale: ClassVar[bool]
    numpy_only = True

    def passes_for(self, tensor: Any) -> tuple[str, ...]:
        sparse_terms = any(0 < t.density < 1 for t in tensor.terms)
        passes = [HIGH, LOW] if sparse_terms and self.sparsify == "magnitude" else []
        if sparse_terms and self._rescale(tensor.params):
            passes.append(L1)
        return (*passes, ELEMENTWISE)

    def works_on(self, term: Any) -> bool:
        """Only a term that keeps a fraction of its elements has facts (a limit of 0: no piece reads it)."""
        return 0 < term.density < 1 and term.limit != 0

    def _rescale(self, params) -> bool:
        return bool(param(params, "rescale", self.default_rescale))

    # --- statistics -------------------------------------------------------------------------

    def statistic(self, pass_name: str, operands: Operands, scratch: Any) -> list:
        """One piece's result, per term: HIGH a sparse histogram of the high 16 bits of |delta|
        ([bins], [counts]); LOW one of the low 16 bits inside the threshold's high bin; L1 the
        exact sums of |delta| before and after the drop (AbsSum.to_json)."""
        vecs = operands.vectors
        facts = operands.facts or {}
        wanted = [0 < v.density < 1 and (pass_name != LOW or _fact(facts, v.term, "high") is not None)
                  for v in vecs]
        high = [np.zeros(sparse.HIGH_BINS, np.int64) if w and pass_name == HIGH else None for w in wanted]
        low: list[list] = [[] for _ in vecs]
        sums = [[sparse.AbsSum(), sparse.AbsSum()] for _ in vecs]
        bits, *work = _chunk_buffers(scratch, *_BITS)
        state = _TieState()
        for lo, _, live in _chunks(operands, scratch):
            for i, v, d in live:
                if not wanted[i]:
                    continue
                b = sparse.magnitude_bits(d, bits[:d.size])
                if pass_name == HIGH:
                    sparse.high_histogram(b, high[i], work[0][:d.size])
                elif pass_name == LOW:
                    low[i].append(b[(b >> 16) == facts[v.term]["high"]] & 0xFFFF)
                else:  # L1: before and after the drop
                    sums[i][0] += sparse.abs_sum(b, work)
                    self._drop(v, d, operands, lo, facts, state, bits, scratch)
                    sums[i][1] += sparse.abs_sum(sparse.magnitude_bits(d, bits[:d.size]), work)
        out: list = [None] * (1 + max((v.term for v in vecs), default=-1))  # by term: some may be absent here
        for i, v in enumerate(vecs):
            if not wanted[i]:
                continue
            if pass_name == HIGH:
                nz = np.flatnonzero(high[i])
                out[v.term] = [nz.tolist(), high[i][nz].tolist()]
            elif pass_name == LOW:
                values, counts = np.unique(np.concatenate(low[i]) if low[i] else np.empty(0, np.uint32),
                                           return_counts=True)
                out[v.term] = [values.tolist(), counts.tolist()]
            else:
                out[v.term] = [sums[i][0].to_json(), sums[i][1].to_json()]
        return out

    def reduce(self, pass_name: str, tensor: Any, results: list[tuple[int, list]], facts: Any) -> Any:
        facts = [dict(f) if f else {} for f in (facts or [{}] * len(tensor.terms))]
        for j, term in enumerate(tensor.terms):
            got = [(begin, r[j]) for begin, r in sorted(results) if j < len(r) and r[j] is not None]
            if not got:
                continue
            if pass_name == HIGH:
                n = term.limit if term.limit is not None else math.prod(tensor.shape)
                k = max(1, int(term.density * n))
                high, above = sparse.select(_total(got), k)
                facts[j].update(k=k, high=high, above=above)
            elif pass_name == LOW:
                facts[j].update(_threshold(facts[j], got))
            else:
                before = _abs_total(r[0] for _, r in got).to_float32()
                after = _abs_total(r[1] for _, r in got).to_float32()
                if not (before < _EPS or after < _EPS):
                    with np.errstate(all="ignore"):
                        facts[j]["factor"] = int(np.float32(before / after).view(np.uint32))
        return facts

    # --- the elementwise rule ---------------------------------------------------------------

    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        facts = operands.facts or {}
        normalize = operands.param("normalize", self.default_normalize)
        lam = np.float32(operands.param("lambda", 1.0))
        bits = _chunk_buffers(scratch, *_BITS)[0]
        state = _TieState()
        total = [0.0, 0.0, 0, 0]
        for lo, m, live in _chunks(operands, scratch, len(out)):
            q = max((d.size for _, _, d in live), default=0)
            ds, weights = [], []
            for _, v, d in live:
                self._drop(v, d, operands, lo, facts, state, bits, scratch)
                factor = _fact(facts, v.term, "factor")
                if factor is not None:
                    np.multiply(d, np.array(factor, np.uint32).view(np.float32), out=d)
                weights.append(np.float32(v.scale))
                full = _row(scratch, _WORK, len(ds), q)
                full[d.size:] = 0  # past this vector's rows (an expanded vocabulary): it is absent
                np.multiply(d, weights[-1], out=full[:d.size])
                ds.append(full)
            mixed = self._combine(ds, weights, normalize, scratch, q)
            if lam != 1:
                np.multiply(mixed, lam, out=mixed)
            anchor = operands.anchor[lo:lo + m]
            s = kernel.weighted_sum(out[lo:lo + m], anchor, [(1.0, mixed, None)] if q else [], scratch)
            total = [total[0] + s.ss_delta, total[1] + s.ss_anchor, total[2] + s.nonfinite, total[3] + s.new_nonfinite]
        return Sums(*total)

    def _combine(self, ds: list[np.ndarray], weights: list[np.float32], normalize: bool, scratch: Any,
                 q: int) -> np.ndarray:
        mixed, divisor, sign, mask = (_row(scratch, _WORK, len(ds) + k, q) for k in range(4))
        if not ds:
            return mixed
        if not self.consensus:
            np.copyto(mixed, ds[0])
            for d in ds[1:]:
                np.add(mixed, d, out=mixed)
            if normalize:
                total = weights[0]
                for w in weights[1:]:
                    total = np.float32(total + w)
                if not abs(total) < 1e-8:
                    np.divide(mixed, total, out=mixed)
            return mixed
        majority = sign  # +1 where the weighted deltas sum to >= 0 (not NaN), else -1
        np.copyto(majority, ds[0])
        for d in ds[1:]:
            np.add(majority, d, out=majority)
        positive = _chunk_buffers(scratch, np.bool_)[0][:q]
        np.greater_equal(majority, 0, out=positive)
        np.copyto(majority, positive)
        np.multiply(majority, 2, out=majority)
        np.subtract(majority, 1, out=majority)
        for i, (d, w) in enumerate(zip(ds, weights)):
            # sign(wd) == majority exactly where wd * majority > 0 (never for a zero or a NaN): 1.0 or 0.0
            np.multiply(d, majority, out=mask)
            np.greater(mask, 0, out=mask)
            if i == 0:
                np.multiply(d, mask, out=mixed)
                np.multiply(mask, w, out=divisor)
            else:
                np.multiply(d, mask, out=d)
                np.add(mixed, d, out=mixed)
                np.multiply(mask, w, out=mask)
                np.add(divisor, mask, out=divisor)
        if normalize:
            np.equal(divisor, 0, out=mask)
            np.add(divisor, mask, out=divisor)  # mergekit: divisor[divisor == 0] = 1 (the others: + 0.0, exact)
            np.divide(mixed, divisor, out=mixed)
        return mixed

    def _drop(self, v: Any, d: np.ndarray, operands: Operands, lo: int, facts: Any, state: _TieState,
              bits: np.ndarray, scratch: Any) -> None:
        """d (vector v's delta at the piece's elements lo ..) *= its keep mask, in place."""
        if v.density >= 1:
            return
        if v.density <= 0:
            if self.sparsify == "magnitude":
                d.fill(0)  # mergekit: zeros_like
            else:
                np.multiply(d, 0, out=d)
            return
        keep = _row(scratch, _DELTAS, 0, d.size)  # 1.0 or 0.0: the product is mergekit's `delta * mask`
        if self.sparsify == "random":
            seed = int(operands.param("seed", 0))
            np.copyto(keep, sparse.keep_mask(sparse.philox_key(seed, operands.name), operands.begin + lo, d.size,
                                             sparse.keep_threshold(v.density)))
        else:
            f = facts[v.term]
            b = sparse.magnitude_bits(d, bits[:d.size])
            threshold, begin = np.uint32(f["threshold"]), operands.begin
            # The ties at the threshold: all kept before the piece that holds the last kept one, none after.
            (np.greater_equal if begin < f["cut"] else np.greater)(b, threshold, out=keep)
            if begin == f["cut"]:
                tied = np.flatnonzero(b == threshold)
                left = f["keep"] - state.seen.get(v.term, 0)
                keep[tied[:max(left, 0)]] = 1
                state.seen[v.term] = state.seen.get(v.term, 0) + tied.size
        np.multiply(d, keep, out=d)


class _TieState:
    """Ties at the threshold seen so far in a piece, per term: the piece keeps the first ones."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}


def _fact(facts: Any, term: int, key: str) -> Any:
    return facts[term].get(key) if facts and term < len(facts) and facts[term] else None


def _threshold(f: dict, got: list[tuple[int, list]]) -> dict:
    """The k-th largest magnitude's bits, and which piece (by first element) keeps its last tie,
    how many ties that piece keeps (the pieces before it keep all of theirs, those after none)."""
    low, above = sparse.select(_total(got), f["k"] - f["above"])
    threshold = f["high"] << 16 | low
    ties = f["k"] - f["above"] - above
    before = 0
    for begin, (values, counts) in got:
        here = dict(zip(values, counts)).get(low, 0)
        if before + here >= ties:
            return {"threshold": threshold, "cut": begin, "keep": ties - before}
        before += here
    raise ValueError("magnitude-low: fewer ties than counted")  # the counts are the same elements'


def _total(got: list[tuple[int, list]]) -> dict[int, int]:
    total: dict[int, int] = {}
    for _, (values, counts) in got:
        for b, c in zip(values, counts):
            total[b] = total.get(b, 0) + c
    return total


def _abs_total(rows) -> sparse.AbsSum:
    total = sparse.AbsSum()
    for units, inf, nan in rows:
        total += sparse.AbsSum(int(units), inf, nan)
    return total


def _chunk_buffers(scratch: Any, *dtypes: type) -> tuple[np.ndarray, ...]:
    """One chunk-long buffer of each dtype, kept per thread (fresh pages are slow to touch)."""
    key = ("sparse", scratch.chunk, dtypes)
    if key not in scratch.staging:
        scratch.staging[key] = tuple(np.empty(scratch.chunk, t) for t in dtypes)
    return scratch.staging[key]


_BITS = (np.uint32, np.int64, np.float64)  # magnitude bits, and abs_sum's and the histograms' work buffers


def _row(scratch: Any, table: str, i: int, n: int) -> np.ndarray:
    """Row i, n elements, of a float32 table kept per thread (grown as needed: fresh pages are slow)."""
    rows = scratch.staging.get(table)
    if rows is None or rows.shape[0] <= i or rows.shape[1] < scratch.chunk:
        scratch.staging[table] = rows = np.empty((max(i + 1, 4), scratch.chunk), np.float32)
    return rows[i, :n]


def _chunks(operands: Operands, scratch: Any, n: int | None = None):
    """(lo, m, [(vector index, vector, its float32 delta at elements lo .. lo + m of the piece, as
    far as it reaches)]) for each chunk of the piece: the deltas live in the table _DELTAS, valid
    until the next chunk."""
    vecs = operands.vectors
    if n is None:
        n = len(operands.anchor) if operands.anchor is not None else max((len(v.a) for v in vecs), default=0)
    c = scratch.chunk
    with np.errstate(all="ignore"):
        for lo in range(0, n, c):
            m = min(c, n - lo)
            live = []
            for i, v in enumerate(vecs):
                p = min(m, len(v.a) - lo)
                if p <= 0:
                    continue
                d = _row(scratch, _DELTAS, i + 1, p)
                _widen(d, v.a[lo:lo + p])
                if v.b is not None:
                    y = _row(scratch, _DELTAS, 0, p)
                    _widen(y, v.b[lo:lo + p])
                    np.subtract(d, y, out=d)
                live.append((i, v, d))
            yield lo, m, live


# The statistics passes (docs/ARCHITECTURE.md: passes) and the facts each records per sparsified term.
_HIGH = Pass(HIGH, 10, records=("k", "high", "above"), bits=("high",))
_LOW = Pass(LOW, 20, records=("threshold", "cut", "keep"), bits=("threshold",))
_L1 = Pass(L1, 30, optional=("factor",), bits=("factor",))  # no factor where the norms are too small to rescale

_DENSITY = Parameter("density", "the fraction of each vector's elements kept", "fraction", 1.0, per_vector=True,
                     schedulable=True, mergekit="density")
_RESCALE = Parameter("rescale", "rescale what each vector keeps to its L1 norm", "flag", False, mergekit="rescale")
_SEED = Parameter("seed", "the seed of the random masks; the same seed gives the same bits on any cluster", "seed",
                  0, recorded=True)


class Ties(Sparse):
    name = "ties"
    sparsify, consensus, default_normalize, default_rescale = "magnitude", True, True, False
    statistics = (_HIGH, _LOW, _L1)
    parameters = (SCALE, _DENSITY, NORMALIZE.default_to(True), _RESCALE, LAMBDA)
    recipes = (mergekit_kind("ties"),)
    combining = True
    mergekit_ignores = ("int8_mask",)  # how mergekit holds its sign mask in memory


class DareTies(Sparse):
    name = "dare_ties"
    sparsify, consensus, default_normalize, default_rescale = "random", True, False, True
    statistics = (_L1,)
    parameters = (SCALE, _DENSITY, NORMALIZE, _RESCALE.default_to(True), LAMBDA, _SEED)
    recipes = (mergekit_kind("dare_ties"),)
    combining = True
    mergekit_ignores = ("int8_mask",)


class DareLinear(Sparse):
    name = "dare_linear"
    sparsify, consensus, default_normalize, default_rescale = "random", False, False, True
    statistics = (_L1,)
    parameters = (SCALE, _DENSITY, NORMALIZE, _RESCALE.default_to(True), LAMBDA, _SEED)
    recipes = (mergekit_kind("dare_linear"),)
    combining = True
    mergekit_ignores = ("int8_mask",)
