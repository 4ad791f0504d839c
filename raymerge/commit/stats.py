"""Per-tensor statistics of the change a run made, as a Parquet table next to the manifest.

`delta_norm` = ||sum_i scale_i * (a_i - b_i)||, the change applied (float32, before it is added and
rounded), `anchor_norm` = ||anchor|| (cp; empty when extracting), `relative` = their ratio: what
chat-vector users look at to choose a scale.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

from raymerge.plan import Plan

if TYPE_CHECKING:  # pyarrow is imported where it is used: every worker imports this package, none needs it
    import pyarrow as pa

STATS_NAME = "raymerge_stats.parquet"


def tensor_stats(plan: Plan, results: dict) -> pa.Table:
    """Sum the workers' per-piece sums of squares into one row per tensor."""
    import pyarrow as pa

    ss_delta = [0.0] * len(plan.tensors)
    ss_anchor = [0.0] * len(plan.tensors)
    for result in results.values():
        for tensor, d, a in result.stats:
            ss_delta[tensor] += d
            ss_anchor[tensor] += a
    rows = {"tensor": [], "rule": [], "dtype": [], "numel": [], "delta_norm": [], "anchor_norm": [],
            "relative": []}
    for i, t in enumerate(plan.tensors):
        delta = math.sqrt(ss_delta[i])
        # Tensors copied unchanged are not read as float32, so their norm is not measured.
        anchor = math.sqrt(ss_anchor[i]) if t.anchor is not None and not t.is_copy else None
        rows["tensor"].append(t.name)
        rows["rule"].append(t.rule)
        rows["dtype"].append(t.dtype)
        rows["numel"].append(math.prod(t.shape))
        rows["delta_norm"].append(delta)
        rows["anchor_norm"].append(anchor)
        rows["relative"].append(delta / anchor if anchor else 0.0 if t.is_copy else None)
    return pa.table(rows)


def parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def read_stats(data: bytes) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data))
