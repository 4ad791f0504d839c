"""--resume keeps only journaled items the writer verifies, and refuses a shard whose staged data
is gone, or that an interrupted commit made final without every item journaled. A hand-made plan
of one shard on a local folder: no Ray, no inputs."""

from __future__ import annotations

import os
import zlib

import pytest

from raymerge.commit.records import ItemRecord
from raymerge.errors import OutputError
from raymerge.execution.journal import JournalHead, JournalState
from raymerge.execution.resume import check_resumable
from raymerge.planning.plan import Item, Plan, ShardPlan
from raymerge.storage.writers import STAGING, Span, Target, open_output

SIZE = 9000
SPANS = [(0, 4096), (4096, 8192), (8192, SIZE)]


def _plan() -> Plan:
    items = tuple(Item(id=i, shard=0, part=i + 1, start=a, end=b, pieces=()) for i, (a, b) in enumerate(SPANS))
    shard = ShardPlan(name="model.safetensors", size=SIZE, header=b"", tensors=(), items=(0, 1, 2))
    return Plan(files=(), tensors=(), shards=(shard,), items=items, aux_files=(), hash="h" * 64)


def _run(tmp_path, written: list[int], journaled: list[int]):
    """A staged shard with `written` items on disk and `journaled` items recorded done."""
    plan, out = _plan(), open_output(str(tmp_path / "out"), {})
    handles = out.prepare([(s.name, s.size) for s in plan.shards])
    target = Target(plan.shards[0].name, handles[0], SIZE)
    records = {}
    for i in range(len(SPANS)):
        a, b = SPANS[i]
        data = bytes([i + 1]) * (b - a)
        if i in written:
            out.write(target, Span(i + 1, a, b), memoryview(data))
        records[i] = ItemRecord(i, zlib.crc32(data), None)
    out.close()
    state = JournalState(JournalHead.of(plan, handles), {i: records[i] for i in journaled}, 4)
    return plan, out, target, state


def test_only_journaled_items_whose_bytes_are_there_are_kept(tmp_path):
    plan, out, _, state = _run(tmp_path, written=[0, 2], journaled=[0, 1, 2])
    resumed = check_resumable(out, plan, state)
    assert sorted(resumed.done) == [0, 2] and resumed.next_batch == 4
    assert resumed.handles == ["model.safetensors.partial"]


def test_a_shard_whose_staged_file_is_gone_is_refused(tmp_path):
    plan, out, target, state = _run(tmp_path, written=[0], journaled=[0])
    os.remove(tmp_path / "out" / STAGING / target.handle)
    with pytest.raises(OutputError, match="the staged data of model.safetensors is gone"):
        check_resumable(out, plan, state)


def test_a_shard_a_cut_short_commit_made_final_counts_only_when_fully_journaled(tmp_path):
    plan, out, target, state = _run(tmp_path, written=[0, 1, 2], journaled=[0, 1, 2])
    out.finalize([(target, [])])
    assert sorted(check_resumable(out, plan, state).done) == [0, 1, 2]
    partial = JournalState(state.head, {0: state.done[0]}, 4)
    with pytest.raises(OutputError, match="the staged data of model.safetensors is gone"):
        check_resumable(out, plan, partial)
