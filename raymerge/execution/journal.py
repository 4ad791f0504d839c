"""The resume journal, kept with the output under `.raymerge-staging/`: small documents in the
output's staging store (storage.store), the same for every backend.

Protocol (driver side):
  1. `Journal.begin(output, head)` writes the head: plan hash, inputs' fingerprints, the shard
     handles (staged file names relative to the staging folder, or multipart upload ids) and the
     old checkpoint's files an --overwrite run removes at commit.
  2. `record(item)` for each finished item, `record_stats(StatsRecord(pass, item, rows))` for each
     item of a statistics pass; `flush()` writes the records not yet written as one small batch
     file (at most every `interval` seconds, and at the end). A flush that fails is retried at the
     next one: a lost batch only means those items are done again.
  3. `Journal.load(output)` on resume: the head and every recorded item, read as untrusted data.
     A damaged head makes the state unusable (only --overwrite can start over); a damaged batch
     is skipped, and its items are done again.
The two documents are `JournalHead` (journal-head.json) and `JournalBatch` (journal-NNNNNN.json);
their `from_json` refuse anything but what `to_json` writes with one error, `Damaged`.
Credentials never enter it: only URLs (redacted), fingerprints, ids, checksums and statistics.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from raymerge.errors import TRANSIENT, OutputError, RaymergeError, StorageError
from raymerge.methods import ELEMENTWISE, PASS_ORDER
from raymerge.planning.plan import Plan
from raymerge.records import ItemRecord, TensorSums
from raymerge.storage import urls
from raymerge.storage.retry import reason_of
from raymerge.storage.store import plain_name
from raymerge.storage.writers import Output
from raymerge.untrusted import MAX_NAME, MAX_TEXT, UntrustedJSON, is_text, parse_json, shown

log = logging.getLogger("raymerge")

HEAD = "journal-head.json"
BATCH = re.compile(r"journal-([0-9]{6,9})\.json")  # [0-9]: \d also matches other scripts' digits
VERSION = 5  # 4: the staged files' identities; 5: a karcher dots pass's rows may sum its tangent too
MAX_COUNT = 2**62  # ids, tensor indexes, elements and counts: far past any real plan, safe in int64 sums


class Damaged(ValueError):
    """A journal document that is not JSON raymerge accepts, or not of the shape it writes; the
    message is a short reason, without the file."""


@dataclass(frozen=True, slots=True)
class JournalHead:
    plan_hash: str
    shards: tuple[str, ...]
    handles: tuple[str, ...]
    inputs: tuple[tuple[str, str], ...]  # (redacted URL, fingerprint) of every input file
    replaces: tuple[str, ...] = ()  # files of an older checkpoint at --out, removed at commit
    run_id: str = ""
    identities: tuple[str, ...] = ()  # per shard, what its staged target is (Output.identities)

    @classmethod
    def of(cls, plan: Plan, handles: list[str], replaces: tuple[str, ...] = (), run_id: str = "",
           identities: list[str] | None = None) -> JournalHead:
        return cls(plan.hash, tuple(s.name for s in plan.shards), tuple(handles),
                   tuple((urls.redact(f.url), f.fingerprint) for f in plan.files), tuple(replaces), run_id,
                   tuple(identities if identities is not None else [""] * len(handles)))

    def to_json(self) -> bytes:
        return json.dumps({"journal_version": VERSION, "plan_hash": self.plan_hash, "run_id": self.run_id,
                           "shards": list(self.shards), "handles": list(self.handles),
                           "identities": list(self.identities),
                           "inputs": [{"url": u, "fingerprint": f} for u, f in self.inputs],
                           "replaces": list(self.replaces)}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> JournalHead:
        obj = _object(_parse(raw), "the head")
        if obj.get("journal_version") != VERSION:
            raise Damaged(f"journal_version {shown(obj.get('journal_version'))}: written by another raymerge version")
        # Shards and replaced files are names a run writes or removes: plain names only, never a
        # path out of the folder. Handles are staged names or S3 upload ids (which may hold a "/"
        # and are never a path): short printable strings here, vetted by the writer's check_handles.
        shards, replaces = _names(obj, "shards"), _names(obj, "replaces")
        handles, identities = _strings(obj, "handles"), _strings(obj, "identities")
        if not all(h and len(h) <= MAX_NAME and h.isprintable() for h in handles):
            raise Damaged(f"handles: expected printable names of at most {MAX_NAME} characters")
        if len(shards) != len(handles) or len(identities) != len(handles):
            raise Damaged("shards, handles and identities do not match")
        inputs = obj.get("inputs")
        if not isinstance(inputs, list) or not all(
                isinstance(i, dict) and is_text(i.get("url")) and is_text(i.get("fingerprint")) for i in inputs):
            raise Damaged(f"inputs: expected a list of {{url, fingerprint}}, strings of at most {MAX_TEXT} characters")
        plan_hash, run_id = obj.get("plan_hash"), obj.get("run_id", "")
        if not is_text(plan_hash) or not is_text(run_id):
            raise Damaged(f"plan_hash and run_id must be strings of at most {MAX_TEXT} characters")
        return cls(plan_hash, tuple(shards), tuple(handles), tuple((i["url"], i["fingerprint"]) for i in inputs),
                   tuple(replaces), run_id, tuple(identities))


@dataclass(frozen=True, slots=True)
class StatsRecord:
    """One item's results in a statistics pass: (tensor, piece's first element, result) per piece."""

    pass_name: str
    item: int
    rows: tuple[tuple[int, int, Any], ...]


@dataclass(frozen=True, slots=True)
class JournalBatch:
    """The items finished since the previous flush, as one batch file writes them."""

    records: tuple[ItemRecord, ...]
    stats: tuple[StatsRecord, ...] = ()

    def to_json(self) -> bytes:
        return json.dumps({
            "items": [{"id": r.item, "crc32": r.crc32, "etag": r.etag,
                       "stats": [[s.tensor, _number(s.ss_delta), _number(s.ss_anchor), s.nonfinite,
                                  s.new_nonfinite] for s in r.sums]} for r in self.records],
            "passes": [{"pass": r.pass_name, "id": r.item, "rows": [list(row) for row in r.rows]}
                       for r in self.stats]}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> JournalBatch:
        obj = _object(_parse(raw), "a batch")
        items, passes = obj.get("items"), obj.get("passes")
        if not isinstance(items, list) or not isinstance(passes, list):
            raise Damaged("expected lists of items and passes")
        return cls(tuple(_record(r) for r in items), tuple(_stats_record(r) for r in passes))


@dataclass(frozen=True)
class JournalState:
    """What a journal holds: its head (None when damaged, with `problem` saying why) and the
    items recorded done."""

    head: JournalHead | None
    done: dict[int, ItemRecord]
    next_batch: int = 0
    problem: str | None = None
    stats: tuple[StatsRecord, ...] = ()  # the statistics passes' items done, in the order recorded


class Journal:
    def __init__(self, output: Output, interval: float = 2.0, next_batch: int = 0) -> None:
        self._output = output
        self._interval = interval
        self._pending: list[ItemRecord] = []
        self._pending_stats: list[StatsRecord] = []
        self._batch = next_batch
        self._last = time.monotonic()

    @classmethod
    def begin(cls, output: Output, head: JournalHead) -> Journal:
        try:
            output.staging.put(HEAD, head.to_json())
        except StorageError as e:
            if e.reason == TRANSIENT:  # still failing after the retries: the run may be run again
                raise
            raise OutputError(f"--out {urls.redact(output.url)}: cannot write the resume journal ({e}); "
                              "check the folder's permissions and free space") from e
        return cls(output)

    def record(self, item: ItemRecord) -> None:
        self._pending.append(item)
        if time.monotonic() - self._last >= self._interval:
            self.flush()

    def record_stats(self, record: StatsRecord) -> None:
        self._pending_stats.append(record)
        if time.monotonic() - self._last >= self._interval:
            self.flush()

    def flush(self, strict: bool = False) -> None:
        """Write pending records; a failure is retried at the next flush, or raised when `strict`
        (before commit: a commit cut short must find every item journaled)."""
        self._last = time.monotonic()
        if not self._pending and not self._pending_stats:
            return
        batch = JournalBatch(tuple(self._pending), tuple(self._pending_stats))
        try:
            self._output.staging.put(f"journal-{self._batch:06d}.json", batch.to_json())
        except RaymergeError as e:  # a StorageError, or the staging folder unusable (OutputError)
            what = f"{len(self._pending)} finished items" + (
                f" and {len(self._pending_stats)} statistics results" if self._pending_stats else "")
            if strict:
                raise StorageError(f"journal: could not record {what} in {urls.redact(self._output.url)} ({e})",
                                   reason_of(e)) from e
            log.warning("journal: could not record %s (%s); will try again", what, e)
            return
        self._batch += 1
        self._pending = []
        self._pending_stats = []

    @staticmethod
    def load(output: Output) -> JournalState | None:
        """The journal at `output`, or None when there is none."""
        files = _documents(output)
        if HEAD not in files:
            return None
        raw = files.pop(HEAD)
        try:
            head = JournalHead.from_json(raw)
        except Damaged as e:
            return JournalState(None, {}, problem=f"its head is damaged ({e})")
        done: dict[int, ItemRecord] = {}
        stats: list[StatsRecord] = []
        batches = [int(m.group(1)) for m in map(BATCH.fullmatch, files) if m]
        for name in sorted(files):
            if not BATCH.fullmatch(name):
                continue
            try:
                batch = JournalBatch.from_json(files[name])
            except Damaged as e:
                log.warning("journal: %s is damaged (%s); its items will be done again", name, e)
                continue
            done.update((r.item, r) for r in batch.records)
            stats += batch.stats
        return JournalState(head, done, max(batches, default=-1) + 1, stats=tuple(stats))


def _documents(output: Output) -> dict[str, bytes]:
    """The journal's documents in staging, by name; one deleted since the listing is not there."""
    try:
        found = {name: output.staging.get(name) for name in output.staging.list(prefix="journal-")}
    except StorageError as e:
        if e.reason == TRANSIENT:
            raise
        raise OutputError(f"--out {urls.redact(output.url)}: cannot read the resume journal ({e}); check its "
                          "permissions") from e
    return {name: got.data for name, got in found.items() if got is not None}


def _parse(raw: bytes) -> object:
    try:
        return parse_json(raw)
    except UntrustedJSON as e:
        raise Damaged(str(e)) from e


def _record(r: object) -> ItemRecord:
    r = _object(r, "a record")
    item, crc, etag, stats = r.get("id"), r.get("crc32"), r.get("etag"), r.get("stats")
    if not _int(item) or not _int(crc, 2**32) or not (etag is None or is_text(etag, MAX_NAME)):
        raise Damaged("a record's id, crc32 or etag has the wrong type or is out of range")
    if not isinstance(stats, list):
        raise Damaged("a record's stats are not a list")
    sums = []
    for s in stats:
        if (not isinstance(s, list) or len(s) != 5 or not all(_int(s[k]) for k in (0, 3, 4))
                or not all(_is_number(s[k]) for k in (1, 2))):
            raise Damaged("a record's stats row is not [tensor, ss_delta, ss_anchor, nonfinite, new_nonfinite] "
                          "(integers below 2**62)")
        sums.append(TensorSums(s[0], float(s[1]), float(s[2]), s[3], s[4]))
    return ItemRecord(item, crc, etag, tuple(sums))


def _stats_record(r: object) -> StatsRecord:
    r = _object(r, "a pass record")
    name, item, rows = r.get("pass"), r.get("id"), r.get("rows")
    if name not in PASS_ORDER or name == ELEMENTWISE or not _int(item) or not isinstance(rows, list):
        raise Damaged("a pass record's pass, id or rows has the wrong type")
    if not all(isinstance(row, list) and len(row) == 3 and _int(row[0]) and _int(row[1]) for row in rows):
        raise Damaged("a pass record's row is not [tensor, first element, result] (integers below 2**62)")
    return StatsRecord(name, item, tuple((row[0], row[1], row[2]) for row in rows))


def _object(obj: object, what: str) -> dict:
    if not isinstance(obj, dict):
        raise Damaged(f"{what} is not a JSON object")
    return obj


def _strings(obj: dict, key: str) -> list[str]:
    value = obj.get(key, [] if key == "replaces" else None)
    if not isinstance(value, list) or not all(is_text(v) for v in value):
        raise Damaged(f"{key}: expected a list of strings of at most {MAX_TEXT} characters")
    return value


def _names(obj: dict, key: str) -> list[str]:
    value = _strings(obj, key)
    if not all(plain_name(v) and len(v) <= MAX_NAME for v in value):
        raise Damaged(f"{key}: expected file names inside the output folder, of at most {MAX_NAME} characters")
    return value


def _number(x: float) -> float | str:
    """A sum of squares as JSON: strict JSON has no inf or NaN, so those are written as strings."""
    return x if math.isfinite(x) else str(x)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) or x in ("inf", "-inf", "nan")


def _int(x: object, bound: int = MAX_COUNT) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < bound
