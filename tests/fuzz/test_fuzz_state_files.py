"""Fuzzing the parsers of what raymerge itself wrote, read back as untrusted data: the manifest,
the resume journal (its head, its batches, and a whole staging folder of them), and the lease.
Each near-valid document starts from what the current code writes, so that the fuzzing follows
the format as it changes; `test_seed_documents_are_accepted` keeps those seeds honest."""

from __future__ import annotations

import json
import math

from hypothesis import given
from hypothesis import strategies as st

from raymerge.commit.manifest import Manifest
from raymerge.errors import InputError, RaymergeError
from raymerge.execution import lease
from raymerge.execution.journal import HEAD, Damaged, Journal, JournalBatch, JournalHead, JournalState, StatsRecord
from raymerge.execution.lease import Holder
from raymerge.records import ItemRecord, TensorSums
from raymerge.storage.store import Stored
from tests.fuzz.strategies import (
    EDGE_INTS,
    ODD_DIGITS,
    REFUSED,
    attempt,
    check_message,
    dumps,
    fuzz,
    hostile_values,
    mutated_bytes,
    mutated_document,
    odd_ints,
    odd_text,
)

WHERE = "raymerge verify /data/out"

GOOD_MANIFEST = {
    "format": "raymerge-manifest", "format_version": 1, "raymerge_version": "0.1", "created": "2024-01-01T00:00:00Z",
    "kind": "chat vector merge", "recipe": {"kind": "merge", "base": "/b"}, "layout": {"shard_size": 100},
    "plan_hash": "ab" * 32, "stats": "raymerge_stats.parquet",
    "files": ["config.json", "raymerge_stats.parquet", "model-00001-of-00002.safetensors",
              "model-00002-of-00002.safetensors", "model.safetensors.index.json", "raymerge_manifest.json"],
    "inputs": [{"role": "cp", "url": "/cp/model.safetensors", "size": 10, "version": "", "fingerprint": "x"}],
    "output_bytes": 300,
    "nonfinite": {"lm_head.weight": {"elements": 2, "from_finite_inputs": 0}},
    "facts": {"model.layers.0.mlp.weight": [None, {"threshold": 3}]},
    "shards": [{"name": "model-00001-of-00002.safetensors", "size": 200, "tensors": 2, "items": 2},
               {"name": "model-00002-of-00002.safetensors", "size": 100, "tensors": 1, "items": 1}],
    "items": [{"id": 0, "shard": 0, "part": 0, "start": 0, "end": 120, "crc32": "0badf00d", "etag": None},
              {"id": 1, "shard": 0, "part": 1, "start": 120, "end": 200, "crc32": "00000000", "etag": None},
              {"id": 2, "shard": 1, "part": 0, "start": 0, "end": 100, "crc32": "ffffffff", "etag": '"e1"'}],
}

# What a manifest's fields get instead of their values: wrong types, integers past 2**62 and
# negative ones, crc32s that are almost hex, paths out of the folder, odd strings.
manifest_values = st.one_of(
    hostile_values, st.sampled_from(EDGE_INTS),
    st.sampled_from(["0badf00", "0BADF00D", "0badf00d0", "0xbadf00", "\u0661badf00d", "../x", "/abs", "a/b", "",
                     "raymerge-manifest", "a\\b", "x\x00"]))


def _head_bytes() -> bytes:
    values = {"plan_hash": "ab" * 32, "shards": ("model-00001-of-00002.safetensors",),
              "handles": ("model-00001-of-00002.safetensors.partial",),
              "inputs": (("/in/cp/model.safetensors", "size=1;version=2;header=3"),),
              "replaces": ("old.json",), "run_id": "r1"}
    fields = JournalHead.__dataclass_fields__
    if "identities" in fields:  # journal version 4 and later: one per handle
        values["identities"] = ("ino=1;dev=2",)
    return JournalHead(**{k: v for k, v in values.items() if k in fields}).to_json()


def _batch_bytes() -> bytes:
    return JournalBatch((ItemRecord(0, 123, None, (TensorSums(0, 1.5, 2.5, 0, 0),)),
                         ItemRecord(7, 2**32 - 1, '"etag-1"', (TensorSums(3, math.inf, math.nan, 7, 3),))),
                        (StatsRecord("magnitude-high", 2, ((0, 0, 0.25), (1, 64, [1, 2]))),)).to_json()


GOOD_HEAD = json.loads(_head_bytes())
GOOD_BATCH = json.loads(_batch_bytes())
GOOD_HOLDER = json.loads(lease._me("fuzz-run").to_json())  # this process, on this machine

journal_values = st.one_of(manifest_values, st.sampled_from(["inf", "-inf", "nan", "Infinity", 2**32, 2**32 - 1,
                                                             "magnitude-high", "elementwise", "l1-norm"]))
holder_values = st.one_of(
    hostile_values, st.sampled_from([0, -1, 1, 2**22, 4194304, 4194305, 2**31 - 1, 2**31, 2**63, 10**39, -(2**31),
                                  1.5, 1e300, True, "1", " 12 ", "nan", "inf", "1e999", "9" * 50, *ODD_DIGITS,
                                  lease.this_machine()]))


class StagingFolder:
    """What Journal.load reads of an output, its staging store's list and get, over generated files."""

    url = "/data/out"

    def __init__(self, files: dict[str, bytes]) -> None:
        self._files = files
        self.staging = self

    def list(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self._files if k.startswith(prefix))

    def get(self, name: str) -> Stored | None:
        return Stored(self._files[name], "v", 0.0) if name in self._files else None


def test_seed_documents_are_accepted():
    """The near-valid documents start valid: otherwise the fuzzing below never gets past the
    first check of each parser."""
    assert Manifest.from_json(json.dumps(GOOD_MANIFEST).encode(), WHERE).plan_hash == GOOD_MANIFEST["plan_hash"]
    assert JournalHead.from_json(json.dumps(GOOD_HEAD).encode()).plan_hash == GOOD_HEAD["plan_hash"]
    assert len(JournalBatch.from_json(json.dumps(GOOD_BATCH).encode()).records) == 2
    holder = Holder.from_json(json.dumps(GOOD_HOLDER).encode())
    assert holder is not None and holder.machine == lease.this_machine()


@fuzz(1000)
@given(mutated_document(GOOD_MANIFEST, manifest_values), st.booleans(), st.data())
def test_manifests_raise_only_input_errors(doc, ascii_only, data):
    """Guards against a damaged or hostile raymerge_manifest.json (fields of the wrong type,
    integers past 2**62 or negative, missing and extra keys, item ranges past their shard, odd
    names) escaping verify, inspect or --overwrite as anything but one InputError line."""
    raw = mutated_bytes(data.draw, dumps(doc, ascii_only))
    attempt(InputError, Manifest.from_json, raw, WHERE)


@fuzz(1000)
@given(mutated_document(GOOD_HEAD, journal_values), st.booleans(), st.data())
def test_journal_heads_raise_only_damaged(doc, ascii_only, data):
    """Guards against a damaged journal head (wrong types, shard names out of the folder,
    mismatched lists, another version) escaping as anything but Damaged, whose short reason
    becomes the resume state's problem."""
    raw = mutated_bytes(data.draw, dumps(doc, ascii_only))
    attempt(Damaged, JournalHead.from_json, raw)


@fuzz(1000)
@given(mutated_document(GOOD_BATCH, journal_values), st.booleans(), st.data())
def test_journal_batches_raise_only_damaged(doc, ascii_only, data):
    """Guards against a damaged journal batch (ids and crc32s out of range, stats rows of the
    wrong length or type, unknown passes) escaping as anything but Damaged, which skips it."""
    raw = mutated_bytes(data.draw, dumps(doc, ascii_only))
    attempt(Damaged, JournalBatch.from_json, raw)


staging_names = st.one_of(
    st.sampled_from([HEAD, "journal-000000.json", "journal-000001.json", "journal-999999999.json",
                     "journal-0000000000.json", "journal-1.json", "journal-\u0661\u0662\u0663\u0664\u0665\u0666.json",
                     "journal-00000\u00b2.json", "journal-000000.json.tmp", "journal-"]),
    odd_text.map(lambda s: "journal-" + s))
staging_documents = st.one_of(
    st.builds(dumps, mutated_document(GOOD_HEAD, journal_values), st.booleans()),
    st.builds(dumps, mutated_document(GOOD_BATCH, journal_values), st.booleans()),
    st.just(_head_bytes()), st.just(_batch_bytes()), st.binary(max_size=24))


@fuzz(500)
@given(st.dictionaries(staging_names, staging_documents, max_size=4), st.booleans(), st.data())
def test_journal_load_reports_damage_as_a_state(files, with_good_head, data):
    """Guards against a staging folder of damaged journal files (head and batches, and names that
    look like batches) making Journal.load fail with anything but a RaymergeError line: a
    damaged head is a state with a problem, a damaged batch is skipped."""
    if with_good_head:
        files = {**files, HEAD: mutated_bytes(data.draw, _head_bytes())}
    state = attempt(RaymergeError, Journal.load, StagingFolder(files))
    if state is not REFUSED and state is not None:
        assert isinstance(state, JournalState)
        if state.head is None:
            assert isinstance(state.problem, str)
            check_message(state.problem)


@fuzz(1500)
@given(st.one_of(mutated_document(GOOD_HOLDER, holder_values),
                 st.builds(lambda pid: {**GOOD_HOLDER, "pid": pid}, st.one_of(holder_values, odd_ints))),
       st.booleans(), st.data())
def test_lease_holders_are_read_or_ignored_and_judged_without_raising(doc, ascii_only, data):
    """Guards against another run's lease file (a pid out of range or of the wrong type, odd
    times and names, garbage) making Holder.from_json raise rather than return None, or making
    is_gone() raise (os.kill with a pid past the C range) for a holder it returned."""
    raw = mutated_bytes(data.draw, dumps(doc, ascii_only))
    holder = Holder.from_json(raw)
    assert holder is None or isinstance(holder, Holder)
    if holder is not None:
        assert holder.is_gone() in (True, False)
