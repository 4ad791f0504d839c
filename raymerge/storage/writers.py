"""Output writers: bytes at known offsets of files that only get their final names at commit.

Protocol (the driver does 1, 3 and 4; any worker does 2, in any order, any number of times):
  1. `prepare(shards)` makes one target per shard and returns its handle: a staged, preallocated
     file for local output, a multipart upload id for S3. Nothing has a final name yet.
  2. `write(name, handle, part, offset, data)` puts bytes at `offset` of a shard (local: a
     positional write; S3: upload of part number `part`) and returns the part's ETag (S3) or None.
  3. `finalize(...)` gives every shard its final name (fsync + rename; complete the uploads), then
     `put(name, bytes)` writes small files (aux files, index, manifest) atomically.
  4. `abort(...)` on failure: staged files and open uploads are removed.
"""

from __future__ import annotations

import os
import shutil
import threading
from typing import Any, Protocol

from raymerge.errors import OutputError, StorageError
from raymerge.storage import urls

STAGING = ".raymerge-staging"


class Output(Protocol):
    url: str

    def listing(self) -> list[str]: ...
    def prepare(self, shards: list[tuple[str, int]]) -> list[str]: ...
    def write(self, name: str, handle: str, part: int, offset: int, data: memoryview) -> str | None: ...
    def finalize(self, shards: list[str], handles: list[str], etags: list[dict[int, str]]) -> None: ...
    def put(self, name: str, data: bytes) -> None: ...
    def delete(self, names: list[str]) -> None: ...
    def abort(self, shards: list[str], handles: list[str]) -> None: ...
    def close(self) -> None: ...


def open_output(url: str, storage_options: dict[str, Any] | None) -> Output:
    proto = urls.protocol(url)
    if proto == "file":
        return LocalOutput(url)
    if proto == "s3":
        return S3Output(url, storage_options)
    raise OutputError(f"--out {urls.redact(url)}: writing to {proto}:// is not supported; "
                      "write to a local path or s3:// and copy from there")


class LocalOutput:
    """A local directory. Shards are staged under `.raymerge-staging/` and renamed at commit."""

    def __init__(self, url: str) -> None:
        self.url = urls.local_path(url)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()  # worker threads share the open files

    def listing(self) -> list[str]:
        if os.path.isfile(self.url):
            raise OutputError(f"--out {self.url}: is a file; give a directory for the checkpoint")
        return sorted(os.listdir(self.url)) if os.path.isdir(self.url) else []

    def prepare(self, shards: list[tuple[str, int]]) -> list[str]:
        staging = os.path.join(self.url, STAGING)
        try:
            os.makedirs(staging, exist_ok=True)
            handles = []
            for name, size in shards:
                path = os.path.join(staging, name + ".partial")
                with open(path, "wb") as f:
                    f.truncate(size)  # preallocate: workers write at offsets, in any order
                handles.append(path)
        except OSError as e:
            raise OutputError(f"--out {self.url}: cannot create output files ({e.strerror}); "
                              "check the path and its permissions") from e
        return handles

    def write(self, name: str, handle: str, part: int, offset: int, data: memoryview) -> str | None:
        with self._lock:
            fd = self._fds.get(handle)
            if fd is None:
                fd = self._fds[handle] = os.open(handle, os.O_WRONLY)
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
        except OSError as e:
            raise StorageError(f"execute: writing {name} at byte {offset + done} failed: {e.strerror}") from e
        return None

    def finalize(self, shards: list[str], handles: list[str], etags: list[dict[int, str]]) -> None:
        for name, path in zip(shards, handles):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(path, os.path.join(self.url, name))
        self._fsync_dir()
        shutil.rmtree(os.path.join(self.url, STAGING), ignore_errors=True)

    def put(self, name: str, data: bytes) -> None:
        path = os.path.join(self.url, name)
        tmp = os.path.join(self.url, f".{name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._fsync_dir()

    def delete(self, names: list[str]) -> None:
        for name in names:
            try:
                os.remove(os.path.join(self.url, name))
            except FileNotFoundError:
                pass

    def abort(self, shards: list[str], handles: list[str]) -> None:
        shutil.rmtree(os.path.join(self.url, STAGING), ignore_errors=True)

    def _fsync_dir(self) -> None:
        fd = os.open(self.url, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
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
        try:
            return self._fs.call_s3(method, Bucket=self._bucket, **kwargs)
        except Exception as e:  # botocore and s3fs raise many types; keep the reason and where
            raise StorageError(f"{what} s3://{self._bucket}/{kwargs.get('Key', '')} failed: "
                               f"{type(e).__name__}: {e}") from e

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

    def finalize(self, shards: list[str], handles: list[str], etags: list[dict[int, str]]) -> None:
        for name, upload_id, parts in zip(shards, handles, etags):
            body = {"Parts": [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)]}
            self._call("commit: completing", "complete_multipart_upload", Key=self._key(name),
                       UploadId=upload_id, MultipartUpload=body)

    def put(self, name: str, data: bytes) -> None:
        self._call("commit: writing", "put_object", Key=self._key(name), Body=data)

    def delete(self, names: list[str]) -> None:
        for name in names:
            self._call("deleting", "delete_object", Key=self._key(name))

    def abort(self, shards: list[str], handles: list[str]) -> None:
        for name, upload_id in zip(shards, handles):
            try:
                self._call("abort", "abort_multipart_upload", Key=self._key(name), UploadId=upload_id)
            except StorageError:
                pass  # best effort: the run already failed with a better error

    def close(self) -> None:
        pass
