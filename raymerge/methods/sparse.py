"""TIES, DARE, breadcrumbs and DELLA: mergekit's generalized task arithmetic with sparsified deltas, in
mergekit's order.

For each vector i (delta_i = a_i - b_i in float32, or a stored vector a_i):
    sparsify: keep the `density` fraction of delta_i: TIES its largest magnitudes, DARE a random
              draw, breadcrumbs the magnitudes ranked just below its `gamma` fraction of largest
              ones (mergekit's magnitude_outliers); the rest become delta_i * 0. With `rescale`,
              multiply what is kept by
              sum|delta_i| / sum|kept| (mergekit's L1 rescale; skipped where either is below 1e-7).
    weigh:    wd_i = delta_i * weight_i
combine (ties, dare_ties, breadcrumbs_ties: sign consensus by sum):
    majority = +1 where sum_i wd_i >= 0, else -1;  mask_i = sign(wd_i) == majority
    mixed = sum_i wd_i * mask_i;  divisor = sum_i weight_i * mask_i (0 -> 1)
combine (dare_linear, breadcrumbs):  mixed = sum_i wd_i;  divisor = sum_i weight_i (|.| < 1e-8 -> 1)
    mixed /= divisor when normalizing;  mixed *= lambda;  out = round(anchor + mixed)
Sums over i run in the vectors' order, each operation rounded to float32, as mergekit 0.1.5
(`generalized_task_arithmetic.py`, `sparsify.py`) computes them.

Whole-tensor facts come from statistics passes (docs/ARCHITECTURE.md: passes), exact whatever the cut into items:
  - magnitude-high, magnitude-low: a radix selection of the k-th largest |delta| bits, k =
    max(1, int(density * n)) (ops.sparse). Magnitudes equal to that threshold are kept lowest flat
    index first, up to k in all: per-piece tie counts from the second pass say how many ties each
    piece keeps (mergekit keeps the ties its unstable argsort happens to put first).
    Breadcrumbs selects twice from the same histograms: it keeps the top t + target minus the top
    t (facts `top_*`), target = int(density * n), t = min(int(gamma * n), n - target), as mergekit
    keeps its ascending sort's ranks n - t - target .. n - t - 1 (ties ranked as TIES ranks them).
  - l1-norm: exact sums of |delta| before and after the drop, each rounded once to float32.
DARE's mask: ops.sparse.keep_mask, keyed by (seed, tensor name) and indexed by element.

Every step runs through a kernel's array primitives (ops/kernel.py), chunk by chunk, on per-thread
tables of the kernel's device (drawn on the host, DARE's mask is copied there); the statistics'
counts and sums are taken on the host. So any kernel gives the same bits, NaNs too: a NaN's bits
decide nothing (TIES ranks every NaN's magnitude as one, ops.sparse), and where the combined change
holds a NaN (its sum of squares is not finite), those elements are computed again with
numpy_kernel.EXACT, whose arithmetic has the kernels' NaN rule, before the anchor is added.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import numpy as np

from raymerge.methods.base import (ELEMENTWISE, LAMBDA, NORMALIZE, SCALE, Method, Operands, Parameter, Pass,
                                   mergekit_kind, param)
from raymerge.methods.steps import row_length
from raymerge.ops import native, sparse
from raymerge.ops.fused import discard, fused
from raymerge.ops.kernel import Sums, round_scalar
from raymerge.ops.numpy_kernel import EXACT

HIGH, LOW, L1 = "magnitude-high", "magnitude-low", "l1-norm"
LOW_ONLY = "where the high pass leaves a threshold open: keys wider than BF16's, or one in NaN's bin"  # `bin_facts`
_EPS = np.float32(1e-7)  # mergekit's: below it, a norm is not rescaled
# The kernel tables a thread's scratch keeps: deltas (row 0: a b, then a row per vector), keep masks (a row
# per vector), the combination's work rows, magnitude bits.
_DELTAS, _KEEPS, _WORK, _BITS = "sparse-deltas", "sparse-keeps", "sparse-work", "sparse-bits"
_TOPS = "sparse-tops"  # breadcrumbs: the top_k mask taken from a keep mask


class Sparse(Method):
    """One of mergekit's sparsifying task arithmetics; the subclasses are data."""

    sparsify: ClassVar[str | None]  # "magnitude" (TIES), "random" (DARE), "outliers" (breadcrumbs), None
    consensus: ClassVar[bool]  # elect a sign per element, by the sum of the weighted deltas
    # The magnitude selections of a term, by the prefix of their facts: TIES keeps its top k;
    # breadcrumbs its top k but the top top_k.
    selections: ClassVar[tuple[str, ...]] = ("",)

    def _ranks(self, term: Any, n: int) -> tuple[int, ...]:
        """How many of a term's n magnitudes each selection takes (module doc)."""
        return (max(1, int(term.density * n)),)

    def work(self, compute: str | None) -> str | None:
        """The dtype mergekit sparsifies in: the compute dtype's."""
        return compute

    def passes_for(self, tensor: Any) -> tuple[str, ...]:
        sparse_terms = self.sparsify is not None and any(0 < t.density < 1 for t in tensor.terms)
        passes = [HIGH, LOW] if sparse_terms and self.sparsify in ("magnitude", "outliers") else []
        if sparse_terms and self._rescale(tensor.params):
            passes.append(L1)
        return (*passes, ELEMENTWISE)

    def works_on(self, term: Any) -> bool:
        """Only a term that keeps a fraction of its elements has facts (a limit of 0: no piece reads it)."""
        return 0 < term.density < 1 and term.limit != 0

    def _rescale(self, params) -> bool:
        return bool(param(params, "rescale", self.default("rescale")))

    def _step(self, operands: Operands, scratch: Any) -> int:
        """The elements of each chunk of a piece."""
        return scratch.chunk

    # --- statistics -------------------------------------------------------------------------

    def statistic(self, kernel: Any, pass_name: str, operands: Operands, scratch: Any) -> list:
        """One piece's result, per term: HIGH a sparse histogram of the high 16 bits of |delta|
        ([bins], [counts]); LOW one of the low 16 bits inside each selection's high bin ([low
        bits], [counts], per selection: `selections`); L1 the exact sums of |delta| before and
        after the drop (AbsSum.to_json). The kernel that made the scratch computes the deltas and
        their magnitude bits; the counts and sums are the host's."""
        vecs = operands.vectors
        facts = operands.facts or {}
        bins = [[_fact(facts, v.term, f"{s}high") if _fact(facts, v.term, f"{s}k") else None
                 for s in self.selections] if pass_name == LOW else [] for v in vecs]
        wanted = [0 < v.density < 1 and (pass_name != LOW or _fact(facts, v.term, "k") is not None)
                  for v in vecs]
        high = [np.zeros(sparse.HIGH_BINS, np.int64) if w and pass_name == HIGH else None for w in wanted]
        # LOW: each selection's low halves in its bin, counted (None: no bin to look in)
        low = [[None if at is None else np.zeros(sparse.LOW_BINS, np.int64) for at in b] for b in bins]
        sums = [[sparse.AbsSum(), sparse.AbsSum()] for _ in vecs]
        bits = kernel.table(scratch, _BITS, 1, bits=True)[0]
        keeps = kernel.table(scratch, _KEEPS, len(vecs))
        work = _host_buffer(scratch)
        state = _TieState()
        for lo, _, live in _chunks(kernel, operands, scratch, step=self._step(operands, scratch)):
            for i, v, d in live:
                if not wanted[i] or (pass_name == LOW and not any(b is not None for b in bins[i])):
                    continue
                # Only a selection inside NaN's bin tells NaNs apart (ops.sparse): make them equal there.
                nans_equal = pass_name == LOW and sparse.NAN_BIN in bins[i]
                if pass_name == L1:  # the keep mask first: making it may use `bits` and the host buffer
                    keep = self._keep(kernel, v, d, keeps[i], operands, lo, facts, state, bits, scratch)
                    mask = kernel.to_host(keep, scratch)
                    mask = mask if mask is keep else mask.copy()  # a device's: b's to_host reuses its buffer
                b = kernel.to_host(kernel.magnitude_bits(d, bits[:len(d)], nans_equal), scratch)
                if pass_name == HIGH:
                    sparse.high_histogram(b, high[i], work[:b.size])
                elif pass_name == LOW:
                    for s, at in enumerate(bins[i]):
                        if at is not None:
                            sparse.count_lows(b, at, low[i][s])
                else:  # L1: before and after the drop (d * keep, which `_drop` makes), in one loop
                    before, after = sparse.abs_sums(b, mask)
                    sums[i][0] += before
                    sums[i][1] += after
        out: list = [None] * (1 + max((v.term for v in vecs), default=-1))  # by term: some may be absent here
        for i, v in enumerate(vecs):
            if not wanted[i]:
                continue
            if pass_name == HIGH:
                out[v.term] = sparse.nonzero_bins(high[i])
            elif pass_name == LOW:
                out[v.term] = [part for counts in low[i] for part in sparse.nonzero_bins(counts)]
            else:
                out[v.term] = [sums[i][0].to_json(), sums[i][1].to_json()]
        return out

    def needs(self, pass_name: str, facts: Any) -> bool:
        """LOW only where HIGH left a selection's threshold open (`bin_facts`)."""
        return pass_name != LOW or facts is None or any(
            f and f.get(f"{s}k") is not None and f"{s}threshold" not in f for f in facts for s in self.selections)

    def reduce(self, pass_name: str, tensor: Any, results: list[tuple[int, list]], facts: Any) -> Any:
        facts = [dict(f) if f else {} for f in (facts or [{}] * len(tensor.terms))]
        for j, term in enumerate(tensor.terms):
            got = [(begin, r[j]) for begin, r in sorted(results) if j < len(r) and r[j] is not None]
            if not got:
                continue
            if pass_name == HIGH:
                n = term.limit if term.limit is not None else math.prod(tensor.shape)
                counts = merged_counts(got)
                for s, k in zip(self.selections, self._ranks(term, n)):
                    high, above = sparse.select(counts, k) if k else (0, 0)  # k = 0: an empty selection
                    facts[j].update({f"{s}k": k, f"{s}high": high, f"{s}above": above})
                    if self.work(getattr(tensor, "compute", None)) == "BF16":  # 16-bit magnitudes
                        facts[j].update(bin_facts(facts[j], got, s))
            elif pass_name == LOW:
                for index, s in enumerate(self.selections):
                    empty = {f"{s}threshold": 0, f"{s}cut": 0, f"{s}keep": 0}
                    facts[j].update(threshold_facts(facts[j], [(b, r[2 * index:2 * index + 2]) for b, r in got], s)
                                    if facts[j][f"{s}k"] else empty)
            else:
                # Each sum rounded once to float32, then to the dtype mergekit sums in (its abs().sum()).
                compute = self.work(getattr(tensor, "compute", None))
                before = round_scalar(_abs_total(r[0] for _, r in got).to_float32(), compute)
                after = round_scalar(_abs_total(r[1] for _, r in got).to_float32(), compute)
                if not (before < _EPS or after < _EPS):
                    with np.errstate(all="ignore"):
                        facts[j]["factor"] = int(round_scalar(before / after, compute).view(np.uint32))
        return facts

    # --- the elementwise rule ---------------------------------------------------------------

    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        facts = operands.facts or {}
        normalize = self.value(operands, "normalize")
        lam = np.float32(self.value(operands, "lambda"))
        vecs = operands.vectors
        bits = kernel.table(scratch, _BITS, 1, bits=True)[0]
        keeps = kernel.table(scratch, _KEEPS, len(vecs))
        rows = kernel.table(scratch, _WORK, len(vecs) + 4)
        state = _TieState()
        total = Sums(0.0, 0.0, 0, 0)
        for lo, m, live in _chunks(kernel, operands, scratch, len(out), self._step(operands, scratch)):
            q = max((len(d) for _, _, d in live), default=0)
            parts = [(v, d, self._keep(kernel, v, d, keeps[i], operands, lo, facts, state, bits, scratch))
                     for i, v, d in live]
            with fused(kernel) as k:  # the mix's steps, one compiled loop where they can be
                terms = [(1.0, self._mix(k, parts, facts, normalize, lam, rows, q, operands.compute), None)] \
                    if q else []
                # read after it: the change alone (a NaN replay reads the keep masks and the deltas' lengths)
                discard(k, rows, *(d for _, d, _ in parts), keep=tuple(t[1] for t in terms))
            piece = (out[lo:lo + m], operands.anchor[lo:lo + m], terms, scratch)
            s = kernel.weighted_sum(*piece)
            # A change that holds a NaN has a sum of squares that is not finite: only then look for NaNs.
            if terms and not math.isfinite(s.ss_delta) and \
                    self._replay_nans(kernel, terms[0][1], parts, lo, facts, normalize, lam, scratch, operands.compute):
                s = kernel.weighted_sum(*piece)  # again, with the change's NaN bits made exact
            total = Sums(*(x + y for x, y in zip(total, s)))
        return total

    def _mix(self, kernel: Any, parts: list, facts: Any, normalize: bool, lam: np.float32, rows: Any,
             q: int, compute: str | None) -> Any:
        """The combined change of the chunk's first q elements (the module's doc: drop, rescale, weigh,
        combine, lambda) from each vector's (vector, delta, keep mask from `_keep`); the deltas are
        changed. rows: a table of len(parts) + 4 rows of q elements or more. With a compute dtype,
        each operation is rounded to it (`rnd`) where mergekit's is: its sums over the vectors are
        float32, rounded once, as torch's `sum(dim=0)` of them is."""
        def rnd(x: Any) -> Any:
            if compute is not None:
                kernel.round_to(x, compute)
            return x

        ds, weights = [], []
        for j, (v, d, keep) in enumerate(parts):
            self._drop(kernel, v, d, keep)
            factor = _fact(facts, v.term, "factor")
            if factor is not None:
                kernel.multiply(d, np.uint32(factor).view(np.float32), d)
                rnd(d)
            weights.append(round_scalar(v.scale, compute))  # mergekit's weights: a tensor of its dtype
            full = rows[j, :q]
            kernel.fill(full[len(d):], 0)  # past this vector's rows (an expanded vocabulary): it is absent
            kernel.multiply(d, weights[-1], full[:len(d)])
            ds.append(rnd(full))
        mixed = self._combine(kernel, ds, weights, normalize, rows, q, rnd, compute)
        if lam != 1:
            kernel.multiply(mixed, lam, mixed)
            rnd(mixed)
        return mixed

    def _combine(self, kernel: Any, ds: list, weights: list[np.float32], normalize: bool, rows: Any, q: int,
                 rnd, compute: str | None) -> Any:
        mixed, divisor, majority, mask = (rows[len(ds) + k, :q] for k in range(4))
        if not ds:
            return mixed
        # torch's sum over the vectors starts at +0.0: of deltas that are all -0.0 it gives +0.0
        kernel.fill(mixed, 0)
        if not self.consensus:
            for d in ds:
                kernel.add(mixed, d, mixed)
            rnd(mixed)
            if normalize:
                total = weights[0]
                for w in weights[1:]:
                    total = np.float32(total + w)
                total = round_scalar(total, compute)
                if not abs(total) < 1e-8:
                    kernel.divide(mixed, total, mixed)
                    rnd(mixed)
            return mixed
        kernel.copy(majority, ds[0])  # +1 where the weighted deltas sum to >= 0 (not NaN), else -1
        for d in ds[1:]:
            kernel.add(majority, d, majority)
        rnd(majority)  # a sum too small for the compute dtype rounds to a zero: its sign then counts as +
        kernel.greater_equal(majority, 0, majority)
        kernel.multiply(majority, 2, majority)
        kernel.subtract(majority, 1, majority)
        for i, (d, w) in enumerate(zip(ds, weights)):
            # sign(wd) == majority exactly where wd * majority > 0 (never for a zero or a NaN): 1.0 or 0.0
            kernel.multiply(d, majority, mask)
            kernel.greater(mask, 0, mask)
            kernel.multiply(d, mask, d)
            kernel.add(mixed, d, mixed)
            if i == 0:
                kernel.multiply(mask, w, divisor)
            else:
                kernel.multiply(mask, w, mask)
                kernel.add(divisor, mask, divisor)
        rnd(mixed)
        if normalize:
            rnd(divisor)
            kernel.equal(divisor, 0, mask)
            kernel.add(divisor, mask, divisor)  # mergekit: divisor[divisor == 0] = 1 (the others: + 0.0, exact)
            kernel.divide(mixed, divisor, mixed)
            rnd(mixed)
        return mixed

    def _replay_nans(self, kernel: Any, mixed: Any, parts: list, lo: int, facts: Any, normalize: bool,
                     lam: np.float32, scratch: Any, compute: str | None) -> bool:
        """Give the NaNs of the change `mixed` (the chunk at the piece's element lo) the bits of
        kernel.nan_rule's rule: `_mix` again over those elements alone, on the host, with EXACT (numpy's
        vector loops and a GPU pick NaN operands otherwise). Whether there were any."""
        at = np.flatnonzero(np.isnan(kernel.to_host(mixed, scratch)))
        if at.size == 0:
            return False
        again = []
        for v, d, keep in parts:
            inside = at[:np.searchsorted(at, len(d))]  # the vector covers the chunk's first len(d) elements
            x = kernel.gather(v.a, lo + inside)
            if v.b is not None:
                EXACT.subtract(x, kernel.gather(v.b, lo + inside), x)
                if compute is not None:
                    EXACT.round_to(x, compute)
            again.append((v, x, None if keep is None else kernel.gather(keep, inside)))
        rows = EXACT.table(EXACT.scratch(at.size), _WORK, len(parts) + 4)
        kernel.put(mixed, at, self._mix(EXACT, again, facts, normalize, lam, rows, at.size, compute))
        return True

    def keeps(self, tensor: Any) -> int:
        """Each sparsified vector's keep mask, a bit an element: the L1 pass's, for the output."""
        return 1 if L1 in self.passes_for(tensor) else 0

    def _keep(self, kernel: Any, v: Any, d: Any, keep: Any, operands: Operands, lo: int, facts: Any,
              state: _TieState, bits: Any, scratch: Any) -> Any:
        """Vector v's keep mask at the piece's elements lo .., 1.0 or 0.0 (the product is mergekit's
        `delta * mask`), in `keep`, a row of its own (a NaN replay reads it again); None where the
        density keeps everything or nothing (`_drop`), or nothing is dropped (task arithmetic). The
        mask the piece's L1 pass kept where one arrived (`kept_bits`), else made here and kept."""
        if self.sparsify is None or not 0 < v.density < 1:
            return None
        keep = keep[:len(d)]
        name = f"keep-{v.term}"
        if kept_bits(kernel, operands, name, keep, lo):
            return keep
        self._mask(kernel, v, d, keep, operands, lo, facts, state, bits, scratch)
        if operands.keep is not None:
            keep_bits(operands, name, kernel.to_host(keep, scratch) != 0, lo)
        return keep

    def _mask(self, kernel: Any, v: Any, d: Any, keep: Any, operands: Operands, lo: int, facts: Any,
              state: _TieState, bits: Any, scratch: Any) -> None:
        """`_keep`'s mask, made: drawn (DARE, della) or selected (TIES, breadcrumbs)."""
        if self.sparsify == "della":
            kernel.from_host(keep, self._della_mask(kernel, v, d, operands, lo, scratch))
            return
        if self.sparsify == "random":
            seed = int(self.value(operands, "seed"))
            kernel.from_host(keep, sparse.keep_mask(sparse.philox_key(seed, operands.name), operands.begin + lo,
                                                    len(d), sparse.keep_threshold(v.density)))
            return
        top_mask(kernel, d, keep, facts[v.term], "", operands.begin, state.seen, v.term, bits, scratch)
        if "top_" in self.selections:  # breadcrumbs: less its top_k (a subset of its top k: ties rank alike)
            top = kernel.table(scratch, _TOPS, 1)[0][:len(d)]
            top_mask(kernel, d, top, facts[v.term], "top_", operands.begin, state.seen, v.term, bits, scratch)
            kernel.subtract(keep, top, keep)

    def _drop(self, kernel: Any, v: Any, d: Any, keep: Any) -> None:
        """d (vector v's delta) *= its keep mask (`_keep`), in place."""
        if self.sparsify is None or v.density >= 1:
            return
        if v.density <= 0:
            if self.sparsify in ("magnitude", "della"):
                kernel.fill(d, 0)  # mergekit: zeros_like
            else:
                kernel.multiply(d, 0, d)
            return
        kernel.multiply(d, keep, d)


def top_mask(kernel: Any, d: Any, mask: Any, f: dict, s: str, begin: int, seen: dict, term: int, bits: Any,
             scratch: Any) -> None:
    """mask = 1.0 where d (a piece's chunk from its element begin) is among the top f[s + "k"]
    magnitudes of the whole tensor, else 0.0 (selection s's facts)."""
    if not f[f"{s}k"]:
        kernel.fill(mask, 0)
        return
    # No magnitude lies above a NaN's: a threshold past it (from damaged facts) compares as this one does.
    threshold = min(f[f"{s}threshold"], sparse.NAN_MAGNITUDE + 1)
    # Below NaN's magnitude, a comparison with the threshold treats every NaN alike whatever its bits.
    nans_equal = threshold >= sparse.NAN_MAGNITUDE
    # The ties at the threshold: all kept before the piece that holds the last kept one, none after.
    inclusive, cut = begin < f[f"{s}cut"], begin == f[f"{s}cut"]
    ties = sparse.magnitude_above(d, threshold, inclusive, nans_equal, mask)  # one compiled loop, on the host
    if ties is None:
        b = kernel.magnitude_bits(d, bits[:len(d)], nans_equal=nans_equal)
        (kernel.greater_equal if inclusive else kernel.greater)(b, threshold, mask)
    if not cut:
        return
    left = f[f"{s}keep"] - seen.get((term, s), 0)
    if ties is None or (ties and left > 0):  # where the ties are, to keep the first `left` of them
        if ties is not None:
            b = kernel.magnitude_bits(d, bits[:len(d)], nans_equal=nans_equal)
        tied = np.flatnonzero(kernel.to_host(b, scratch) == threshold)
        kernel.put(mask, tied[:max(left, 0)], 1.0)
        ties = tied.size
    seen[(term, s)] = seen.get((term, s), 0) + ties


class _TieState:
    """Ties at the threshold seen so far in a piece, per (term, selection): the piece keeps the first ones."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, str], int] = {}


def _fact(facts: Any, term: int, key: str) -> Any:
    return facts[term].get(key) if facts and term < len(facts) and facts[term] else None


def threshold_facts(f: dict, got: list[tuple[int, list]], s: str = "") -> dict:
    """Selection s's k-th largest magnitude's bits, and which piece (by first element) keeps its
    last tie, how many ties that piece keeps (the pieces before it keep all of theirs, those after
    none), from the LOW pass's histograms of the low halves in its HIGH bin."""
    k, above_bin = f[f"{s}k"], f[f"{s}above"]
    low, above = sparse.select(merged_counts(got), k - above_bin)
    return _ties_kept(s, f[f"{s}high"] << 16 | low, k - above_bin - above, got, low)


def bin_facts(f: dict, got: list[tuple[int, list]], s: str = "") -> dict:
    """`threshold_facts` from the HIGH pass's histograms alone, where the magnitudes are 16-bit keys
    (BF16 values: every low half 0), so the selection's bin holds one magnitude, unless it is NaN's
    bin (+inf's too, which the LOW pass tells apart): then nothing, and the LOW pass runs."""
    if not f[f"{s}k"]:
        return {f"{s}threshold": 0, f"{s}cut": 0, f"{s}keep": 0}
    high = f[f"{s}high"]
    if high == sparse.NAN_BIN:
        return {}
    return _ties_kept(s, high << 16, f[f"{s}k"] - f[f"{s}above"], got, high)


def _ties_kept(s: str, threshold: int, ties: int, got: list[tuple[int, list]], key: int) -> dict:
    """Selection s's facts: where its `ties` kept magnitudes equal to the threshold end, the pieces'
    histograms (`got`, by first element) counting them in bin `key`."""
    before = 0
    for begin, (values, counts) in got:
        here = counts[values.index(key)] if key in values else 0
        if before + here >= ties:
            return {f"{s}threshold": threshold, f"{s}cut": begin, f"{s}keep": ties - before}
        before += here
    raise ValueError("magnitude-low: fewer ties than counted")  # the counts are the same elements'


def merged_counts(got: list[tuple[int, list]]) -> dict[int, int]:
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


def _host_buffer(scratch: Any) -> np.ndarray:
    """The host's work buffer of the histograms, int64, a chunk long, kept per thread (fresh pages
    are slow to touch)."""
    key = ("sparse-host", scratch.chunk)
    if key not in scratch.staging:
        scratch.staging[key] = np.empty(scratch.chunk, np.int64)
    return scratch.staging[key]


def _chunks(kernel: Any, operands: Operands, scratch: Any, n: int | None = None, step: int | None = None):
    """(lo, m, [(vector index, vector, its float32 delta at elements lo .. lo + m of the piece, as
    far as it reaches)]) for each chunk of the piece, `step` elements each (at most the scratch's
    chunk, its default): the deltas are rows of the kernel's table _DELTAS, valid until the next chunk."""
    vecs = operands.vectors
    if n is None:
        n = len(operands.anchor) if operands.anchor is not None else max((len(v.a) for v in vecs), default=0)
    c = step or scratch.chunk
    rows = kernel.table(scratch, _DELTAS, len(vecs) + 1)
    with np.errstate(all="ignore"):  # numpy's warnings: overflows and NaNs are data here
        for lo in range(0, n, c):
            m = min(c, n - lo)
            live = []
            with fused(kernel) as k:  # the deltas' steps, one compiled loop where they can be
                for i, v in enumerate(vecs):
                    p = min(m, len(v.a) - lo)
                    if p <= 0:
                        continue
                    d = rows[i + 1, :p]
                    k.widen(d, v.a[lo:lo + p], scratch)
                    if v.b is not None:
                        y = rows[0, :p]
                        k.widen(y, v.b[lo:lo + p], scratch)
                        k.subtract(d, y, d)
                        operands.rounded(k, d)  # mergekit's delta, in its compute dtype
                    live.append((i, v, d))
                discard(k, rows[0])  # b widened: read by the deltas' steps alone
            yield lo, m, live


# The statistics passes (docs/ARCHITECTURE.md: passes) and the facts each records per sparsified term.
# Breadcrumbs' second selection records top_* facts too (a TIES tensor has none: `Breadcrumbs.facts_problem`).
_TOP_HIGH, _TOP_LOW = ("top_k", "top_high", "top_above"), ("top_threshold", "top_cut", "top_keep")
_HIGH = Pass(HIGH, 10, records=("k", "high", "above", *_TOP_HIGH), optional=_TOP_HIGH, bits=("high", "top_high"))
_LOW = Pass(LOW, 20, records=("threshold", "cut", "keep", *_TOP_LOW), optional=_TOP_LOW,
            bits=("threshold", "top_threshold"), only=LOW_ONLY)
_L1 = Pass(L1, 30, optional=("factor",), bits=("factor",))  # no factor where the norms are too small to rescale

_DENSITY = Parameter("density", "the fraction of each vector's elements kept", "fraction", 1.0, per_vector=True,
                     schedulable=True, mergekit="density")
_RESCALE = Parameter("rescale", "rescale what each vector keeps to its L1 norm", "flag", False, mergekit="rescale")
_SEED = Parameter("seed", "the seed of the random masks; the same seed gives the same bits on any cluster", "seed",
                  0, recorded=True)


class Ties(Sparse):
    name = "ties"
    sparsify, consensus = "magnitude", True
    statistics = (_HIGH, _LOW, _L1)
    parameters = (SCALE, _DENSITY, NORMALIZE.default_to(True), _RESCALE, LAMBDA)
    recipes = (mergekit_kind("ties"),)
    combining = True
    mergekit_ignores = ("int8_mask",)  # how mergekit holds its sign mask in memory


class _Dare(Sparse):
    """DARE: a random draw keeps each vector's `density` fraction, rescaled by default."""

    sparsify = "random"
    statistics = (_L1,)
    parameters = (SCALE, _DENSITY, NORMALIZE, _RESCALE.default_to(True), LAMBDA, _SEED)
    combining = True
    mergekit_ignores = ("int8_mask",)


class DareTies(_Dare):
    name = "dare_ties"
    consensus = True
    recipes = (mergekit_kind("dare_ties"),)


class DareLinear(_Dare):
    name = "dare_linear"
    consensus = False
    recipes = (mergekit_kind("dare_linear"),)


_GAMMA = Parameter("gamma", "the fraction of each vector's largest magnitudes dropped as outliers (breadcrumbs)",
                   "fraction", 0.01, per_vector=True, schedulable=True, mergekit="gamma")


class Breadcrumbs(Sparse):
    """Model Breadcrumbs: each vector keeps `density` of its magnitudes, those ranked just below its
    largest `gamma` fraction (mergekit's magnitude_outliers)."""

    name = "breadcrumbs"
    sparsify, consensus = "outliers", False
    selections = ("", "top_")
    statistics = (_HIGH, _LOW, _L1)
    parameters = (SCALE, _DENSITY, _GAMMA, NORMALIZE, _RESCALE, LAMBDA)
    recipes = (mergekit_kind("breadcrumbs"),)
    combining = True
    mergekit_ignores = ("int8_mask",)

    def _ranks(self, term: Any, n: int) -> tuple[int, ...]:
        # mergekit: target = int(density n), n_top = int(gamma n), n_bot = max(0, n - target - n_top);
        # it keeps the ascending ranks n_bot .. n_bot + target - 1, so drops the top n - n_bot - target.
        target = int(term.density * n)
        top = min(int(term.param("gamma", self.default("gamma")) * n), n - target)
        return top + target, top

    def facts_problem(self, tensor: Any, facts: Any, passes: list[str]) -> str | None:
        problem = super().facts_problem(tensor, facts, passes)
        if problem is None:
            needed = (_TOP_HIGH if HIGH in passes else ()) + (_TOP_LOW if LOW in passes else ())
            for j, (term, f) in enumerate(zip(tensor.terms, facts)):
                missing = [k for k in needed if self.works_on(term) and k not in (f or {})]
                if missing:
                    return f"vector {j + 1} has no {', '.join(missing)}"
        return problem


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    consensus = True
    recipes = (mergekit_kind("breadcrumbs_ties"),)


_EPSILON = Parameter("epsilon", "how far della's keep probabilities spread around the density, by magnitude rank "
                     "in each row", "fraction", 0.15, per_vector=True, schedulable=True, mergekit="epsilon")


class Della(Sparse):
    """DELLA: each vector keeps each element at random, with a probability from density - epsilon
    (the smallest magnitude of its row) to density + epsilon (the largest), rescaled by default."""

    name = "della"
    sparsify, consensus = "della", True
    statistics = (_L1,)
    parameters = (SCALE, _DENSITY, _EPSILON, NORMALIZE.default_to(True), _RESCALE.default_to(True), LAMBDA, _SEED)
    recipes = (mergekit_kind("della"),)
    combining = True
    mergekit_ignores = ("int8_mask",)
    whole_rows = True  # a magnitude's rank is in its row: a piece holds whole rows

    def work(self, compute: str | None) -> str | None:
        # mergekit's della_magprune works in bf16 for a bf16 tensor (on the CPU), else in float32
        return compute if compute == "BF16" else None

    def check(self, tensor: Any) -> str | None:
        if len(tensor.shape) > 2:
            return (f"{self.name} ranks magnitudes along each row of a tensor of one or two dimensions; this one has "
                    f"{len(tensor.shape)} (skip it, or use another method)")
        for j, term in enumerate(tensor.terms):
            density, epsilon = term.density, term.param("epsilon", self.default("epsilon"))
            if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
                return (f"vector {j + 1}: density {density:g} +/- epsilon {epsilon:g} must lie inside (0, 1), as "
                        f"mergekit requires; give an epsilon below {min(density, 1 - density):g}")
        return None

    def _step(self, operands: Operands, scratch: Any) -> int:
        """Whole rows, where a chunk holds one: each chunk's deltas are then its rows' (`_della_mask`)."""
        row = row_length(operands.shape)
        return scratch.chunk // row * row or scratch.chunk

    def _della_mask(self, kernel: Any, v: Any, d: Any, operands: Operands, lo: int, scratch: Any) -> np.ndarray:
        """Vector v's keep mask (bool) of the elements of its delta d (the piece's from element lo), drawn."""
        n, row = len(d), row_length(operands.shape)
        start = operands.begin + lo  # the tensor's element at d[0]
        first, last = start - start % row, -(-(start + n) // row) * row
        if first < operands.begin or last - operands.begin > len(v.a):
            raise ValueError(f"{self.name}: a piece holds part of a row of {operands.name}; its items must be cut at "
                             "row boundaries")
        if first == start and last == start + n:  # d holds whole rows (`_step`)
            x = kernel.to_host(d, scratch)
        else:  # the rows that hold d's elements, read again: a slice, not indices
            at = slice(first - operands.begin, last - operands.begin)
            x = kernel.gather(v.a, at)
            if v.b is not None:
                with np.errstate(all="ignore"):
                    x = x - kernel.gather(v.b, at)
                if operands.compute is not None:
                    EXACT.round_to(x, operands.compute)  # mergekit's delta, in its compute dtype
        below = rank_thresholds(row, v.density, v.param("epsilon", self.default("epsilon")), self.work(operands.compute))
        words = sparse.random_words(sparse.philox_key(int(self.value(operands, "seed")), operands.name, "della"),
                                    first, last - first)
        return della_mask(x.reshape(-1, row), below, words)[start - first:start - first + n]


class DellaLinear(Della):
    name = "della_linear"
    consensus = False
    parameters = (SCALE, _DENSITY, _EPSILON, NORMALIZE, _RESCALE.default_to(True), LAMBDA, _SEED)
    recipes = (mergekit_kind("della_linear"),)


def keep_bits(operands: Operands, name: str, mask: np.ndarray, lo: int) -> None:
    """Keep a chunk's mask (bool, from the piece's element lo) for the item's next pass, a bit an
    element, by chunk (docs/ARCHITECTURE.md: values kept between passes)."""
    if operands.keep is not None:
        operands.keep.setdefault(name, {})[lo] = (mask.size, np.packbits(mask))


def kept_bits(kernel: Any, operands: Operands, name: str, out: Any, lo: int) -> bool:
    """out = the mask an earlier pass kept (`keep_bits`) of the chunk at element lo, as 1.0 and 0.0;
    False, out untouched, where none was carried for a chunk of that size there."""
    m, packed = ((operands.carried or {}).get(name) or {}).get(lo, (None, None))
    if m != len(out):
        return False
    kernel.from_host(out, np.unpackbits(packed, count=m).view(np.bool_))
    return True


def della_mask(rows: np.ndarray, below: np.ndarray, words: np.ndarray) -> np.ndarray:
    """words < below[r] for each element of rows (float32, 2-D; words: uint32, one each), r its
    rank in its row (`della_ranks`): compiled in one loop where raymerge/ops/_native.c was built."""
    flat = rows.reshape(-1)
    if native.takes(flat, np.float32) and native.takes(below, np.uint64) and native.takes(words, np.uint32):
        out = np.empty(flat.size, np.bool_)
        native.loops.della_keep(flat, rows.shape[1], below, words, out)
        return out
    return words < below[della_ranks(rows).reshape(-1)]


def della_ranks(rows: np.ndarray) -> np.ndarray:
    """Each element's rank in its row by magnitude (ascending; equal magnitudes ranked lowest index
    first, NaNs above every number), int32."""
    bits = sparse.magnitude_bits(rows.reshape(-1), np.empty(rows.size, np.uint32), nans_equal=True).reshape(rows.shape)
    if not (bits & 0xFFFF).any():  # bf16 values (and no NaN: its magnitude has a low bit)
        bits = (bits >> 16).astype(np.uint16)  # half the bytes to sort, in the same order
    return sparse.row_ranks(bits)


def della_probabilities(rows: np.ndarray, density: float, epsilon: float, work: str | None) -> np.ndarray:
    """Each element's keep probability (float32) from its magnitude's rank in its row
    (`della_ranks`): `rank_probabilities` of its rank."""
    return rank_probabilities(rows.shape[1], density, epsilon, work)[della_ranks(rows)]


@functools.lru_cache(maxsize=64)
def rank_thresholds(n: int, density: float, epsilon: float, work: str | None) -> np.ndarray:
    """Per rank, the count of 32-bit words that keep it: floor(p * 2**32) of `rank_probabilities`
    (exact: a float32 times a power of two), as uint64; a word below it keeps the element. A NaN
    probability (a one-element row's 0 / 0) keeps nothing, as a comparison with NaN is false."""
    p = rank_probabilities(n, density, epsilon, work).astype(np.float64)
    t = np.floor(np.where(p > 0, p, 0.0) * 2.0**32).astype(np.uint64)  # NaN, or below 0: never kept
    t.setflags(write=False)
    return t


@functools.lru_cache(maxsize=64)
def rank_probabilities(n: int, density: float, epsilon: float, work: str | None) -> np.ndarray:
    """The keep probability of each ascending rank 0 .. n - 1 in a row of n, each operation rounded
    to the work dtype as mergekit's della_magprune rounds it: ranks r + 1, norm = (r - min) / (max -
    min) clamped to [0, 1], p = (density - epsilon) + norm * 2 * epsilon (torch rounds the number it
    adds to the tensor's dtype first, and multiplies by one in float32). Every row of n has the
    same table (its ranks are 0 .. n - 1), so it is made once."""
    def rnd(x: np.ndarray) -> np.ndarray:
        if work is not None:
            EXACT.round_to(x, work)
        return x

    with np.errstate(all="ignore"):  # a one-element row: 0 / 0, as in mergekit
        ranks = rnd(rnd(np.arange(n, dtype=np.float32)) + np.float32(1))
        low, high = ranks.min(), ranks.max()
        norm = rnd(rnd(ranks - low) / rnd(np.float32([high - low])))
        norm = np.where(np.isnan(norm), norm, np.clip(norm, np.float32(0), np.float32(1)))
        p = rnd(rnd(norm * np.float32(2)) * np.float32(epsilon))  # torch multiplies by epsilon as float32
        # but adds a number in the tensor's dtype: (density - epsilon) rounded to bf16 first
        p = rnd(round_scalar(density - epsilon, work) + p)
    p.setflags(write=False)
    return p
