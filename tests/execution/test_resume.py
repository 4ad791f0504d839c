"""--resume keeps only journaled items the writer verifies, and refuses a shard whose staged data
is gone, or that an interrupted commit made final without every item journaled. A hand-made plan
of one shard on a local folder: no Ray, no inputs."""

from __future__ import annotations

import os
import zlib

import pytest

from raymerge.errors import OutputError
from raymerge.execution.journal import JournalHead, JournalState
from raymerge.execution.resume import check_resumable
from raymerge.planning.plan import Item, Plan, ShardPlan
from raymerge.records import ItemRecord
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
    target = Target(plan.shards[0].name, handles[0], SIZE, out.identities(handles)[0])
    records = {}
    for i in range(len(SPANS)):
        a, b = SPANS[i]
        data = bytes([i + 1]) * (b - a)
        if i in written:
            out.write(target, Span(i + 1, a, b), memoryview(data))
        records[i] = ItemRecord(i, zlib.crc32(data), None)
    out.close()
    state = JournalState(JournalHead.of(plan, handles, identities=out.identities(handles)),
                         {i: records[i] for i in journaled}, 4)
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


def _input_file(tmp_path, size: int = SIZE) -> tuple[str, bytes]:
    """An 'input' of the staged file's size, whose bytes must never change."""
    path = str(tmp_path / "input.safetensors")
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return path, data


def test_a_staged_file_hard_linked_to_an_input_is_refused_and_the_input_kept(tmp_path):
    """A hard link in the staging folder (cp -al, rsync --link-dest) is never written through."""
    plan, out, target, state = _run(tmp_path, written=[0], journaled=[0])
    staged = tmp_path / "out" / STAGING / target.handle
    source, data = _input_file(tmp_path)
    os.remove(staged)
    os.link(source, staged)
    with pytest.raises(OutputError, match="has 2 links.*--overwrite"):
        check_resumable(out, plan, state)
    with pytest.raises(OutputError, match="has 2 links"):  # and a worker refuses to write through it
        out.write(target, Span(1, *SPANS[0]), memoryview(b"\0" * (SPANS[0][1] - SPANS[0][0])))
    with open(source, "rb") as f:
        assert f.read() == data


def test_a_staged_file_replaced_by_another_or_naming_an_input_is_refused(tmp_path):
    plan, out, target, state = _run(tmp_path, written=[0], journaled=[0])
    staged = tmp_path / "out" / STAGING / target.handle
    other = tmp_path / "other"
    os.replace(staged, other)  # same bytes, one link, but not the inode the journal recorded
    with open(other, "rb") as f, open(tmp_path / "copy", "wb") as g:
        g.write(f.read())
    os.replace(tmp_path / "copy", staged)
    with pytest.raises(OutputError, match="not the file this run created"):
        check_resumable(out, plan, state)
    out.protect([str(staged)])  # as a bind mount of an input over it would look
    with pytest.raises(OutputError, match="is an input file"):
        out.write(target, Span(1, *SPANS[0]), memoryview(b"\0" * (SPANS[0][1] - SPANS[0][0])))


def test_a_special_file_in_staging_never_blocks(tmp_path):
    """A FIFO where a staged shard or a journal document belongs is read as damage, never waited on."""
    plan, out, target, state = _run(tmp_path, written=[0], journaled=[0])
    staged = tmp_path / "out" / STAGING / target.handle
    os.remove(staged)
    os.mkfifo(staged)
    with pytest.raises(OutputError, match="gone"):
        check_resumable(out, plan, state)
    os.mkfifo(tmp_path / "out" / STAGING / "journal-000009.json")
    assert out.staging.get("journal-000009.json").data == b""  # read as damaged
    with pytest.raises(OutputError, match="FIFO"):
        out.write(target, Span(1, *SPANS[0]), memoryview(b"\0" * (SPANS[0][1] - SPANS[0][0])))
