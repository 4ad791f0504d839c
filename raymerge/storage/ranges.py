"""Exact, concurrent byte-range reads for every fsspec backend, pinned to a version where one is known.

`fetch` returns exactly the bytes asked for, never more (no read-ahead) and checks every length:
- S3 (s3fs): one ranged GET per range, gathered on s3fs's event loop, each with `If-Match: <ETag>`
  (and the VersionId, when the listing had one), so an object replaced after planning fails with
  `InputChanged` instead of mixing two versions into one output;
- other asynchronous backends (gcsfs, adlfs, http), local files and memory: their own `cat_ranges`,
  which reads each range exactly (concurrently where the backend is asynchronous);
- the rest (the Hugging Face Hub's `HfFileSystem`, ...): fsspec's default `cat_ranges` opens a file
  with a 5 MiB read-ahead per range, one after the other. Here each file is opened once without a
  cache (`cache_type="none"`) and its ranges fetched by the file's own `_fetch_range` (one ranged
  request each) on a small thread pool.

Versions: for S3, what `s3_version` makes of a listing entry (the ETag, then ` versionId=<id>`
where the listing has one); "" means unpinned. Other backends ignore them: a Hub file is pinned by
its URL (hf://org/name@<commit sha>/file), see storage/hub.py.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractBufferedFile

from raymerge.errors import CHANGED, StorageError
from raymerge.storage.retry import reason_of

CONCURRENCY = 16  # ranges in flight per call: enough to fill a link, few enough for any server
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class InputChanged(StorageError):
    """An input object is no longer the version the run was planned with: the run must start over."""

    def __init__(self, message: str, reason: str = CHANGED) -> None:
        super().__init__(message, reason)


def s3_version(info: dict[str, Any]) -> str:
    """The version string of an S3 listing entry: its ETag, and its VersionId when it has one."""
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    version_id = info.get("VersionId")
    return f"{etag} versionId={version_id}" if etag and version_id else etag


def fetch(fs: fsspec.AbstractFileSystem, requests: list[tuple[str, int, int]], *,
          versions: dict[str, str] | None = None, sizes: dict[str, int] | None = None,
          files: dict[str, Any] | None = None) -> list[bytes]:
    """The bytes of each (path, start, end) request, in order; exactly end - start of each.

    `versions`: path -> version string to pin reads to (S3). `sizes`: path -> size when known
    (saves a metadata request per file on backends read through file objects). `files`: a cache of
    open file objects to reuse across calls (its owner closes them, see `close_files`).
    """
    if not requests:
        return []
    if _is_s3(fs):
        blobs = _fetch_s3(fs, requests, versions or {})
    elif isinstance(fs, (AsyncFileSystem, LocalFileSystem, MemoryFileSystem)):
        blobs = fs.cat_ranges([p for p, _, _ in requests], [s for _, s, _ in requests],
                              [e for _, _, e in requests], on_error="raise")
    else:
        blobs = _fetch_by_file(fs, requests, sizes or {}, {} if files is None else files)
    for (path, start, end), blob in zip(requests, blobs):
        if len(blob) != end - start:
            raise StorageError(f"{_shown(fs, path)} returned {len(blob)} bytes for range [{start}, {end}); "
                               "the input changed or was truncated", CHANGED)
    return blobs


def close_files(files: dict[str, Any]) -> None:
    for f in files.values():
        try:
            f.close()
        except Exception:  # noqa: BLE001 - closing a read-only handle cannot lose data
            pass
    files.clear()


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols and hasattr(fs, "_call_s3")


def _shown(fs: fsspec.AbstractFileSystem, path: str) -> str:
    from raymerge.storage.urls import redact

    return redact(fs.unstrip_protocol(path))


def _fetch_s3(fs, requests: list[tuple[str, int, int]], versions: dict[str, str]) -> list[bytes]:
    """s3fs's `cat_ranges` cannot send If-Match: the same ranged GETs, with it, on s3fs's loop."""
    from fsspec.asyn import sync

    async def one(path: str, start: int, end: int, gate: asyncio.Semaphore) -> bytes:
        bucket, key, path_version = fs.split_path(path)
        kw: dict[str, Any] = {"Range": f"bytes={start}-{end - 1}"}
        etag, _, version_id = versions.get(path, "").partition(" versionId=")
        if etag:
            kw["IfMatch"] = f'"{etag}"'
        if version_id or path_version:
            kw["VersionId"] = version_id or path_version
        async with gate:
            try:
                resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, **kw)
            except OSError as e:
                if reason_of(e) == CHANGED:
                    raise InputChanged(f"{_shown(fs, path)} changed since the run was planned (ETag {etag} "
                                       "then); rerun with --overwrite to start over with the new version, "
                                       "or restore the original object") from e
                raise
            try:
                return await resp["Body"].read()
            finally:
                resp["Body"].close()

    async def gather() -> list[bytes]:
        gate = asyncio.Semaphore(CONCURRENCY)
        return await asyncio.gather(*(one(p, s, e, gate) for p, s, e in requests))

    return sync(fs.loop, gather)


def _fetch_by_file(fs, requests: list[tuple[str, int, int]], sizes: dict[str, int],
                   files: dict[str, Any]) -> list[bytes]:
    missing = sorted({p for p, _, _ in requests if p not in files})
    pool = _threads()
    for path, f in zip(missing, pool.map(lambda p: _open_exact(fs, p, sizes.get(p)), missing)):
        files[path] = f
    return list(pool.map(lambda r: _read_exact(files[r[0]], r[1], r[2]), requests))


def _open_exact(fs, path: str, size: int | None) -> Any:
    """A file object that fetches exactly what is asked: no cache, so no read-ahead."""
    kw = {"size": size} if size is not None else {}
    f = fs.open(path, "rb", cache_type="none", **kw)
    if not isinstance(f, AbstractBufferedFile):
        f = _Locked(f)
    return f


def _read_exact(f: Any, start: int, end: int) -> bytes:
    if isinstance(f, AbstractBufferedFile):
        # The backend's own range request: stateless, so one file object serves every thread.
        return f._fetch_range(start, end)
    return f.read_range(start, end)


class _Locked:
    """A plain file object (no range request of its own): seek and read under a lock."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self._lock = threading.Lock()

    def read_range(self, start: int, end: int) -> bytes:
        with self._lock:
            self._f.seek(start)
            return self._f.read(end - start)

    def close(self) -> None:
        self._f.close()


def _threads() -> ThreadPoolExecutor:
    """One small pool per process: range requests are I/O bound, and callers already run in parallel."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=CONCURRENCY, thread_name_prefix="raymerge-ranges")
        return _pool
