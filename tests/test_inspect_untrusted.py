"""`raymerge inspect` reads raymerge_stats.parquet as untrusted data: long names, and names that
Parquet compresses away but Python would hold once per row, are one InputError before any row
becomes Python strings. (Not-Parquet, missing and mistyped columns: tests/commit/test_verify_inputs.py.)"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymerge import inspect
from raymerge.errors import InputError

WHERE = "inspect /data/out: raymerge_stats.parquet"


def _parquet(names: list[str], delta_norm=None, **options) -> bytes:
    n = len(names)
    table = pa.table({"tensor": names, "delta_norm": pa.array(delta_norm or [0.5] * n, pa.float32()),
                      "relative": [0.125] * (n - 1) + [None]})
    sink = io.BytesIO()
    pq.write_table(table, sink, **options)
    return sink.getvalue()


def test_a_sound_table_is_read_in_batches():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3000)]  # three batches
    rows = inspect.stats_rows(_parquet(names), WHERE)
    assert [r["tensor"] for r in rows] == names
    assert rows[0] == {"tensor": names[0], "delta_norm": 0.5, "relative": 0.125} and rows[-1]["relative"] is None


def test_a_tensor_name_longer_than_any_is_refused():
    with pytest.raises(InputError, match=f"^{WHERE}: a tensor name of 10000000 characters, more than 8192; "
                                         "the table is damaged$"):
        inspect.stats_rows(_parquet(["x" * 10**7, "b"]), WHERE)


def test_names_are_counted_as_python_would_hold_them(monkeypatch):
    # One 5,000-character name in 4,096 rows: a few hundred bytes of zstd, 20 MB of Python strings.
    monkeypatch.setattr(inspect, "MAX_STATS_NAMES", 2**20, raising=False)
    data = _parquet(["n" * 5000] * 4096, compression="zstd")
    assert len(data) < 10_000
    with pytest.raises(InputError, match=f"^{WHERE}: more than 1000000 rows or 1 MiB of tensor names, more than "
                                         "any checkpoint's statistics; the table is damaged$"):
        inspect.stats_rows(data, WHERE)


def test_an_empty_value_in_a_later_batch_is_refused():
    norms = [0.5] * 2500
    norms[2100] = None
    with pytest.raises(InputError, match=f"^{WHERE}: column 'delta_norm' has empty values; the table is damaged$"):
        inspect.stats_rows(_parquet([f"t{i}" for i in range(2500)], norms), WHERE)
