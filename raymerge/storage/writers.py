"""Output writers: bytes at known offsets of files that only get their final names at commit.

Protocol (the driver does 1, 3, 4 and 5; any worker does 2, in any order, any number of times):
  1. `lease_create(...)` makes the lease object that says which run owns the output (see
     execution.lease); only its owner goes on.
  2. `prepare(shards)` makes one target per shard and returns its handle: the name of a staged
     file for local output, a multipart upload id for S3. Nothing has a final name yet.
  3. `write(name, handle, part, offset, data)` puts bytes at `offset` of a shard (local: a
     positional write; S3: upload of part number `part`) and returns the part's ETag (S3) or None.
  4. `finalize(...)` gives every shard its final name (fsync + rename; complete the uploads), then
     `put(name, bytes)` writes small files (aux files, index, manifest) atomically.
  5. `abort(...)` when a run is given up: staged files and open uploads are removed.
Small staging files (the resume journal, the lease) live beside the staged shards, under
`.raymerge-staging/`. Handles are relative to that folder, so a moved output resumes where it is.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Any, Protocol

from raymerge.errors import OutputError
from raymerge.storage import urls

STAGING = ".raymerge-staging"
LEASE = "lease.json"
FINAL = "final"  # staged_parts: the shard already has its final name
GONE = "gone"  # staged_parts: its staged file or upload no longer exists
# Direct I/O alignment of file offsets, lengths and memory; at least a page, so that a buffered
# head or tail never shares a page-cache page with a direct write.
BLOCK = max(4096, mmap.PAGESIZE)


class LeaseTaken(Exception):
    """The lease object exists already (create), or is no longer the one we hold (replace)."""


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    data: bytes
    token: str  # what a conditional replace compares: an ETag, or a local file's identity
    age: float  # seconds since it was last written, by the storage's own clock


class Output(Protocol):
    url: str

    def listing(self) -> list[str]: ...
    def read_small(self, name: str) -> bytes | None: ...
    def free_bytes(self) -> int | None: ...
    def prepare(self, shards: list[tuple[str, int]]) -> list[str]: ...
    def write(self, name: str, handle: str, part: int, offset: int, data: memoryview) -> str | None: ...
    def finalize(self, shards: list[str], handles: list[str], etags: list[dict[int, str]],
                 sizes: list[int]) -> None: ...
    def put(self, name: str, data: bytes) -> None: ...
    def delete(self, names: list[str]) -> None: ...
    def abort(self, shards: list[str], handles: list[str] | None) -> None: ...
    def check_handles(self, shards: list[str], handles: list[str]) -> None: ...
    def put_staging(self, name: str, data: bytes) -> None: ...
    def remove_staging(self, name: str) -> None: ...
    def staging_files(self, prefix: str = "") -> dict[str, bytes]: ...
    def staged_parts(self, shard: str, handle: str, size: int) -> dict[int, str] | str | None: ...
    def read_staged(self, handle: str, start: int, end: int) -> bytes: ...
    def clear_staging(self) -> None: ...
    def lease_create(self, data: bytes) -> str: ...
    def lease_read(self) -> LeaseRecord | None: ...
    def lease_replace(self, data: bytes, token: str) -> str: ...
    def lease_refresh(self, data: bytes, token: str) -> str: ...
    def lease_delete(self, token: str) -> None: ...
    def close(self) -> None: ...


def open_output(url: str, storage_options: dict[str, Any] | None) -> Output:
    proto = urls.protocol(url)
    if proto == "file":
        from raymerge.storage.local_output import LocalOutput

        return LocalOutput(url)
    if proto == "s3":
        from raymerge.storage.s3_output import S3Output

        return S3Output(url, storage_options)
    raise OutputError(f"--out {urls.redact(url)}: writing to {proto}:// is not supported; "
                      "write to a local path or s3:// and copy from there")


def plain_name(name: object) -> bool:
    """A file name directly in a folder: what raymerge writes, and all it ever deletes."""
    return (isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name
            and "\\" not in name and "\x00" not in name)
