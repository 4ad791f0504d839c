"""Output writers: bytes at known offsets of files that only get their final names at commit.

Protocol (the driver does 1, 3 and 4; any worker does 2, in any order, any number of times):
  1. `prepare(shards)` makes one target per shard and returns its handle: a staged file for local
     output, a multipart upload id for S3. Nothing has a final name yet.
  2. `write(name, handle, part, offset, data)` puts bytes at `offset` of a shard (local: a
     positional write; S3: upload of part number `part`) and returns the part's ETag (S3) or None.
  3. `finalize(...)` gives every shard its final name (fsync + rename; complete the uploads), then
     `put(name, bytes)` writes small files (aux files, index, manifest) atomically.
  4. `abort(...)` when a run is given up: staged files and open uploads are removed.
Small staging files (the resume journal) live beside the staged shards, under `.raymerge-staging/`.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import threading
from typing import Any, Protocol

from raymerge.errors import OutputError, StorageError
from raymerge.storage import urls
from raymerge.storage.retry import with_retries

STAGING = ".raymerge-staging"
FINAL = "final"  # staged_parts: the shard already has its final name
GONE = "gone"  # staged_parts: its staged file or upload no longer exists


class Output(Protocol):
    url: str

    def listing(self) -> list[str]: ...
    def prepare(self, shards: list[tuple[str, int]]) -> list[str]: ...
    def write(self, name: str, handle: str, part: int, offset: int, data: memoryview) -> str | None: ...
    def finalize(self, shards: list[str], handles: list[str], etags: list[dict[int, str]],
                 sizes: list[int]) -> None: ...
    def put(self, name: str, data: bytes) -> None: ...
    def delete(self, names: list[str]) -> None: ...
    def abort(self, shards: list[str], handles: list[str]) -> None: ...
    def put_staging(self, name: str, data: bytes) -> None: ...
    def staging_files(self) -> dict[str, bytes]: ...
    def staged_parts(self, shard: str, handle: str, size: int) -> dict[int, str] | str | None: ...
    def read_staged(self, handle: str, start: int, end: int) -> bytes: ...
    def clear_staging(self) -> None: ...
    def close(self) -> None: ...


def open_output(url: str, storage_options: dict[str, Any] | None) -> Output:
    proto = urls.protocol(url)
    if proto == "file":
        return LocalOutput(url)
    if proto == "s3":
        return S3Output(url, storage_options)
    raise OutputError(f"--out {urls.redact(url)}: writing to {proto}:// is not supported; "
                      "write to a local path or s3:// and copy from there")


# Direct I/O alignment of file offsets, lengths and memory; at least a page, so that a buffered
# head or tail never shares a page-cache page with a direct write.
BLOCK = max(4096, mmap.PAGESIZE)


class LocalOutput:
    """A local directory. Shards are staged under `.raymerge-staging/` and renamed at commit.

    Workers write the block-aligned middle of each item with direct I/O (O_DIRECT): new page-cache
    pages are the slowest memory a machine hands out, and a merge's output is not read again soon.
    The unaligned head and tail of an item, and any write direct I/O refuses, go through the page
    cache; the two never share a block, and commit's fsync makes both durable.
    """

    def __init__(self, url: str) -> None:
        self.url = urls.local_path(url)
        self._staging = os.path.join(self.url, STAGING)
        self._fds: dict[tuple[str, int], int] = {}
        self._direct = hasattr(os, "O_DIRECT")
        self._lock = threading.Lock()  # worker threads share the open files

    def listing(self) -> list[str]:
        if os.path.isfile(self.url):
            raise OutputError(f"--out {self.url}: is a file; give a directory for the checkpoint")
        return sorted(os.listdir(self.url)) if os.path.isdir(self.url) else []

    def prepare(self, shards: list[tuple[str, int]]) -> list[str]:
        try:
            os.makedirs(self._staging, exist_ok=True)
            handles = []
            for name, size in shards:
                path = os.path.join(self._staging, name + ".partial")
                with open(path, "wb") as f:
                    f.truncate(size)  # its final size: workers write at offsets, in any order
                handles.append(path)
        except OSError as e:
            raise OutputError(f"--out {self.url}: cannot create output files ({e.strerror}); "
                              "check the path, its permissions and free space") from e
        return handles

    def _fd(self, handle: str, flags: int) -> int:
        with self._lock:
            fd = self._fds.get((handle, flags))
            if fd is None:
                fd = self._fds[(handle, flags)] = os.open(handle, flags)
            return fd

    def write(self, name: str, handle: str, part: int, offset: int, data: memoryview) -> str | None:
        lo = -(-offset // BLOCK) * BLOCK - offset  # the aligned middle: data[lo:hi]
        hi = (offset + len(data)) // BLOCK * BLOCK - offset
        if self._direct and hi > lo and self._write_direct(handle, offset + lo, data[lo:hi]):
            self._pwrite(name, self._fd(handle, os.O_RDWR), offset, data[:lo])
            self._pwrite(name, self._fd(handle, os.O_RDWR), offset + hi, data[hi:])
        else:
            self._pwrite(name, self._fd(handle, os.O_RDWR), offset, data)
        return None

    def _write_direct(self, handle: str, offset: int, data: memoryview) -> bool:
        """Write with O_DIRECT; False (and buffered from now on) where the file system or the
        memory alignment does not allow it."""
        done = 0
        try:
            fd = self._fd(handle, os.O_RDWR | os.O_DIRECT)
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
            return True
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP) or done:
                raise StorageError(f"execute: writing {handle} at byte {offset} failed: {e.strerror}") from e
            self._direct = False
            return False

    @staticmethod
    def _pwrite(name: str, fd: int, offset: int, data: memoryview) -> None:
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
        except OSError as e:
            raise StorageError(f"execute: writing {name} at byte {offset + done} failed: {e.strerror}") from e

    def read_staged(self, handle: str, start: int, end: int) -> bytes:
        fd, parts = self._fd(handle, os.O_RDWR), []
        while start < end:  # one pread returns at most ~2 GiB
            got = os.pread(fd, end - start, start)
            if not got:
                break
            parts.append(got)
            start += len(got)
        return b"".join(parts)

    def staged_parts(self, shard: str, handle: str, size: int) -> dict[int, str] | str | None:
        """None: local parts are checked by reading them back (`read_staged`); FINAL: the shard was
        already given its final name by a commit cut short; GONE: the staged file is missing or
        not its planned size."""
        if os.path.isfile(handle) and os.path.getsize(handle) == size:
            return None
        return FINAL if self._is_final(shard, size) else GONE

    def _is_final(self, shard: str, size: int) -> bool:
        path = os.path.join(self.url, shard)
        return os.path.isfile(path) and os.path.getsize(path) == size

    def finalize(self, shards: list[str], handles: list[str], etags: list[dict[int, str]],
                 sizes: list[int]) -> None:
        self.close()
        for name, path, size in zip(shards, handles, sizes):
            if not os.path.exists(path) and self._is_final(name, size):
                continue  # renamed by an earlier commit that was cut short
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(path, os.path.join(self.url, name))
        self._fsync_dir(self.url)

    def put(self, name: str, data: bytes) -> None:
        self._atomic_write(self.url, name, data)

    def put_staging(self, name: str, data: bytes) -> None:
        os.makedirs(self._staging, exist_ok=True)
        self._atomic_write(self._staging, name, data)

    def staging_files(self) -> dict[str, bytes]:
        if not os.path.isdir(self._staging):
            return {}
        out = {}
        for name in sorted(os.listdir(self._staging)):
            if not name.endswith(".partial") and not name.startswith("."):
                with open(os.path.join(self._staging, name), "rb") as f:
                    out[name] = f.read()
        return out

    def _atomic_write(self, folder: str, name: str, data: bytes) -> None:
        tmp = os.path.join(folder, f".{name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(folder, name))
        self._fsync_dir(folder)

    def delete(self, names: list[str]) -> None:
        for name in names:
            try:
                os.remove(os.path.join(self.url, name))
            except FileNotFoundError:
                pass

    def abort(self, shards: list[str], handles: list[str]) -> None:
        self.clear_staging()

    def clear_staging(self) -> None:
        self.close()
        shutil.rmtree(self._staging, ignore_errors=True)

    @staticmethod
    def _fsync_dir(folder: str) -> None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class S3Output:
    """An S3 prefix. One multipart upload per shard; uploads stay invisible until completed."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        self.url = urls.normalize(url)
        self._fs, path = urls.filesystem(self.url, storage_options)
        self._bucket, _, self._prefix = path.partition("/")

    def _key(self, name: str) -> str:
        return f"{self._prefix}/{name}" if self._prefix else name

    def _call(self, what: str, method: str, **kwargs: Any) -> dict:
        where = f"s3://{self._bucket}/{kwargs.get('Key', '')}"
        try:
            return with_retries(lambda: self._fs.call_s3(method, Bucket=self._bucket, **kwargs), f"{what} {where}")
        except Exception as e:  # botocore and s3fs raise many types; keep the reason and where
            raise StorageError(f"{what} {where} failed: {type(e).__name__}: {e}") from e

    def listing(self) -> list[str]:
        path = f"{self._bucket}/{self._prefix}".rstrip("/")
        try:
            self._fs.invalidate_cache(path)
            return sorted(p.rsplit("/", 1)[-1] for p in self._fs.ls(path, detail=False))
        except FileNotFoundError:
            return []
        except Exception as e:
            raise OutputError(f"--out {urls.redact(self.url)}: cannot list it ({type(e).__name__}: {e}); "
                              "check the bucket, credentials and endpoint") from e

    def prepare(self, shards: list[tuple[str, int]]) -> list[str]:
        handles: list[str] = []
        try:
            for name, _ in shards:
                resp = self._call("prepare: creating upload for", "create_multipart_upload", Key=self._key(name))
                handles.append(resp["UploadId"])
        except StorageError:
            self.abort([name for name, _ in shards], handles)  # no upload left open by a half prepare
            raise
        return handles

    def write(self, name: str, handle: str, part: int, offset: int, data: memoryview) -> str | None:
        resp = self._call(f"execute: uploading part {part} of", "upload_part", Key=self._key(name),
                          UploadId=handle, PartNumber=part, Body=bytes(data))
        return resp["ETag"]

    def staged_parts(self, shard: str, handle: str, size: int) -> dict[int, str] | str | None:
        """The parts S3 holds for an open upload (maybe none yet); FINAL when an earlier commit
        completed it; GONE when the upload no longer exists."""
        parts: dict[int, str] = {}
        marker = 0
        while True:
            try:
                resp = self._call("resume: listing parts of", "list_parts", Key=self._key(shard), UploadId=handle,
                                  PartNumberMarker=marker)
            except StorageError as e:
                if _no_such_upload(e):
                    return FINAL if self._is_final(shard, size) else GONE
                raise
            for p in resp.get("Parts", []):
                parts[p["PartNumber"]] = p["ETag"]
            if not resp.get("IsTruncated"):
                return parts
            marker = resp["NextPartNumberMarker"]

    def read_staged(self, handle: str, start: int, end: int) -> bytes:
        raise NotImplementedError("S3 parts are checked by ETag (staged_parts)")

    def _is_final(self, shard: str, size: int) -> bool:
        try:
            head = self._fs.call_s3("head_object", Bucket=self._bucket, Key=self._key(shard))
        except Exception:
            return False
        return head.get("ContentLength") == size

    def finalize(self, shards: list[str], handles: list[str], etags: list[dict[int, str]],
                 sizes: list[int]) -> None:
        for name, upload_id, parts, size in zip(shards, handles, etags, sizes):
            body = {"Parts": [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)]}
            try:
                self._call("commit: completing", "complete_multipart_upload", Key=self._key(name),
                           UploadId=upload_id, MultipartUpload=body)
            except StorageError as e:
                if _no_such_upload(e) and self._is_final(name, size):
                    continue  # completed by an earlier commit that was cut short
                raise

    def put(self, name: str, data: bytes) -> None:
        self._call("commit: writing", "put_object", Key=self._key(name), Body=data)

    def put_staging(self, name: str, data: bytes) -> None:
        self._call("journal: writing", "put_object", Key=self._key(f"{STAGING}/{name}"), Body=data)

    def staging_files(self) -> dict[str, bytes]:
        folder = f"{self._bucket}/{self._key(STAGING)}"
        try:
            self._fs.invalidate_cache(folder)
            paths = with_retries(lambda: self._fs.ls(folder, detail=False), f"resume: listing s3://{folder}")
            return {p.rsplit("/", 1)[-1]: with_retries(lambda p=p: self._fs.cat_file(p), f"resume: reading s3://{p}")
                    for p in sorted(paths)}
        except FileNotFoundError:
            return {}
        except Exception as e:
            raise StorageError(f"resume: reading s3://{folder} failed: {type(e).__name__}: {e}") from e

    def delete(self, names: list[str]) -> None:
        for name in names:
            self._call("deleting", "delete_object", Key=self._key(name))

    def abort(self, shards: list[str], handles: list[str]) -> None:
        for name, upload_id in zip(shards, handles):
            try:
                self._call("abort", "abort_multipart_upload", Key=self._key(name), UploadId=upload_id)
            except StorageError:
                pass  # best effort: an upload already gone needs no abort
        self.clear_staging()

    def clear_staging(self) -> None:
        for name in self.staging_files():
            self._call("deleting", "delete_object", Key=self._key(f"{STAGING}/{name}"))

    def close(self) -> None:
        pass


def _no_such_upload(e: StorageError) -> bool:
    """The upload was aborted or completed (s3fs turns S3's NoSuchUpload into FileNotFoundError)."""
    return isinstance(e.__cause__, FileNotFoundError) or "NoSuchUpload" in str(e)
