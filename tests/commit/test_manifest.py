"""Manifest.from_json: what Manifest.of writes is accepted and written back byte for byte; every
damaged field is one InputError line naming the field and what it should be."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from raymerge.commit.manifest import Manifest
from raymerge.errors import InputError
from raymerge.records import ItemRecord

WHERE = "raymerge verify /data/out"


def good() -> dict:
    return {
        "format": "raymerge-manifest", "format_version": 1, "raymerge_version": "0.1",
        "created": "2024-01-01T00:00:00Z",
        "kind": "chat vector merge", "recipe": {"kind": "merge", "base": "/b"}, "layout": {"shard_size": 100},
        "plan_hash": "ab" * 32, "stats": "raymerge_stats.parquet",
        "inputs": [{"role": "cp", "url": "/cp/model.safetensors", "size": 10, "fingerprint": "x"}],
        "output_bytes": 300,
        "shards": [{"name": "model-00001-of-00002.safetensors", "size": 200, "tensors": 2, "items": 2},
                   {"name": "model-00002-of-00002.safetensors", "size": 100, "tensors": 1, "items": 1}],
        "items": [{"id": 0, "shard": 0, "part": 0, "start": 0, "end": 120, "crc32": "0badf00d", "etag": None},
                  {"id": 1, "shard": 0, "part": 1, "start": 120, "end": 200, "crc32": "00000000", "etag": None},
                  {"id": 2, "shard": 1, "part": 0, "start": 0, "end": 100, "crc32": "ffffffff", "etag": '"e1"'}],
    }


def _bytes(obj) -> bytes:
    return json.dumps(obj).encode()


def test_a_sound_manifest_is_returned_as_parsed():
    assert json.loads(Manifest.from_json(_bytes(good()), WHERE).to_json()) == good()


def test_what_manifest_of_writes_parses(tmp_path):
    from raymerge.planning.inputs import resolve
    from raymerge.planning.planner import PlanOptions, RecipeSpec, TermSpec, build_plan

    for i, role in enumerate(("base", "chat", "cp")):
        (tmp_path / role).mkdir()
        g = torch.Generator().manual_seed(i)
        save_file({"a": torch.randn(8, 8, generator=g), "b": torch.randn(4, generator=g)},
                  str(tmp_path / role / "model.safetensors"))
    found = {role: resolve(role, str(tmp_path / role)) for role in ("base", "chat", "cp")}
    plan = build_plan(RecipeSpec(found["cp"], (TermSpec(0.5, found["chat"], found["base"]),)),
                      PlanOptions(shard_size=200, item_size=64))
    done = {i.id: ItemRecord(i.id, i.id * 7919, None) for i in plan.items}
    raw = Manifest.of(plan, "chat vector merge", {"kind": "merge"}, done, "0.1", {"shard_size": 200}).to_json()
    parsed = Manifest.from_json(raw, WHERE)
    assert len(parsed.items) == len(plan.items) > 1 and len(parsed.shards) == len(plan.shards) > 1
    assert parsed.to_json() == raw  # read back and written again: the same bytes
    assert [i.crc32 for i in parsed.items] == [i.id * 7919 for i in plan.items]


def test_facts_are_one_line_per_tensor_and_the_rest_as_indented_json_writes_it():
    """A row-wise method's facts are millions of numbers: one line per tensor, not one per number."""
    obj = {**good(), "facts": {"a.weight": [{"n0": list(range(1000)), "t": 7}, {}], "b": [{"s": [1, 2]}]}}
    raw = Manifest.from_json(_bytes(obj), WHERE).to_json()
    assert json.loads(raw) == obj
    lines = raw.decode().splitlines()
    assert ' "facts": {' in lines
    assert '  "a.weight": [{"n0":[' + ",".join(map(str, range(1000))) + '],"t":7},{}],' in lines
    assert '  "b": [{"s":[1,2]}]' in lines
    rest = {k: v for k, v in obj.items() if k != "facts"}
    assert Manifest.from_json(_bytes(rest), WHERE).to_json() == (json.dumps(rest, indent=1) + "\n").encode()


def _set(path: str, value):
    def change(m):
        *parents, last = path.split(".")
        target = m
        for p in parents:
            target = target[int(p)] if p.isdigit() else target[p]
        if value is KeyError:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value
        return m
    return change


@pytest.mark.parametrize("change,field", [
    (lambda m: {}, "format: expected 'raymerge-manifest'"),
    (lambda m: [m], "the document: expected a JSON object"),
    (_set("format", "other"), "format: expected"),
    (_set("format_version", "1"), "format_version: expected an integer >= 1"),
    (_set("format_version", True), "format_version"),
    (_set("plan_hash", None), "plan_hash: expected a string"),
    (_set("stats", "../../etc/passwd"), "stats: expected a file name inside the checkpoint"),
    (_set("stats", 5), "stats"),
    (_set("recipe", []), "recipe: expected an object with a kind"),
    (_set("recipe.kind", KeyError), "recipe: expected an object with a kind"),
    (_set("layout", "x"), "layout: expected an object"),
    (_set("inputs", {}), "inputs: expected a list"),
    (_set("inputs.0", "x"), "inputs[0]: expected an object"),
    (_set("shards", None), "shards: expected a list"),
    (_set("shards.1", 7), "shards[1]: expected an object"),
    (_set("shards.1.name", "/abs.safetensors"), "shards[1].name: expected a file name"),
    (_set("shards.1.name", "model-00001-of-00002.safetensors"), "shards: a shard name appears twice"),
    (_set("shards.0.size", -1), "shards[0].size: expected an integer >= 0"),
    (_set("items", "x"), "items: expected a list"),
    (_set("items.2", None), "items[2]: expected an object"),
    (_set("items.1.start", "120"), "items[1].start: expected an integer >= 0"),
    (_set("items.1.shard", 2), "items[1].shard: expected one of the 2 shards"),
    (_set("items.1.end", 201), "items[1].end: expected start <= end <= the shard's size"),
    (_set("items.1.start", 201), "items[1].end: expected start <= end"),
    (_set("items.2.crc32", 123), "items[2].crc32: expected 8 hex digits"),
    (_set("items.2.crc32", "0BADF00D"), "items[2].crc32: expected 8 hex digits"),
    (_set("items.2.etag", 5), "items[2].etag: expected a string or null"),
    (_set("items.0.id", KeyError), "items[0].id"),
    (_set("kind", 5), "kind: expected a string"),
    (_set("output_bytes", "300"), "output_bytes"),
    (_set("inputs.0.url", None), "inputs[0].url: expected a string"),
    (_set("inputs.0.size", "10"), "inputs[0].size: expected an integer >= 0"),
    (_set("shards.0.tensors", -2), "shards[0].tensors: expected an integer >= 0"),
    (_set("files", ["../x"]), "files: expected a list of file names"),
    (_set("nonfinite", []), "nonfinite: expected an object"),
    (_set("nonfinite", {"a": {"elements": 1}}), "nonfinite['a'].from_finite_inputs: expected an integer >= 0"),
])
def test_damaged_fields_are_named_in_one_line(change, field):
    _assert_damaged(change, field)


# Fields that were passed on unchecked: verify plans again with the layout and looks items up by
# id, and every string is bounded.
@pytest.mark.parametrize("change,field", [
    (_set("layout.item_size", "4KiB"), "layout.item_size: expected an integer >= 1 (bytes)"),
    (_set("layout.item_size", 10**30), "layout.item_size: expected an integer >= 1 (bytes)"),
    (_set("layout.shard_size", 0), "layout.shard_size: expected an integer >= 1 (bytes)"),
    (_set("layout.shard_size", True), "layout.shard_size: expected an integer >= 1 (bytes)"),
    (_set("layout.cp", "/elsewhere"), "layout: expected an object with at most shard_size, item_size"),
    (_set("items.1.id", 0), "items[1].id: expected 1: items are listed in id order, from 0"),
    (_set("items.0.id", 7), "items[0].id: expected 0: items are listed in id order, from 0"),
    (_set("plan_hash", "a" * 10_000), "plan_hash: expected a string of at most 8192 characters"),
    (_set("inputs.0.url", "u" * 10_000), "inputs[0].url: expected a string of at most 8192 characters"),
    (_set("shards.0.name", "x" * 2000), "shards[0].name: expected a file name"),
    (_set("items.2.etag", "e" * 2000), "items[2].etag: expected a string or null (at most 1024 characters)"),
    (_set("facts", {"t" * 10_000: []}), "facts['tttttt"),
    (_set("facts", {"a": [{"k": 2**64}]}), "facts['a']: expected a list of null or {name: a number or a list of numbers}"),
    (_set("facts", {"a": [{"k": "1"}]}), "facts['a']: expected a list of null or {name: a number or a list of numbers}"),
    (_set("facts", {"a": [{"k": True}]}), "facts['a']: expected a list of null or {name: a number or a list of numbers}"),
    (_set("nonfinite", {"t" * 10_000: {"elements": 1, "from_finite_inputs": 0}}), "nonfinite['tttttt"),
])
def test_layout_item_ids_and_strings_are_checked(change, field):
    _assert_damaged(change, field)


def _assert_damaged(change, field) -> None:
    with pytest.raises(InputError) as e:
        Manifest.from_json(_bytes(change(copy.deepcopy(good()))), WHERE)
    message = str(e.value)
    assert message.startswith(f"{WHERE}: raymerge_manifest.json is damaged ({field}")
    assert message.endswith("this is not a checkpoint raymerge can verify or inspect") and "\n" not in message


@pytest.mark.parametrize("raw,reason", [
    (b"", "not valid JSON"), (b"\x00\xff garbage", "not UTF-8"), (b"[" * 100_000, "nested deeper"),
    (b'{"format_version": ' + b"1" * 5000 + b"}", "an integer of 5000 digits"),
])
def test_documents_that_are_not_json_are_damaged_manifests(raw, reason):
    with pytest.raises(InputError, match=f"raymerge_manifest.json is damaged \\({reason}"):
        Manifest.from_json(raw, WHERE)


def test_a_newer_format_asks_for_a_newer_raymerge():
    with pytest.raises(InputError, match="format_version 9, newer than this raymerge reads .*upgrade raymerge"):
        Manifest.from_json(_bytes({**good(), "format_version": 9}), WHERE)


def test_fields_an_older_manifest_lacks_stay_absent():
    old = {k: v for k, v in good().items() if k not in ("kind", "created", "output_bytes")}
    m = Manifest.from_json(_bytes(old), WHERE)
    assert (m.kind, m.created, m.output_bytes, m.files, m.nonfinite) == (None,) * 5
    assert json.loads(m.to_json()) == old
    assert m.named == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "raymerge_stats.parquet"]
