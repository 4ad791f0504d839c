"""Output writers: bytes at known places of files that only get their final names at commit.

A writer is one class per storage scheme, named in `WRITERS`; a new backend (GCS, Azure) is one
module implementing `Output` and one line there. Writers know nothing of plans: they see shard
names, their handles and sizes (`Target`), byte ranges (`Span`) and the journal's records of
items (`StagedItem`).

Protocol (the driver does 1, 2, 4 and 5; any worker does 3, in any order, any number of times):
  1. `lease_create(...)` makes the lease object that says which run owns the output (see
     execution.lease); only its owner goes on.
  2. `protect(paths)` names the local input files, which no write may reach. `prepare(shards)`
     makes one staged target per shard and returns its handle: the name of a staged file for
     local output, a multipart upload id for S3; `identities(handles)` says what each one is (a
     local file's inode), for the journal. Nothing has a final name yet.
     On --resume instead, `check_handles(...)` vets the journal's handles, and `verify_staged(target,
     items)` says which journaled items are verifiably on storage and whether the shard is still
     staged, already final (a commit cut short) or gone.
  3. `write(target, span, data)` puts an item's bytes at its span of the shard (local: a
     positional write at `span.start`; S3: upload of part `span.part`) and returns what proves it
     later (S3: the part's ETag) or None; the journal keeps it in a `StagedItem`.
  4. `finalize(shards)` gives every shard its final name (fsync + rename; complete the uploads
     from the items' ETags), then `put(name, bytes)` writes small files (aux, index, manifest)
     atomically.
  5. `abort(...)` when a run is given up: staged files and open uploads are removed.
Items are cut to the writer's `PartRules` (`part_rules(url)`, read before anything is opened).
Small staging files (the resume journal, the lease) live beside the staged shards, under
`.raymerge-staging/`. Handles are relative to that folder, so a moved output resumes where it is.
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

STAGING = ".raymerge-staging"
LEASE = "lease.json"
# Direct I/O alignment of file offsets, lengths and memory; at least a page, so that a buffered
# head or tail never shares a page-cache page with a direct write.
BLOCK = max(4096, mmap.PAGESIZE)
# scheme -> "module:class" of its writer, imported only when asked for: planning reads a
# writer's part rules without the writer's dependencies or any connection.
WRITERS = {"file": "raymerge.storage.local_output:LocalOutput", "s3": "raymerge.storage.s3_output:S3Output"}


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


class LeaseTaken(Exception):
    """The lease object exists already (create), or is no longer the one we hold (replace)."""


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    data: bytes
    token: str  # what a conditional replace compares: an ETag, or a local file's identity
    age: float  # seconds since it was last written, by the storage's own clock


class Output(Protocol):
    """One output location (see the module doc for the order of calls). A writer is built as
    `cls(url, storage_options)` and states its `rules`."""

    url: str
    rules: ClassVar[PartRules]

    # -- the location: what it holds, before a run decides anything (guard) --------------------
    def listing(self) -> list[str]:
        """Names directly at the output, sorted; [] when it does not exist yet."""

    def read_small(self, name: str) -> bytes | None:
        """A small file of the output (an old manifest or index), capped; None when absent."""

    def free_bytes(self) -> int | None:
        """Room left for staged shards; None when the storage has no such limit to ask about."""

    # -- the shards: staged, written, verified, finalized ----------------------------------------
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
        """Remove staged targets (found without handles where the journal lost them) and the
        staging files but the lease."""

    # -- final small files: aux files, index, manifest ------------------------------------------
    def put(self, name: str, data: bytes) -> None:
        """Write a small file at the output atomically: whole or not at all."""

    def delete(self, names: list[str]) -> None:
        """Remove plain-named files of the output (an older checkpoint's)."""

    # -- staging files: the journal, probes ------------------------------------------------------
    def put_staging(self, name: str, data: bytes) -> None:
        """Write a small staging file (a journal batch, a probe), whole or not at all."""

    def remove_staging(self, name: str) -> None:
        """Remove one staging file; never the lease."""

    def staging_files(self, prefix: str = "") -> dict[str, bytes]:
        """The small staging files whose names start with `prefix` (no shards, no lease)."""

    def clear_staging(self) -> None:
        """Remove every staging file but the lease."""

    # -- the lease (execution.lease): conditional create, replace and delete ---------------------
    def lease_create(self, data: bytes) -> str:
        """Create the lease only if absent (else LeaseTaken); its token."""

    def lease_read(self) -> LeaseRecord | None: ...

    def lease_replace(self, data: bytes, token: str) -> str:
        """Replace the lease only if it is still the one `token` names (else LeaseTaken)."""

    def lease_refresh(self, data: bytes, token: str) -> str:
        """The owner's heartbeat: as replace, and the lease never disappears meanwhile."""

    def lease_delete(self, token: str) -> None:
        """Delete the lease if it is still the one `token` names; quietly otherwise."""

    def close(self) -> None: ...


def _writer_class(url: str) -> type[Output] | None:
    spec = WRITERS.get(urls.protocol(url))
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


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


def plain_name(name: object) -> bool:
    """A file name directly in a folder: what raymerge writes, and all it ever deletes."""
    return (isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name
            and "\\" not in name and "\x00" not in name)
