"""The resume journal read back as untrusted data: records round-trip (inf and NaN sums included),
a damaged head makes the state unusable with a reason, a damaged batch is skipped, staged-file
handles are names inside the staging folder."""

from __future__ import annotations

import json
import math

import pytest

from raymerge.errors import OutputError
from raymerge.execution.journal import HEAD, Damaged, Journal, JournalBatch, JournalHead, StatsRecord
from raymerge.records import ItemRecord, TensorSums
from raymerge.storage.writers import STAGING, open_output


def _head(**changes) -> JournalHead:
    values = dict(plan_hash="abc", shards=("model.safetensors",), handles=("model.safetensors.partial",),
                  inputs=(("/in/cp/model.safetensors", "size=1;version=2;header=3"),), replaces=("old.json",),
                  run_id="r1", identities=("",))
    values.update(changes)
    return JournalHead(**values)


def test_records_round_trip_with_non_finite_sums(tmp_path):
    out = open_output(str(tmp_path / "out"), {})
    journal = Journal.begin(out, _head())
    records = [ItemRecord(0, 123, None, (TensorSums(0, 1.5, 2.5, 0, 0),)),
               ItemRecord(1, 2**32 - 1, "etag-1", (TensorSums(1, math.inf, math.nan, 7, 3),))]
    for r in records:
        journal.record(r)
    journal.flush(strict=True)
    state = Journal.load(out)
    assert state.head == _head() and state.problem is None and state.next_batch == 1
    assert state.done[0] == records[0]
    got = state.done[1].sums[0]
    assert got.ss_delta == math.inf and math.isnan(got.ss_anchor) and (got.nonfinite, got.new_nonfinite) == (7, 3)


@pytest.mark.parametrize("head", [
    b'{"journal_version": 3, "plan_hash": "abc"',  # truncated
    b'{"journal_version": 3}',  # missing fields
    json.dumps({"journal_version": 3, "plan_hash": 5, "shards": [], "handles": [], "inputs": []}).encode(),
    json.dumps({"journal_version": 3, "plan_hash": "a", "shards": ["x"], "handles": [], "inputs": []}).encode(),
    json.dumps({"journal_version": 3, "plan_hash": "a", "shards": ["../x"], "handles": ["h"], "inputs": []}).encode(),
    json.dumps({"journal_version": 2, "plan_hash": "a", "shards": [], "handles": [], "inputs": []}).encode(),
    b"[" * 100000,
])
def test_a_damaged_head_is_a_state_with_a_problem(tmp_path, head):
    out = open_output(str(tmp_path / "out"), {})
    out.staging.put(HEAD, head)
    state = Journal.load(out)
    assert state.head is None and state.problem.startswith("its head is damaged (")


def test_a_damaged_batch_is_skipped_and_the_others_kept(tmp_path, caplog):
    out = open_output(str(tmp_path / "out"), {})
    journal = Journal.begin(out, _head())
    journal.record(ItemRecord(0, 1, None))
    journal.flush(strict=True)
    journal.record(ItemRecord(1, 2, None))
    journal.flush(strict=True)
    staging = tmp_path / "out" / STAGING
    (staging / "journal-000001.json").write_bytes(b'[{"id": 1, "crc32": ')  # truncated
    (staging / "journal-000002.json").write_text('[{"id": "2", "crc32": 5, "etag": null, "stats": []}]')
    state = Journal.load(out)
    assert sorted(state.done) == [0] and state.next_batch == 3
    assert "journal-000001.json is damaged" in caplog.text and "journal-000002.json is damaged" in caplog.text


def test_begin_and_strict_flush_failures_are_one_line_errors(tmp_path):
    from raymerge.errors import StorageError

    out = open_output(str(tmp_path / "out"), {})
    (tmp_path / "out" / STAGING / HEAD).mkdir(parents=True)  # the head's name is taken by a folder
    with pytest.raises(OutputError, match="cannot write the resume journal"):
        Journal.begin(out, _head())
    journal = Journal(out)
    journal.record(ItemRecord(0, 1, None))
    (tmp_path / "out" / STAGING / "journal-000000.json").mkdir()
    journal.flush()  # not strict: a warning, retried at the next flush
    with pytest.raises(StorageError, match="journal: could not record 1 finished items"):
        journal.flush(strict=True)
    during_a_pass = Journal(out)  # statistics results only: the message counts them, not "0 items"
    during_a_pass.record_stats(StatsRecord("magnitude-high", 0, ((0, 0, {}),)))
    with pytest.raises(StorageError, match="could not record 0 finished items and 1 statistics results"):
        during_a_pass.flush(strict=True)


@pytest.mark.parametrize("raw", [b"\xff", b"[" * 100000, b"{}", b'{"items": [{"id": 1}], "passes": []}',
                                 b'{"items": [{"id": 0, "crc32": 1, "etag": null, "stats": [[0, "x", 0, 0, 0]]}], '
                                 b'"passes": []}',
                                 b'{"items": [], "passes": [{"pass": "magnitude-high", "id": 0, "rows": [[0, -1, 5]]}]}',
                                 b'{"items": [], "passes": [{"pass": "elementwise", "id": 0, "rows": []}]}',
                                 b'{"items": [], "passes": [{"pass": "rm -rf", "id": 0, "rows": []}]}'])
def test_a_damaged_document_is_one_error(raw):
    # Not-JSON, hostile JSON and the wrong shape alike: callers catch Damaged and nothing else.
    for document in (JournalHead, JournalBatch):
        with pytest.raises(Damaged):
            document.from_json(raw)


def test_a_batch_and_a_head_read_back_as_written():
    batch = JournalBatch((ItemRecord(3, 7, '"e"', (TensorSums(2, 0.25, math.inf, 1, 0),)), ItemRecord(4, 0, None)),
                         (StatsRecord("magnitude-high", 5, ((2, 0, [[1, 7], [3, 4]]), (3, 4096, [None, [[2], [1]]]))),))
    assert JournalBatch.from_json(batch.to_json()) == batch
    assert JournalHead.from_json(_head().to_json()) == _head()


def _head_json(**changes) -> bytes:
    obj = json.loads(_head().to_json())
    obj.update(changes)
    return json.dumps(obj).encode()


@pytest.mark.parametrize("changes", [
    {"shards": ["x" * 2000], "handles": ["h"]}, {"handles": [""]}, {"handles": ["a\nb"]},
    {"handles": ["h" * 2000]}, {"replaces": ["x" * 2000]}, {"plan_hash": "a" * 10000}, {"run_id": "r" * 10000},
    {"inputs": [{"url": "u" * 10000, "fingerprint": "f"}]}, {"identities": ["i" * 10000]},
])
def test_a_head_with_a_name_out_of_range_is_damaged(changes):
    with pytest.raises(Damaged):
        JournalHead.from_json(_head_json(**changes))


def test_an_upload_id_with_a_slash_is_a_handle():
    # An S3 upload id is a parameter, never a path: the writer's check_handles vets it.
    assert JournalHead.from_json(_head_json(handles=["abc/def+=="])).handles == ("abc/def+==",)


@pytest.mark.parametrize("batch", [
    {"items": [{"id": 2**62, "crc32": 1, "etag": None, "stats": []}], "passes": []},
    {"items": [{"id": 0, "crc32": 1, "etag": "e" * 2000, "stats": []}], "passes": []},
    {"items": [{"id": 0, "crc32": 1, "etag": None, "stats": [[2**62, 0.0, 0.0, 0, 0]]}], "passes": []},
    {"items": [{"id": 0, "crc32": 1, "etag": None, "stats": [[0, 0.0, 0.0, 2**62, 0]]}], "passes": []},
    {"items": [], "passes": [{"pass": "magnitude-high", "id": 2**62, "rows": []}]},
    {"items": [], "passes": [{"pass": "magnitude-high", "id": 0, "rows": [[2**62, 0, None]]}]},
    {"items": [], "passes": [{"pass": "magnitude-high", "id": 0, "rows": [[0, 2**62, None]]}]},
])
def test_a_batch_with_an_index_out_of_range_is_damaged(batch):
    with pytest.raises(Damaged):
        JournalBatch.from_json(json.dumps(batch).encode())


def test_batch_numbers_are_ascii_digits_only(tmp_path):
    # "\d" matched other scripts' digits: a file journal-١٢٣٤٥٦.json was read as batch 123456.
    out = open_output(str(tmp_path / "out"), {})
    journal = Journal.begin(out, _head())
    journal.record(ItemRecord(0, 1, None))
    journal.flush(strict=True)
    foreign = JournalBatch((ItemRecord(1, 2, None),)).to_json()
    (tmp_path / "out" / STAGING / "journal-\u0661\u0662\u0663\u0664\u0665\u0666.json").write_bytes(foreign)
    state = Journal.load(out)
    assert sorted(state.done) == [0] and state.next_batch == 1


def test_resumed_sums_naming_a_tensor_beyond_the_plan_are_a_damaged_journal(tmp_path):
    from raymerge.commit.stats import nonfinite_totals, tensor_stats
    from raymerge.synth import LlamaShape, make_trio
    from raymerge import api

    trio = make_trio(str(tmp_path), LlamaShape(hidden=32, layers=1, vocab=64, intermediate=48))
    plan = api.plan(trio["base"], trio["chat"], trio["cp"])
    done = {0: ItemRecord(0, 1, None, (TensorSums(len(plan.tensors), 1.0, 1.0, 1, 1),))}
    for use in (tensor_stats, nonfinite_totals):
        with pytest.raises(OutputError, match=rf"item 0: its recorded statistics name tensor {len(plan.tensors)}, "
                                              r"but the plan has \d+ tensors; the resume journal is damaged"):
            use(plan, done)
