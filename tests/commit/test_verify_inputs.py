"""`raymerge verify` and `raymerge inspect` on damaged raymerge files: exit 2 with one line, no
traceback. The checkpoint is written by hand (no Ray): one shard, its manifest, its stats table."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from raymerge.commit.manifest import MANIFEST_NAME as MANIFEST
from raymerge.commit.stats import STATS_NAME as STATS


def _checkpoint(folder) -> str:
    """A sound one-shard checkpoint with the manifest and stats raymerge would write."""
    os.makedirs(folder)
    shard = os.path.join(folder, "model.safetensors")
    save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(4, 4), "model.norm.weight": torch.ones(4)}, shard)
    data = open(shard, "rb").read()
    manifest = {
        "format": "raymerge-manifest", "format_version": 1, "raymerge_version": "0", "created": "2024-01-01T00:00:00Z",
        "kind": "chat vector merge", "recipe": {"kind": "merge"}, "layout": {}, "plan_hash": "0" * 64,
        "stats": STATS, "inputs": [], "output_bytes": len(data),
        "shards": [{"name": "model.safetensors", "size": len(data), "tensors": 2, "items": 2}],
        "items": [{"id": 0, "shard": 0, "part": 0, "start": 0, "end": 100, "crc32": f"{zlib.crc32(data[:100]):08x}",
                   "etag": None},
                  {"id": 1, "shard": 0, "part": 1, "start": 100, "end": len(data),
                   "crc32": f"{zlib.crc32(data[100:]):08x}", "etag": None}],
    }
    _write_json(folder, manifest)
    _write_stats(folder, pa.table({"tensor": ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"],
                                   "delta_norm": [0.5, 0.25], "relative": [0.125, None]}))
    return str(folder)


def _write_json(folder, obj) -> None:
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(obj, f)


def _write_stats(folder, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    with open(os.path.join(folder, STATS), "wb") as f:
        f.write(sink.getvalue())


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raymerge", *args], capture_output=True, text=True, timeout=120)


def _assert_one_line_exit_2(r: subprocess.CompletedProcess, expected: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("raymerge: error:"), r.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def test_the_hand_made_checkpoint_is_sound(tmp_path):
    # The control for every case below: only the damage makes them fail.
    out = _checkpoint(tmp_path / "out")
    r = _cli("verify", out)
    assert r.returncode == 0 and f"raymerge verify: OK: {out}" in r.stdout, r.stdout + r.stderr
    r = _cli("inspect", out)
    assert r.returncode == 0 and "2 tensors" in r.stdout and "12.5000%" in r.stdout, r.stdout + r.stderr


def _break_item(field, value):
    def damage(m):
        m["items"][1][field] = value
        return m
    return damage


MANIFEST_CASES = {
    "empty object": (lambda m: {}, "is damaged (format: expected 'raymerge-manifest')"),
    "shard index as text": (_break_item("shard", "0"), "is damaged (items[1].shard: expected an integer >= 0)"),
    "crc32 as a number": (_break_item("crc32", 12345678), "is damaged (items[1].crc32: expected 8 hex digits)"),
    "range past the shard": (_break_item("end", 10**9), "is damaged (items[1].end: expected start <= end"),
    "no items": (lambda m: {k: v for k, v in m.items() if k != "items"}, "is damaged (items: expected a list)"),
    "stats outside": (lambda m: {**m, "stats": "../../../etc/passwd"}, "is damaged (stats: expected a file name"),
    "garbage": (None, "is damaged (not UTF-8"),
    "deeply nested": ("[" * 100_000, "is damaged (nested deeper than 64 levels)"),
}


@pytest.mark.parametrize("command", ["verify", "inspect"])
@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_damaged_manifest_exits_2_with_one_line(tmp_path, command, case):
    out = _checkpoint(tmp_path / "out")
    damage, expected = MANIFEST_CASES[case]
    path = os.path.join(out, MANIFEST)
    if damage is None:
        open(path, "wb").write(b"\x89PNG\r\n\x1a\n\xff\xfe")
    elif isinstance(damage, str):
        open(path, "w").write(damage)
    else:
        _write_json(out, damage(json.load(open(path))))
    before = open(path, "rb").read()
    r = _cli(command, out)
    shown = "raymerge verify" if command == "verify" else "inspect"
    _assert_one_line_exit_2(r, f"{shown} {out}: {MANIFEST} {expected}")
    assert open(path, "rb").read() == before


def test_missing_manifest_stays_a_verify_failure(tmp_path):
    out = _checkpoint(tmp_path / "out")
    os.remove(os.path.join(out, MANIFEST))
    r = _cli("verify", out)
    assert r.returncode == 1 and "raymerge_manifest.json: missing" in r.stdout, r.stdout + r.stderr


STATS_CASES = {
    "not parquet": (b"PAR1 this is not a table PAR1", "not a readable Parquet table"),
    "tensor column of numbers": (pa.table({"tensor": [1, 2], "delta_norm": [0.5, 0.25], "relative": [0.1, 0.2]}),
                                 "column 'tensor' should be text, is int64"),
    "no delta_norm": (pa.table({"tensor": ["a"], "relative": [0.1]}),
                      "column 'delta_norm' should be a float, is missing"),
    "empty delta_norm": (pa.table({"tensor": ["a"], "delta_norm": pa.array([None], pa.float64()), "relative": [0.1]}),
                         "column 'delta_norm' has empty values"),
    "truncated": (None, "not a readable Parquet table"),
}


@pytest.mark.parametrize("case", list(STATS_CASES))
def test_damaged_stats_table_exits_2_with_one_line(tmp_path, case):
    out = _checkpoint(tmp_path / "out")
    damage, expected = STATS_CASES[case]
    path = os.path.join(out, STATS)
    if damage is None:
        open(path, "wb").write(open(path, "rb").read()[:-40])
    elif isinstance(damage, bytes):
        open(path, "wb").write(damage)
    else:
        _write_stats(out, damage)
    _assert_one_line_exit_2(_cli("inspect", out), f"inspect {out}: {STATS}: {expected}")


def test_damaged_index_is_a_verify_failure_not_a_traceback(tmp_path):
    out = _checkpoint(tmp_path / "out")
    m = json.load(open(os.path.join(out, MANIFEST)))
    # Two shards, so that verify reads the index: the second one an empty copy of the first.
    m["shards"].append({"name": "model-2.safetensors", "size": m["shards"][0]["size"], "tensors": 0, "items": 0})
    _write_json(out, m)
    shard = open(os.path.join(out, "model.safetensors"), "rb").read()
    open(os.path.join(out, "model-2.safetensors"), "wb").write(shard)
    open(os.path.join(out, "model.safetensors.index.json"), "w").write('{"weight_map": ' + "[" * 100_000)
    r = _cli("verify", out)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "model.safetensors.index.json: refused (nested deeper than 64 levels)" in r.stdout, r.stdout
