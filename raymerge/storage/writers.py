"""Output writers: bytes at known places of files that only get their final names at commit.

A backend is one module per storage scheme, named in `WRITERS`. A new one (GCS, Azure) is a
module in `storage/` that defines:
  - its `Output` class, as `OUTPUT`: the shard staging below, the one part that is really
    per-backend, since big shards are written in pieces, by many workers, at offsets or as parts;
  - its `Store` class (storage.store): seven primitives on small objects, which its output
    exposes twice: `files` over the output folder or prefix, `staging` over `.raymerge-staging/`;
  - `classify(e)`: what its own exceptions mean, a reason (errors.TRANSIENT, FULL, MISSING,
    DENIED, CHANGED) and whether a retry can help (storage.retry);
and one line in `WRITERS`. The lease (execution.lease) and the journal (execution.journal) are
built once on the `staging` store; the guard reads, and the commit writes, small files through
`files`.
Writers know nothing of plans: they see shard names, their handles and sizes (`Target`), byte
ranges (`Span`) and the journal's records of items (`StagedItem`).

Shard staging, once the run holds the output's lease (the driver does 1 and 3; any worker does
2, in any order, any number of times):
  1. `protect(paths)` names the local input files, which no write may reach. `prepare(shards)`
     makes one staged target per shard and returns its handle: the name of a staged file for
     local output, a multipart upload id for S3; `identities(handles)` says what each one is (a
     local file's inode), for the journal. Nothing has a final name yet.
     On --resume instead, `check_handles(...)` vets the journal's handles, and `verify_staged(target,
     items)` says which journaled items are verifiably on storage and whether the shard is still
     staged, already final (a commit cut short) or gone.
  2. `write(target, span, data)` puts an item's bytes at its span of the shard (local: a
     positional write at `span.start`; S3: upload of part `span.part`) and returns what proves it
     later (S3: the part's ETag) or None; the journal keeps it in a `StagedItem`.
  3. `finalize(shards)` gives every shard its final name (fsync + rename; complete the uploads
     from the items' ETags); then the small files go to `files` (aux, index, the manifest last)
     and `clear_staging` drops the journal.
  `abort(...)` removes the staged targets when a run starts over (`clear_staging` the rest);
  `free_bytes()` says what room is left for them; `close()` releases what the writer holds open.
Items are cut to the writer's `PartRules` (`part_rules(url)`, read before anything is opened).
Handles are relative to the staging folder, so a moved output resumes where it is.
"""

from __future__ import annotations

import enum
import importlib
import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from raymerge.errors import OutputError
from raymerge.storage import urls
from raymerge.storage.store import Store

STAGING = ".raymerge-staging"
LEASE = "lease.json"
# Direct I/O alignment of file offsets, lengths and memory; at least a page, so that a buffered
# head or tail never shares a page-cache page with a direct write.
BLOCK = max(4096, mmap.PAGESIZE)
# scheme -> the backend module: its `OUTPUT` class and its `classify`, imported only when asked for
# (planning reads a writer's part rules without the writer's dependencies or any connection).
WRITERS = {"file": "raymerge.storage.local_output", "s3": "raymerge.storage.s3_output"}


@dataclass(frozen=True, slots=True)
class PartRules:
    """What a writer asks of the items of one shard: every item but the last at least
    `min_part` bytes, at most `max_parts` items a shard; 0: no limit."""

    min_part: int = 0
    max_parts: int = 0


@dataclass(frozen=True, slots=True)
class Target:
    """One shard's staged target: its final name, the handle `prepare` gave, its planned size, and
    the identity `identities` gave for it (what resume checks; "" where a storage has none)."""

    shard: str
    handle: str
    size: int
    identity: str = ""


@dataclass(frozen=True, slots=True)
class Span:
    """Bytes [start, end) of a shard, its `part`-th item (1-based): each writer reads what it needs."""

    part: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class StagedItem:
    """The journal's record of an item written to a shard: what `write` was given and returned."""

    item: int
    span: Span
    crc32: int  # of the item's bytes
    etag: str | None  # what `write` returned


class ShardState(enum.Enum):
    STAGED = "staged"  # the staged target is there, as prepared
    FINAL = "final"  # a commit cut short already gave the shard its final name, at its planned size
    GONE = "gone"  # neither: the staged file or upload no longer exists, or is not its planned size


@dataclass(frozen=True, slots=True)
class Verified:
    """What `verify_staged` found: the shard's state, and the ids of the items given whose bytes
    are verifiably there (all of them when FINAL, none when GONE)."""

    state: ShardState
    items: frozenset[int] = frozenset()


class Output(Protocol):
    """One output location (see the module doc for the order of calls). A writer is built as
    `cls(url, storage_options)`, states its `rules` and opens nothing until used."""

    url: str
    rules: ClassVar[PartRules]
    files: Store  # the output's own small files: aux files, index, manifest (and what the guard reads)
    staging: Store  # the staging files: the journal, probes, the lease

    def free_bytes(self) -> int | None:
        """Room left for staged shards; None when the storage has no such limit to ask about."""

    def protect(self, paths: Sequence[str]) -> None:
        """Local input files: a write through any of them is refused (before and during the run)."""

    def prepare(self, shards: list[tuple[str, int]]) -> list[str]:
        """One staged target per (name, size), none under its final name; their handles, which
        the journal keeps."""

    def identities(self, handles: list[str]) -> list[str]:
        """What each staged target `prepare` made is, for `Target.identity` ("" where nothing can
        stand in for it, as for an S3 upload id)."""

    def write(self, target: Target, span: Span, data: memoryview) -> str | None:
        """The bytes of one item; idempotent. Returns what `StagedItem.etag` keeps."""

    def check_handles(self, shards: list[str], handles: list[str]) -> None:
        """Refuse (OutputError) handles read from a journal that this writer would not have given."""

    def verify_staged(self, target: Target, items: Sequence[StagedItem]) -> Verified:
        """Which journaled items of a shard are verifiably on storage, never trusting the journal
        alone: bytes that never reached the storage must be written again. A staged target that
        is not the one `target.identity` names is refused (OutputError)."""

    def finalize(self, shards: Sequence[tuple[Target, Sequence[StagedItem]]]) -> None:
        """Give every shard, with all its items, its final name; a shard already final (a commit
        cut short) is left as it is."""

    def abort(self, shards: list[str], handles: list[str] | None) -> None:
        """Remove the staged targets (found without handles where the journal lost them); the
        staging files are `clear_staging`'s."""

    def close(self) -> None:
        """Release what this writer holds open (staged files); it may be used again after."""


def clear_staging(output: Output) -> None:
    """Remove every staging file but the lease: the journal and probes, once the manifest says the
    checkpoint is complete, or when a run starts over."""
    output.staging.delete([name for name in output.staging.list() if name != LEASE])


def _writer_class(url: str) -> type[Output] | None:
    module = WRITERS.get(urls.protocol(url))
    return importlib.import_module(module).OUTPUT if module else None


def part_rules(url: str | None) -> PartRules:
    """The part rules of the writer of `url`, opening nothing. No output (`raymerge plan`), or
    one no writer takes (open_output refuses it), has no limits."""
    cls = _writer_class(url) if url else None
    return cls.rules if cls is not None else PartRules()


def open_output(url: str, storage_options: dict[str, Any] | None) -> Output:
    cls = _writer_class(url)
    if cls is None:
        raise OutputError(f"--out {urls.redact(url)}: writing to {urls.protocol(url)}:// is not supported; "
                          "write to a local path or s3:// and copy from there")
    return cls(url, storage_options)
