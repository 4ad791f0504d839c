"""mergekit's Arcee Fusion (`arcee_fusion`; mergekit 0.1.5 `merge_methods/arcee_fusion.py`): the
other model's change is taken where it matters most, judged by each element's importance:

    importance = |other - base| * KL(softmax(other) + 1e-8 || softmax(base) + 1e-8)
                 (softmax and KL over each row: the last dimension; a 1-D tensor is one row)
    threshold  = median + 1.5 * (q3 - q1) of the tensor's importances
    out        = base + (other - base) * [importance >= threshold]

Each row's softmax and KL are torch's own operations on the row in the compute dtype (so they
give mergekit's bits): the planner cuts the method's items at row boundaries (`whole_rows`), and a
chunk computes the rows it touches. The quartiles are exact order statistics of the whole tensor,
`sorted[int(q * (n - 1))]`, found by a radix selection over keys ordered as the values are
(`fusion-high`, `fusion-low`; in BF16 a key's high half tells its low half, so the high pass
alone gives them); mergekit sorts a random sample of 1M elements instead where a tensor
is larger (unseeded), so only smaller tensors can match it bit for bit. The mask is float32 in
mergekit, which makes the result float32 (`result_float32`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raymerge.methods.base import Method, Operands, Pass, mergekit_kind
from raymerge.methods.steps import (bits, chunks, counted, past_rows, quiet, replay_nans, row_length, step, value,
                                    vector_length, widen_rows)
from raymerge.ops import native, sparse
from raymerge.ops.kernel import round_scalar
from raymerge.ops.numpy_kernel import EXACT

HIGH, LOW = "fusion-high", "fusion-low"
_KL = "kl"  # what a pass keeps for the next: its rows' divergences (`_divergences`)
QUANTILES = (0.25, 0.5, 0.75)
_ROWS = "fusion-rows"
_BINS = 1 << 16  # the high 16 bits of a key


class ArceeFusion(Method):
    name = "arcee_fusion"
    statistics = (Pass(HIGH, 98, records=("ranks", "high", "above")),
                  Pass(LOW, 99, records=("quartiles", "threshold"), only="where the keys are wider than BF16's"))
    recipes = (mergekit_kind("arcee_fusion", single=True),)
    whole_rows = True
    result_float32 = True

    def facts_problem(self, tensor: Any, facts: Any, passes: list[str]) -> str | None:
        if not passes:
            return None
        if not (isinstance(facts, list) and len(facts) == len(tensor.terms) and isinstance(facts[0], dict)):
            return "expected a list, one entry per vector, the first an object"
        for name in passes:
            for key in {HIGH: ("ranks", "high", "above"), LOW: ("quartiles",)}[name]:
                x = facts[0].get(key)
                if not (isinstance(x, list) and len(x) == 3 and all(isinstance(v, int) and 0 <= v < 2**62 for v in x)):
                    return f"vector 1's {key}: expected 3 counts"
        if LOW in passes and not (isinstance(facts[0].get("threshold"), int) and 0 <= facts[0]["threshold"] < 2**32):
            return "vector 1's threshold: expected a float32 bit pattern"
        return None

    # --- statistics ------------------------------------------------------------------------------

    @quiet
    def statistic(self, kernel: Any, pass_name: str, operands: Operands, scratch: Any) -> list:
        if not operands.vectors:
            return []
        f = (operands.facts or [None])[0] or {}
        histogram = np.zeros(_BINS, np.int64)
        low = [np.zeros(sparse.LOW_BINS, np.int64) for _ in range(3)] if pass_name != HIGH else []
        for at, m in chunks(vector_length(operands), scratch):
            keys = order_keys(_importance(kernel, operands, at, m))
            if pass_name == HIGH:
                sparse.count_highs(keys, histogram)
            else:
                for j, high in enumerate(f["high"]):
                    sparse.count_lows(keys, high, low[j])
        if pass_name == HIGH:
            return [sparse.nonzero_bins(histogram)]
        return [[sparse.nonzero_bins(counts) for counts in low]]

    def keeps(self, tensor: Any) -> float:
        """Each row's divergence, a float32 (`_divergences`)."""
        row = row_length(tensor.shape)
        return 4 / row if row else 0  # no element: nothing kept

    def needs(self, pass_name: str, facts: Any) -> bool:
        """LOW only where HIGH left the quartiles open (wider keys than BF16's)."""
        return pass_name != LOW or not facts or "threshold" not in (facts[0] or {})

    def reduce(self, pass_name: str, tensor: Any, results: list[tuple[int, list]], facts: Any) -> Any:
        facts = [dict(f) if f else {} for f in (facts or [{}] * len(tensor.terms))]
        f = facts[0]
        got = [r[0] for _, r in sorted(results) if r]
        if pass_name == HIGH:
            counts: dict[int, int] = {}
            for values, n in got:
                for b, c in zip(values, n):
                    counts[b] = counts.get(b, 0) + c
            n = sum(counts.values())
            # mergekit: sorted[int(q * (n - 1))], q a float32 tensor times n - 1 (float32), truncated
            ranks = [int(np.float32(q) * np.float32(n - 1)) for q in QUANTILES]
            picks = [sparse.select(counts, n - r) for r in ranks]  # the (n - r)-th largest is the r-th smallest
            f.update(ranks=ranks, high=[h for h, _ in picks], above=[a for _, a in picks], n=n)
            if tensor.compute == "BF16":  # each key's high half tells its low half: no LOW pass (`needs`)
                f["quartiles"] = [h << 16 | bf16_low(h) for h in f["high"]]
                f["threshold"] = _threshold([key_value(k) for k in f["quartiles"]], tensor.compute)
        else:
            keys = []
            for j in range(3):
                counts = {}
                for part in got:
                    for b, c in zip(*part[j]):
                        counts[b] = counts.get(b, 0) + c
                low, _ = sparse.select(counts, f["n"] - f["ranks"][j] - f["above"][j])
                keys.append(f["high"][j] << 16 | low)
            f["quartiles"] = keys
            f["threshold"] = _threshold([key_value(k) for k in keys], tensor.compute)
        return facts

    # --- the elementwise rule ------------------------------------------------------------------

    @quiet
    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        f = (operands.facts or [None])[0] or {}
        v = operands.vectors[0] if operands.vectors else None
        n = vector_length(operands)
        inputs = [v.b, v.a] if v is not None else []
        sums = past_rows(kernel, out, operands, scratch, n)
        threshold = value(f["threshold"]) if n else None
        for at, m in chunks(n, scratch):
            mask = (_importance(kernel, operands, at, m) >= threshold).astype(np.float32)  # NaN: not kept

            def rule(k: Any, base: Any, other: Any, keep: Any) -> Any:
                operands.rounded(k, step(k.subtract, other, base, other))  # mergekit's change, in its dtype
                k.multiply(other, keep, other)  # times the float32 mask: float32 from here on
                return step(k.add, base, other, base)

            base, other, keep = widen_rows(kernel, scratch, _ROWS, inputs, at, m, spare=1)
            kernel.from_host(keep, mask)
            result = rule(kernel, base, other, keep)
            replay_nans(kernel, result, scratch, inputs, at, lambda k, xs, idx: rule(k, *xs, mask[idx]), indexed=True)
            sums = counted(sums, kernel.weighted_sum(out[at:at + m], result, [], scratch))
        return sums


def order_keys(x: np.ndarray) -> np.ndarray:
    """uint32 keys ordered as the float32 values x are, as torch sorts them: -0.0 equal to +0.0,
    every NaN above everything (one key). Compiled where raymerge/ops/_native.c was built."""
    if native.takes(x, np.float32):
        keys = np.empty(x.size, np.uint32)
        native.loops.order_keys(x, keys)
        return keys
    x = x + np.float32(0)  # -0.0 + 0.0 is +0.0
    b = x.view(np.uint32)
    keys = np.where(b >> 31 != 0, ~b, b | np.uint32(0x80000000)).astype(np.uint32)
    keys[np.isnan(x)] = 0xFFFFFFFF
    return keys


def bf16_low(high: int) -> int:
    """The low half of the order key (`order_keys`) of a BF16 value whose key's high half is `high`:
    a BF16 value's float32 bits have a low half of 0, which a negative value's key inverts; every
    NaN's key is all ones (no number's key has the high half 0xFFFF: those bits are a NaN's)."""
    return 0xFFFF if high < 0x8000 or high == 0xFFFF else 0


def key_value(key: int) -> float:
    """The float32 value of an order key (`order_keys`), as a Python float."""
    b = key & 0x7FFFFFFF if key >> 31 else ~key & 0xFFFFFFFF
    return float(np.uint32(b).view(np.float32))


def _importance(kernel: Any, operands: Operands, at: int, m: int) -> np.ndarray:
    """The importance of the piece's elements at .. at + m (float32, on the host): the rows that
    hold them, whole (the piece holds whole rows: `whole_rows`), with their divergences."""
    v, shape = operands.vectors[0], operands.shape
    row = row_length(shape)
    start = operands.begin + at
    first, last = start - start % row, -(-(start + m) // row) * row
    if first < operands.begin or last - operands.begin > len(v.a):
        raise ValueError(f"arcee_fusion: a piece holds part of a row of {operands.name}; its items must be cut at "
                         "row boundaries")
    where = slice(first - operands.begin, last - operands.begin)  # the whole rows
    other, base = kernel.gather(v.a, where), kernel.gather(v.b, where)
    kl = _divergences(operands, other, base, row, slice(where.start // row, where.stop // row))
    return importance(other, base, kl, row, operands.compute)[start - first:start - first + m]


def _divergences(operands: Operands, other: np.ndarray, base: np.ndarray, row: int, rows: slice) -> np.ndarray:
    """The KL divergences of the piece's `rows` (`divergences`): those an earlier pass kept, else
    computed, and kept for the next passes (docs/ARCHITECTURE.md: values kept between passes), so
    that only the first pass pays for torch's softmax; 4 bytes a row."""
    kept = (operands.carried or {}).get(_KL)
    if kept is not None and rows.stop <= len(kept):  # a pass keeps every row of the piece it reads
        return kept[rows]
    kl = divergences(other, base, row, operands.compute)
    if operands.keep is not None:
        store = operands.keep.get(_KL)
        if store is None:
            store = operands.keep[_KL] = np.empty(vector_length(operands) // row, np.float32)
        store[rows] = kl
    return kl


def divergences(other: np.ndarray, base: np.ndarray, row: int, compute: str | None) -> np.ndarray:
    """mergekit's KL(softmax(other) + 1e-8 || softmax(base) + 1e-8) of each of the whole rows
    (float32 arrays holding values of the compute dtype), with torch's operations on tensors of
    that dtype; float32 on the host, a value per row."""
    import torch
    import torch.nn.functional as F

    from raymerge.methods.steps import torch_dtype

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)  # a worker's items compute in threads of their own; torch's pool per core costs memory
    dtype = torch_dtype(compute)
    o, b = (torch.from_numpy(x).reshape(-1, row).to(dtype) for x in (other, base))
    p = F.softmax(o, dim=-1) + 1e-8
    q = F.softmax(b, dim=-1) + 1e-8
    return torch.sum(p * torch.log(p / q), dim=-1).float().numpy()


def importance(other: np.ndarray, base: np.ndarray, kl: np.ndarray, row: int, compute: str | None) -> np.ndarray:
    """mergekit's |other - base| * kl of whole rows (float32 arrays of compute-dtype values, kl one
    per row), each operation rounded to the compute dtype as torch's on tensors of it is (a
    product of two BF16 or F16 values is exact in float32: rounded once); float32."""
    with np.errstate(all="ignore"):  # overflows and NaNs are data here
        x = np.subtract(other, base)
        if compute is not None:
            EXACT.round_to(x, compute)
        np.abs(x, out=x)
        np.multiply(x.reshape(-1, row), kl[:, None], out=x.reshape(-1, row))
    if compute is not None:
        EXACT.round_to(x, compute)
    return x


def _threshold(quartiles: list[float], compute: str | None) -> int:
    """median + 1.5 * (q3 - q1) as mergekit computes it on tensors of the compute dtype: torch
    computes each operation in float32 and rounds it to that dtype (the product by 1.5 of a BF16 or
    F16 value is exact in float32); its bits."""
    q1, median, q3 = (round_scalar(q, compute) for q in quartiles)
    with np.errstate(all="ignore"):
        spread = round_scalar(np.float32(1.5) * round_scalar(q3 - q1, compute), compute)
        return bits(float(round_scalar(median + spread, compute)))
