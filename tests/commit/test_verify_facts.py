"""`raymerge verify --recompute` on a TIES checkpoint whose manifest's facts, shards or items were
damaged: one problem line each, never a traceback from the worker. The checkpoint is made without
Ray: the statistics passes and the items computed in-process, the shard and manifest written by hand."""

from __future__ import annotations

import json
import zlib

import pytest

from raymerge.api import verify
from raymerge.commit.manifest import MANIFEST_NAME, Manifest
from raymerge.config import build_recipe
from raymerge.execution.passes import Facts
from raymerge.execution.worker import MergeWorker
from raymerge.planning.build import make_plan
from raymerge.planning.passes import pass_items, statistics_passes
from raymerge.records import ItemRecord
from raymerge.synth import LlamaShape, make_trio


@pytest.fixture(scope="module")
def ties_checkpoint(tmp_path_factory):
    """(folder, its manifest as a JSON object, the plan): a sound one-shard TIES checkpoint."""
    root = tmp_path_factory.mktemp("ties")
    trio = make_trio(str(root), LlamaShape(hidden=32, layers=1, vocab=64, intermediate=48))
    out = root / "out"
    recipe, options = build_recipe("merge", dict(base=trio["base"], chat=trio["chat"], cp=trio["cp"], out=str(out),
                                                 method="ties", density=[0.3], item_size="4KiB"))
    plan = make_plan(recipe, options)
    assert len(plan.shards) == 1 and statistics_passes(plan)
    worker = MergeWorker(plan, None, {}, {})
    facts = Facts(plan)
    for name in statistics_passes(plan):
        for i in pass_items(plan, name):
            facts.add(name, worker.stats(i, name, facts.for_item(i)).rows)
    shard = bytearray(plan.shards[0].size)
    done = {}
    for item in plan.items:
        data = bytes(worker.produce(item.id, facts=facts.for_item(item.id))[0])
        shard[item.start:item.end] = data
        done[item.id] = ItemRecord(item.id, zlib.crc32(data), None)
    worker.close()
    out.mkdir()
    (out / plan.shards[0].name).write_bytes(shard)
    layout = {"shard_size": options.shard_size, "item_size": options.item_size}
    manifest = Manifest.of(plan, "mergekit ties", recipe.to_mapping(), done, "0", layout, facts.named())
    return out, json.loads(manifest.to_json()), plan


def _verify_with(folder, manifest: dict, plan) -> list[str]:
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return verify(str(folder), {}, recompute=len(plan.items), seed=0)


def _first_sparse(manifest: dict) -> str:
    return sorted(manifest["facts"])[0]


def test_the_hand_made_ties_checkpoint_recomputes_sound(ties_checkpoint):
    folder, manifest, plan = ties_checkpoint
    assert _verify_with(folder, manifest, plan) == []


def _without_facts(m: dict) -> None:
    del m["facts"]


def _fewer_entries(m: dict) -> None:
    m["facts"][_first_sparse(m)] = []


def _more_entries(m: dict) -> None:
    m["facts"][_first_sparse(m)].append({})


def _no_threshold(m: dict) -> None:
    del m["facts"][_first_sparse(m)][0]["threshold"]


def _threshold_past_32_bits(m: dict) -> None:
    m["facts"][_first_sparse(m)][0]["threshold"] = 2**32


def _null_entry(m: dict) -> None:
    m["facts"][_first_sparse(m)][0] = None


@pytest.mark.parametrize("damage,why", [
    (_without_facts, "none recorded"),
    (_fewer_entries, "0 entries for 1 vectors"),
    (_more_entries, "2 entries for 1 vectors"),
    (_no_threshold, "vector 1 has no threshold"),
    (_threshold_past_32_bits, "vector 1's 'threshold' is 4294967296, out of range"),
    (_null_entry, "vector 1 has no k, high, above, threshold, cut, keep"),
])
def test_facts_a_recompute_needs_are_one_problem_line(ties_checkpoint, damage, why):
    folder, manifest, plan = ties_checkpoint
    damaged = json.loads(json.dumps(manifest))
    damage(damaged)
    first = _first_sparse(manifest)
    assert _verify_with(folder, damaged, plan) == [
        f"recompute: the manifest lacks the statistics facts of {first} that recomputing ties needs ({why}); "
        "this manifest was damaged or written by hand"]


def test_items_unlike_the_plans_are_one_problem_line(ties_checkpoint):
    # The plan hash still matches, but the items were cut differently: ids would not line up.
    # Items 0 and 1 made one, with the checksum of their bytes: every check but the plan's passes.
    folder, manifest, plan = ties_checkpoint
    damaged = json.loads(json.dumps(manifest))
    items = damaged["items"]
    shard = (folder / plan.shards[0].name).read_bytes()
    items[0].update(end=items[1]["end"], crc32=f"{zlib.crc32(shard[items[0]['start']:items[1]['end']]):08x}")
    del items[1]
    for i, item in enumerate(items):
        item["id"] = i
    problems = _verify_with(folder, damaged, plan)
    assert problems == [f"recompute: the manifest's shards and items are not those of the plan they claim to be "
                        f"(plan {plan.hash[:12]}); this manifest was damaged or written by hand"]
