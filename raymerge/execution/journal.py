"""The resume journal, kept with the output under `.raymerge-staging/`.

Protocol (driver side):
  1. `Journal.begin(output, plan, handles)` writes the head: plan hash, inputs' fingerprints and
     the shard handles (staged files or multipart upload ids).
  2. `record(result)` for each finished item; `flush()` writes the records not yet written as one
     small batch file (at most every `interval` seconds, and at the end). A flush that fails is
     retried at the next one: a lost batch only means those items are done again.
  3. `Journal.load(output)` on resume: the head and every recorded item.
Credentials never enter it: only URLs (redacted), fingerprints, ids, checksums and statistics.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from raymerge.errors import RaymergeError
from raymerge.execution.worker import ItemResult
from raymerge.plan import Plan
from raymerge.storage import urls
from raymerge.storage.writers import Output

log = logging.getLogger("raymerge")

HEAD = "journal-head.json"
VERSION = 1


@dataclass(frozen=True)
class JournalState:
    head: dict
    results: dict[int, ItemResult]


class Journal:
    def __init__(self, output: Output, interval: float = 2.0, next_batch: int = 0) -> None:
        self._output = output
        self._interval = interval
        self._pending: list[dict] = []
        self._batch = next_batch
        self._last = time.monotonic()

    @classmethod
    def begin(cls, output: Output, plan: Plan, handles: list[str]) -> Journal:
        head = {"journal_version": VERSION, "plan_hash": plan.hash, "handles": handles,
                "shards": [s.name for s in plan.shards],
                "inputs": [{"url": urls.redact(f.url), "fingerprint": f.fingerprint} for f in plan.files]}
        output.put_staging(HEAD, json.dumps(head).encode())
        return cls(output)

    def record(self, result: ItemResult) -> None:
        self._pending.append({"id": result.item, "crc32": result.crc32, "etag": result.etag,
                              "stats": [list(s) for s in result.stats]})
        if time.monotonic() - self._last >= self._interval:
            self.flush()

    def flush(self, strict: bool = False) -> None:
        """Write pending records; a failure is retried at the next flush, or raised when `strict`
        (before commit: a commit cut short must find every item journaled)."""
        self._last = time.monotonic()
        if not self._pending:
            return
        try:
            self._output.put_staging(f"journal-{self._batch:06d}.json", json.dumps(self._pending).encode())
        except (RaymergeError, OSError) as e:
            if strict:
                raise
            log.warning("journal: could not record %d finished items (%s); will try again", len(self._pending), e)
            return
        self._batch += 1
        self._pending = []

    @staticmethod
    def load(output: Output) -> JournalState | None:
        files = output.staging_files()
        if HEAD not in files:
            return None
        head = json.loads(files.pop(HEAD))
        results: dict[int, ItemResult] = {}
        for name in sorted(files):
            if name.startswith("journal-"):
                for r in json.loads(files[name]):
                    results[r["id"]] = ItemResult(r["id"], r["crc32"], r["etag"], 0, 0.0, "journal", 0,
                                                  tuple(tuple(s) for s in r["stats"]))
        head["batches"] = sum(1 for n in files if n.startswith("journal-"))
        return JournalState(head, results)
