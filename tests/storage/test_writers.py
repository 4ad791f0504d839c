"""The writer protocol on a local folder: part rules read without opening anything, items written
by span, staged items verified by reading their bytes back, and the shard states resume relies on.
(The S3 writer's side runs on a real S3 server: tests/e2e/test_merge_s3.py.)"""

from __future__ import annotations

import os
import zlib

import pytest

from raymerge.errors import OutputError
from raymerge.storage.local_output import LocalOutput
from raymerge.storage.s3_output import S3Output
from raymerge.storage.writers import (LEASE, STAGING, PartRules, ShardState, Span, StagedItem, Target, Verified,
                                      clear_staging, open_output, part_rules)

SHARD = "model.safetensors"


def test_part_rules_come_from_the_writer_of_the_url_without_opening_it():
    assert part_rules("s3://no-such-bucket/out") == S3Output.rules == PartRules(5 * 2**20, 10_000)
    assert part_rules("s3a://no-such-bucket/out") == S3Output.rules
    assert part_rules("/nowhere/out") == part_rules("file:///nowhere/out") == LocalOutput.rules == PartRules(0, 0)
    assert part_rules(None) == PartRules()  # `raymerge plan` without --out
    assert part_rules("gs://bucket/out") == PartRules()  # no writer: open_output refuses it, the plan has no limits
    with pytest.raises(OutputError, match="writing to gs:// is not supported"):
        open_output("gs://bucket/out", {})


def _staged(tmp_path, size: int = 3 * 4096 + 1000) -> tuple[LocalOutput, Target]:
    out = open_output(str(tmp_path / "out"), {})
    (handle,) = out.prepare([(SHARD, size)])
    return out, Target(SHARD, handle, size, out.identities([handle])[0])


def _write(out: LocalOutput, target: Target, part: int, start: int, end: int, fill: int) -> StagedItem:
    data = bytes([fill]) * (end - start)
    span = Span(part, start, end)
    assert out.write(target, span, memoryview(data)) is None
    return StagedItem(part - 1, span, zlib.crc32(data), None)


def test_written_items_are_verified_by_their_bytes(tmp_path):
    out, target = _staged(tmp_path)
    # Unaligned spans: a buffered head and tail around a direct-I/O middle.
    a = _write(out, target, 1, 0, 5000, 1)
    b = _write(out, target, 2, 5000, 12_388, 2)
    # Journaled, but its bytes never reached the disk (the file still holds zeros there).
    lost = StagedItem(2, Span(3, 12_388, target.size), zlib.crc32(b"\3" * (target.size - 12_388)), None)
    assert out.verify_staged(target, [a, b, lost]) == Verified(ShardState.STAGED, frozenset({0, 1}))
    assert out.verify_staged(target, []) == Verified(ShardState.STAGED)
    with open(tmp_path / "out" / STAGING / target.handle, "rb") as f:
        data = f.read()
    assert data[:5000] == b"\1" * 5000 and data[5000:12_388] == b"\2" * 7388 and len(data) == target.size


def test_a_damaged_item_is_not_verified(tmp_path):
    out, target = _staged(tmp_path)
    a = _write(out, target, 1, 0, 5000, 1)
    b = _write(out, target, 2, 5000, 12_388, 2)
    out.close()
    with open(tmp_path / "out" / STAGING / target.handle, "r+b") as f:
        f.seek(6000)
        f.write(b"\7")
    assert out.verify_staged(target, [a, b]).items == frozenset({0})


def test_a_staged_file_gone_or_resized_is_gone_and_a_finalized_one_final(tmp_path):
    out, target = _staged(tmp_path)
    items = [_write(out, target, 1, 0, 5000, 1), _write(out, target, 2, 5000, target.size, 2)]
    path = tmp_path / "out" / STAGING / target.handle
    out.close()
    os.truncate(path, target.size + 1)  # not its planned size
    assert out.verify_staged(target, items) == Verified(ShardState.GONE)
    os.truncate(path, target.size)
    os.replace(path, tmp_path / "out" / "elsewhere")
    os.symlink(tmp_path / "out" / "elsewhere", path)  # a planted link is not the staged file
    assert out.verify_staged(target, items) == Verified(ShardState.GONE)
    os.remove(path)
    assert out.verify_staged(target, items) == Verified(ShardState.GONE)
    os.replace(tmp_path / "out" / "elsewhere", path)

    out.finalize([(target, items)])
    assert not path.exists() and (tmp_path / "out" / SHARD).stat().st_size == target.size
    # A commit cut short after the rename: every journaled item counts, and finalize again is a no-op.
    assert out.verify_staged(target, items) == Verified(ShardState.FINAL, frozenset({0, 1}))
    out.finalize([(target, items)])
    assert (tmp_path / "out" / SHARD).read_bytes() == b"\1" * 5000 + b"\2" * (target.size - 5000)


def test_a_handle_that_is_not_a_staged_name_is_refused(tmp_path):
    out, target = _staged(tmp_path)
    for bad in ("../" + target.handle, "model.safetensors"):
        with pytest.raises(OutputError, match="resume journal is damaged"):
            out.verify_staged(Target(SHARD, bad, target.size), [])


def test_abort_removes_the_staged_files_and_clear_staging_all_but_the_lease(tmp_path):
    out, target = _staged(tmp_path)
    _write(out, target, 1, 0, 5000, 1)
    out.staging.put_if_absent(LEASE, b"{}")
    out.staging.put("journal-head.json", b"{}")
    out.abort([SHARD], None)  # the journal lost: staged files are found by their names
    assert out.staging.list() == ["journal-head.json", LEASE]
    clear_staging(out)
    assert os.listdir(tmp_path / "out" / STAGING) == [LEASE]
