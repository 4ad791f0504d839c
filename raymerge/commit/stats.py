"""Per-tensor statistics of the change a run made, as a Parquet table next to the manifest.

`delta_norm` = the norm of what the output differs from its anchor by, in float32 before it is
added and rounded (the chat vector's ||sum_i scale_i * (a_i - b_i)||; TIES' and DARE's combined,
sparsified change); for a method without an anchor (extract, mergekit's linear) the change is from
zero: the norm of the float32 output before rounding. `anchor_norm` = ||anchor|| (cp, the base;
empty without one), `relative` = their ratio: what chat-vector users look at to choose a scale. `nonfinite` counts the tensor's inf/NaN output
elements, `nonfinite_new` those made from finite inputs (an overflowing dtype or scale).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from raymerge.errors import OutputError
from raymerge.planning.plan import Plan
from raymerge.records import ItemRecord, TensorSums
from raymerge.safetensors.dtypes import numel
from raymerge.untrusted import shown

if TYPE_CHECKING:  # pyarrow is imported where it is used: every worker imports this package, none needs it
    import pyarrow as pa

STATS_NAME = "raymerge_stats.parquet"


def tensor_stats(plan: Plan, done: dict[int, ItemRecord]) -> pa.Table:
    """Sum the workers' per-piece sums into one row per tensor."""
    import pyarrow as pa

    ss_delta = [0.0] * len(plan.tensors)
    ss_anchor = [0.0] * len(plan.tensors)
    nonfinite = [0] * len(plan.tensors)
    new_nonfinite = [0] * len(plan.tensors)
    for s in _sums(plan, done):
        ss_delta[s.tensor] += s.ss_delta
        ss_anchor[s.tensor] += s.ss_anchor
        nonfinite[s.tensor] += s.nonfinite
        new_nonfinite[s.tensor] += s.new_nonfinite
    rows: dict[str, list] = {"tensor": [], "rule": [], "dtype": [], "numel": [], "delta_norm": [], "anchor_norm": [],
                             "relative": [], "nonfinite": [], "nonfinite_new": []}
    for i, t in enumerate(plan.tensors):
        delta = math.sqrt(ss_delta[i])
        # Tensors copied unchanged are not read as float32, so their norm and their inf/NaN are
        # not measured.
        measured = not t.is_copy
        anchor = math.sqrt(ss_anchor[i]) if t.anchor is not None and measured else None
        rows["tensor"].append(t.name)
        rows["rule"].append(t.rule)
        rows["dtype"].append(t.dtype)
        rows["numel"].append(numel(t.shape))
        rows["delta_norm"].append(delta)
        rows["anchor_norm"].append(anchor)
        rows["relative"].append(delta / anchor if anchor else 0.0 if t.is_copy else None)
        rows["nonfinite"].append(nonfinite[i] if measured else None)
        rows["nonfinite_new"].append(new_nonfinite[i] if measured else None)
    return pa.table(rows, schema=pa.schema([("tensor", pa.string()), ("rule", pa.string()), ("dtype", pa.string()),
                                            ("numel", pa.int64()), ("delta_norm", pa.float64()),
                                            ("anchor_norm", pa.float64()), ("relative", pa.float64()),
                                            ("nonfinite", pa.int64()), ("nonfinite_new", pa.int64())]))


def nonfinite_totals(plan: Plan, done: dict[int, ItemRecord]) -> dict[str, tuple[int, int]]:
    """Tensor name -> (inf/NaN output elements, those made from finite inputs), where any."""
    totals: dict[int, tuple[int, int]] = {}
    for s in _sums(plan, done):
        if s.nonfinite:
            n, new = totals.get(s.tensor, (0, 0))
            totals[s.tensor] = (n + s.nonfinite, new + s.new_nonfinite)
    return {plan.tensors[t].name: totals[t] for t in sorted(totals)}


def _sums(plan: Plan, done: dict[int, ItemRecord]) -> Iterator[TensorSums]:
    """Every item's per-tensor sums. Resumed items' come from the journal, read as data: a tensor
    index the plan does not have is refused, never used as an index."""
    for record in done.values():
        for s in record.sums:
            if not 0 <= s.tensor < len(plan.tensors):
                raise OutputError(f"item {record.item}: its recorded statistics name tensor {shown(s.tensor)}, "
                                  f"but the plan has {len(plan.tensors)} tensors; the resume journal is damaged: "
                                  "rerun with --overwrite to start over")
            yield s


def parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()
