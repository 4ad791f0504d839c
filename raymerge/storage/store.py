"""A store: small objects directly in one folder or prefix, written whole and compared by version.

Everything raymerge writes beside the shards is one: the output's own small files (aux files,
index, manifest: `Output.files`) and its staging files (the journal, probes, the lease:
`Output.staging`, over `.raymerge-staging/`). The lease and the journal are built once on this
protocol (execution.lease, execution.journal); a backend implements only these primitives.

Protocol (names are plain file names, never paths: `plain`):
  - `put(name, data)` writes an object whole or not at all, and returns its version;
  - `put_if_absent(name, data)` the same only where no object of that name exists, else `Conflict`;
  - `put_if_match(name, data, version)` the same only where the object is still that version,
    else `Conflict`: of two callers holding one version, only one succeeds (a compare-and-swap);
  - `get(name)` an object's bytes (at most `SMALL_CAP`), version and age, or None where absent;
  - `delete_if_match(name, version)` deletes it while it is still that version, quietly otherwise;
  - `delete(names)` deletes objects, missing ones included;
  - `list(prefix)` the names it holds that start with `prefix`, sorted.
A version is an opaque token that changes whenever the object is written: an ETag, or a local
file's identity. An age is measured by the storage's own clock where it has one (S3: its Date against the object's
LastModified); a local file's, as now against its mtime (on NFS, the server's).
What is there but cannot be an object (a FIFO, a link, a folder, an object past `SMALL_CAP`)
reads as damaged: empty bytes, which every reader of raymerge's documents refuses. Failures
raise StorageError, its reason given by the backend's classifier (storage.retry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from raymerge.errors import CommitError

SMALL_CAP = 64 * 2**20  # bytes: the largest manifest, index, journal document or lease read back


class Conflict(Exception):
    """A conditional write found the object not as its condition said: there already (put_if_absent),
    or no longer the version given (put_if_match)."""


@dataclass(frozen=True, slots=True)
class Stored:
    data: bytes  # b"" where what is there cannot be an object (see the module's docstring)
    version: str  # what put_if_match and delete_if_match compare
    age: float  # seconds since it was last written, by the storage's own clock


class Store(Protocol):
    """Small objects in one folder or prefix (see the module's docstring)."""

    url: str  # the folder or prefix, for messages

    def put(self, name: str, data: bytes) -> str: ...

    def put_if_absent(self, name: str, data: bytes) -> str: ...

    def put_if_match(self, name: str, data: bytes, version: str) -> str: ...

    def get(self, name: str) -> Stored | None: ...

    def delete_if_match(self, name: str, version: str) -> None: ...

    def delete(self, names: list[str]) -> None: ...

    def list(self, prefix: str = "") -> list[str]: ...


def plain_name(name: object) -> bool:
    """A file name directly in a folder: what raymerge writes, and all it ever deletes."""
    return (isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name
            and "\\" not in name and "\x00" not in name)


def plain(name: str, where: str) -> str:
    """`name`, refused unless it is a plain name: a store never reaches out of its folder."""
    if not plain_name(name):
        raise CommitError(f"refusing to write or remove {name!r} in {where}: not a plain file name")
    return name
