"""The planner on real (tiny) safetensors files: matching, validation, exact layout and items."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from raymerge.errors import PlanError
from raymerge.planning.plan import HEADER
from raymerge.planning.inputs import resolve
from raymerge.planning.planner import PlanOptions, RecipeSpec, TermSpec, build_plan
from raymerge.safetensors.index import shard_name

TENSORS = {"emb": ((4, 3), torch.bfloat16), "norm": ((3,), torch.float32), "ids": ((2,), torch.int64),
           "proj": ((3, 3), torch.bfloat16)}


def _write(folder, tensors, shard_split=None):
    os.makedirs(folder, exist_ok=True)
    if shard_split is None:
        save_file(tensors, os.path.join(folder, "model.safetensors"))
        return str(folder)
    weight_map = {}
    for i, names in enumerate(shard_split):
        file = shard_name(i, len(shard_split))
        save_file({n: tensors[n] for n in names}, os.path.join(folder, file))
        weight_map.update({n: file for n in names})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    return str(folder)


def _tensors(seed, spec=TENSORS):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(s, generator=g).to(d) if d.is_floating_point else torch.arange(s[0]))
            for n, (s, d) in spec.items()}


@pytest.fixture
def trio(tmp_path):
    return {role: resolve(role, _write(tmp_path / role, _tensors(i), [["emb", "norm"], ["ids", "proj"]]))
            for i, role in enumerate(("base", "chat", "cp"))}


def test_plan_layout_offsets_headers_and_items_exactly(trio):
    plan = build_plan(RecipeSpec(trio["cp"], (TermSpec(0.5, trio["chat"], trio["base"]),)),
                      PlanOptions(shard_size=40, item_size=16))
    # cp's data order (safetensors stores norm before emb, ids before proj: larger dtypes first),
    # in shards of at most 40 bytes: [norm 12 + emb 24] [ids 16 + proj 18]
    assert [s.name for s in plan.shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert [[plan.tensors[i].name for i in s.tensors] for s in plan.shards] == [["norm", "emb"], ["ids", "proj"]]
    h0 = plan.shards[0].header
    text = (b'{"__metadata__":{"format":"pt"},"norm":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},'
            b'"emb":{"dtype":"BF16","shape":[4,3],"data_offsets":[12,36]}}')
    text += b" " * (-len(text) % 8)
    assert h0 == struct.pack("<Q", len(text)) + text
    norm, emb, ids, proj = plan.tensors
    assert (norm.start, norm.nbytes, emb.start, emb.nbytes) == (len(h0), 12, len(h0) + 12, 24)
    assert plan.shards[0].size == len(h0) + 36
    assert ids.terms == () and ids.is_copy and ids.dtype == "I64"
    assert norm.dtype == "F32" and not norm.is_copy and len(norm.terms) == 1 and norm.terms[0].scale == 0.5
    # anchor and term sources point at the right files and offsets
    cp_file = plan.files[norm.anchor.file]
    assert cp_file.role == "cp" and cp_file.url.endswith("cp/model-00001-of-00002.safetensors")
    assert norm.anchor.nbytes == 12 and plan.files[norm.terms[0].a.file].role == "chat"
    # items tile each shard exactly, in order, with part numbers from 1
    for s_idx, shard in enumerate(plan.shards):
        items = [plan.items[i] for i in shard.items]
        assert items[0].start == 0 and items[-1].end == shard.size
        assert all(a.end == b.start for a, b in zip(items, items[1:]))
        assert [i.part for i in items] == list(range(1, len(items) + 1))
        assert all(i.shard == s_idx for i in items)
    first = plan.items[0]
    assert first.pieces[0].tensor == HEADER and first.pieces[0].begin == 0
    # each tensor's elements are covered once across items
    covered = {}
    for item in plan.items:
        for p in item.pieces:
            if p.tensor != HEADER:
                covered.setdefault(p.tensor, []).append((p.begin, p.end))
    for t, spans in covered.items():
        n = plan.tensors[t].nbytes // {"BF16": 2, "F32": 4, "I64": 8}[plan.tensors[t].dtype]
        assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_plan_hash_is_stable_and_sensitive(trio):
    def make(scale, item_size=16):
        return build_plan(RecipeSpec(trio["cp"], (TermSpec(scale, trio["chat"], trio["base"]),)),
                          PlanOptions(shard_size=40, item_size=item_size))
    assert make(0.5).hash == make(0.5).hash
    assert make(0.5).hash != make(1.0).hash
    assert make(0.5).hash != make(0.5, item_size=24).hash


def test_every_mismatch_is_listed_in_one_error(tmp_path):
    base = _tensors(0)
    chat = _tensors(1)
    chat["proj"] = torch.zeros(3, 4, dtype=torch.bfloat16)  # shape differs
    del chat["norm"]  # missing
    chat["extra"] = torch.zeros(1)
    cp = _tensors(2)
    cp["emb"] = torch.zeros(5, 3, dtype=torch.bfloat16)  # shape differs from both
    ck = {r: resolve(r, _write(tmp_path / r, t)) for r, t in (("base", base), ("chat", chat), ("cp", cp))}
    with pytest.raises(PlanError) as e:
        build_plan(RecipeSpec(ck["cp"], (TermSpec(1.0, ck["chat"], ck["base"]),)), PlanOptions())
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("missing from --chat: norm", "not in --cp: extra", "proj: shape [3, 3] in --cp but [3, 4] in --chat",
                 "emb: shape [5, 3] in --cp but [4, 3] in --chat", "emb: shape [5, 3] in --cp but [4, 3] in --base"):
        assert part in msg


def test_thousands_of_hostile_names_make_one_short_line(tmp_path):
    """Names with newlines, carriage returns and ANSI escapes, thousands of them: one line, escaped, cut."""
    base = _tensors(0)
    chat = {**_tensors(1), **{f"evil\n\r\x1b[31m{i}" + "x" * 300: torch.zeros(1) for i in range(3000)}}
    cp = _tensors(2)
    ck = {r: resolve(r, _write(tmp_path / r, t)) for r, t in (("base", base), ("chat", chat), ("cp", cp))}
    with pytest.raises(PlanError) as e:
        build_plan(RecipeSpec(ck["cp"], (TermSpec(1.0, ck["chat"], ck["base"]),)), PlanOptions())
    msg = str(e.value)
    assert msg.isprintable() and len(msg) <= 600
    assert "3000 tensors of --chat not in --cp" in msg and "\x1b" not in msg and "\\x0a\\x0d\\x1b[31m" in msg
    assert "and 2995 more" in msg
    assert msg.endswith("Check that every input is the same architecture and size")


def test_s3_options_keep_parts_within_limits(trio):
    plan = build_plan(RecipeSpec(trio["cp"], (TermSpec(1.0, trio["chat"], trio["base"]),)),
                      PlanOptions(shard_size=40, item_size=4, min_part=20, max_parts=10_000))
    for shard in plan.shards:
        items = [plan.items[i] for i in shard.items]
        assert all(i.nbytes >= 20 for i in items[:-1])
    plan = build_plan(RecipeSpec(trio["cp"], (TermSpec(1.0, trio["chat"], trio["base"]),)),
                      PlanOptions(shard_size=10**9, item_size=4, max_parts=3))
    assert all(len(s.items) <= 3 for s in plan.shards)
