"""Output safety, checked before anything is written: the output is not an input however it is
spelled, what an older checkpoint at --out consists of (and so what --overwrite may remove), and
whether the disk has room.

Locations are compared by what they are, not by their spelling: real paths with symbolic links
resolved, and the identity (device, inode) of every folder on the way, which also catches bind
mounts and case-insensitive file systems; every scheme fsspec knows for one store is one scheme
(`s3a://` and `s3n://` are `s3://`, `gs://` is `gcs://`, `az://` is `abfs://`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from raymerge.commit.manifest import MANIFEST_NAME, Manifest
from raymerge.commit.stats import STATS_NAME
from raymerge.errors import InputError, OutputError, StorageError
from raymerge.planning.inputs import AUX_FILES
from raymerge.safetensors.index import INDEX_NAME, SINGLE_NAME, parse_index
from raymerge.storage import urls
from raymerge.storage.store import plain_name
from raymerge.storage.writers import Output

log = logging.getLogger("raymerge")


def check_not_input(out: str, inputs: list[str], flag: str = "--out") -> None:
    """Refuse an output (`flag`: --out, or --report) that is, contains or lies inside any input (exit 2)."""
    for url in inputs:
        if _overlaps(out, url):
            raise OutputError(f"{flag} {urls.redact(out)}: is, holds or lies inside the input {urls.redact(url)}; "
                              f"inputs are never modified: choose another {'output location' if flag == '--out' else 'path'}")


def _overlaps(a: str, b: str) -> bool:
    a, b = urls.one_scheme(a), urls.one_scheme(b)
    if urls.protocol(a) != urls.protocol(b):
        return False
    if urls.protocol(a) != "file":
        return urls.is_inside(a, b) or urls.is_inside(b, a)
    ra, rb = os.path.realpath(urls.local_path(a)), os.path.realpath(urls.local_path(b))
    if urls.is_inside(ra, rb) or urls.is_inside(rb, ra):
        return True
    ida, idb = _identity(ra), _identity(rb)
    return (idb is not None and idb in _chain(ra)) or (ida is not None and ida in _chain(rb))


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _chain(path: str) -> set[tuple[int, int]]:
    """Identities of `path` and every folder above it that exists."""
    ids = set()
    while True:
        ident = _identity(path)
        if ident is not None:
            ids.add(ident)
        parent = os.path.dirname(path)
        if parent == path:
            return ids
        path = parent


@dataclass(frozen=True)
class OldCheckpoint:
    """What an output location already holds."""

    present: tuple[str, ...]  # files that make it look like a checkpoint: --overwrite is needed
    removable: tuple[str, ...]  # what --overwrite removes at commit: named by a manifest or an index
    strays: tuple[str, ...]  # checkpoint-like files nothing names: left where they are


def old_checkpoint(output: Output, writes: tuple[str, ...] = ()) -> OldCheckpoint:
    """The checkpoint at `output`, if any, and the files --overwrite would replace. `writes`: other
    names the new checkpoint writes (its card): a user's file of that name needs --overwrite too.

    Removable: the raymerge manifest and every file it names, the Hugging Face index and every
    shard it names, and `model.safetensors` (a single-file checkpoint is its own index). Nothing
    else is ever removed: a user's other files stay, even ones that look like a checkpoint's."""
    listing = _listing(output)
    present = tuple(n for n in listing if _is_checkpoint_file(n) or n in writes)
    named: set[str] = set()
    if MANIFEST_NAME in listing:
        named |= {MANIFEST_NAME, *_manifest_names(output)}
    if INDEX_NAME in listing:
        named |= {INDEX_NAME, *_index_names(output)}
    if SINGLE_NAME in listing:
        named.add(SINGLE_NAME)
    removable = tuple(sorted(n for n in named if n in listing and plain_name(n)))
    strays = tuple(n for n in present if n not in removable)
    return OldCheckpoint(present, removable, strays)


def _is_checkpoint_file(name: str) -> bool:
    return name in (MANIFEST_NAME, INDEX_NAME, STATS_NAME, *AUX_FILES) or name.endswith(".safetensors")


def _listing(output: Output) -> list[str]:
    """The names directly at the output, sorted; [] when it does not exist yet."""
    try:
        return output.files.list()
    except StorageError as e:
        raise OutputError(f"--out {urls.redact(output.url)}: cannot list it ({e}); check the path or bucket, its "
                          "permissions and the credentials") from e


def _read(output: Output, name: str) -> bytes:
    """A small file of the output (an old manifest or index); b"" (damaged) when absent."""
    try:
        found = output.files.get(name)
    except StorageError as e:
        raise OutputError(f"--out {urls.redact(output.url)}: cannot read {name} ({e}); check its permissions and "
                          "the credentials") from e
    return found.data if found is not None else b""


def _manifest_names(output: Output) -> list[str]:
    raw = _read(output, MANIFEST_NAME)
    try:
        return Manifest.from_json(raw, f"--out {urls.redact(output.url)}").named
    except InputError as e:
        log.warning("--overwrite: the old %s is damaged (%s); only the files an index names are replaced",
                    MANIFEST_NAME, e)
        return []


def _index_names(output: Output) -> list[str]:
    try:
        return list(parse_index(_read(output, INDEX_NAME), f"--out {urls.redact(output.url)}").values())
    except InputError as e:
        log.warning("--overwrite: the old %s is damaged (%s); the shards it names are left in place", INDEX_NAME, e)
        return []


def check_space(output: Output, needed: int, replacing: bool) -> None:
    """Refuse a local output whose disk cannot hold the bytes still to be written (exit 2)."""
    free = output.free_bytes()
    if free is None or free >= needed:
        return
    later = "; the old checkpoint there is removed only once the new one is complete" if replacing else ""
    raise OutputError(f"--out {urls.redact(output.url)}: needs {needed / 1e9:.2f} GB of free space for the staged "
                      f"shards, the disk has {free / 1e9:.2f} GB{later}; free space or choose another location")
