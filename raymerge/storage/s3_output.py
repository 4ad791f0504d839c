"""An S3 output prefix: one multipart upload per shard, invisible until completed at commit.

The lease is an object created only if absent (`If-None-Match: *`) and replaced only if it is
still the one read (`If-Match: <ETag>`): S3 and MinIO decide who owns the output atomically.
"""

from __future__ import annotations

import email.utils
from collections.abc import Sequence
from typing import Any, ClassVar

from raymerge.errors import CHANGED, OutputError, StorageError
from raymerge.storage import urls
from raymerge.storage.retry import reason_of, with_retries
from raymerge.storage.writers import (LEASE, STAGING, LeaseRecord, LeaseTaken, PartRules, ShardState, Span,
                                      StagedItem, Target, Verified, plain_name)

SMALL_CAP = 64 * 2**20


class S3Output:
    """An S3 prefix. One multipart upload per shard; uploads stay invisible until completed."""

    # Multipart limits: parts of at least 5 MiB (all but the last), at most 10,000 an upload.
    rules: ClassVar[PartRules] = PartRules(min_part=5 * 1024 * 1024, max_parts=10_000)

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
            raise StorageError(f"{what} {where} failed: {type(e).__name__}: {e}", reason_of(e)) from e

    # -- the prefix -------------------------------------------------------------------------

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

    def read_small(self, name: str) -> bytes | None:
        try:  # one byte past the cap, never the whole of a hostile object
            data = self._fs.cat_file(f"{self._bucket}/{self._key(name)}", start=0, end=SMALL_CAP + 1)
        except FileNotFoundError:
            return None
        except Exception as e:
            raise OutputError(f"--out {urls.redact(self.url)}: cannot read {name} ({type(e).__name__}: {e})") from e
        if len(data) > SMALL_CAP:
            raise OutputError(f"--out {urls.redact(self.url)}: {name} is over {SMALL_CAP} bytes; not raymerge's")
        return data

    def free_bytes(self) -> int | None:
        return None  # no quota to ask S3 about

    # -- staging the shards -----------------------------------------------------------------

    def prepare(self, shards: list[tuple[str, int]]) -> list[str]:
        handles: list[str] = []
        try:
            for name, _ in shards:
                resp = self._call("prepare: creating upload for", "create_multipart_upload", Key=self._key(name))
                handles.append(resp["UploadId"])
        except StorageError:
            self._abort_uploads([name for name, _ in shards], handles)  # no upload left open by a half prepare
            raise
        return handles

    def protect(self, paths: Sequence[str]) -> None:
        """Nothing to do: a multipart upload can only ever become a new object."""

    def identities(self, handles: list[str]) -> list[str]:
        return ["" for _ in handles]  # an upload id is its own identity

    def check_handles(self, shards: list[str], handles: list[str]) -> None:
        if len(handles) != len(shards) or not all(isinstance(h, str) and h and len(h) < 1024 for h in handles):
            raise OutputError(f"--resume {urls.redact(self.url)}: the resume journal's upload ids do not match its "
                              "shards; rerun with --overwrite to start over")

    def write(self, target: Target, span: Span, data: memoryview) -> str | None:
        """Upload part `span.part` of the shard's upload; its ETag proves it at resume and commit."""
        resp = self._call(f"execute: uploading part {span.part} of", "upload_part", Key=self._key(target.shard),
                          UploadId=target.handle, PartNumber=span.part, Body=bytes(data))
        return resp["ETag"]

    def verify_staged(self, target: Target, items: Sequence[StagedItem]) -> Verified:
        """The journaled items whose part S3 lists with the journaled ETag and the span's size (an
        open upload may hold no part yet); FINAL when an earlier commit completed the upload; GONE
        when it no longer exists."""
        parts = self._listed_parts(target)
        if parts is None:
            if self._is_final(target.shard, target.size):
                return Verified(ShardState.FINAL, frozenset(r.item for r in items))
            return Verified(ShardState.GONE)
        return Verified(ShardState.STAGED, frozenset(
            r.item for r in items
            if r.etag is not None and parts.get(r.span.part) == (r.etag, r.span.end - r.span.start)))

    def _listed_parts(self, target: Target) -> dict[int, tuple[str, int]] | None:
        """Part number -> (ETag, size) of every part the upload holds; None when it is gone."""
        parts: dict[int, tuple[str, int]] = {}
        marker = 0
        while True:
            try:
                resp = self._call("resume: listing parts of", "list_parts", Key=self._key(target.shard),
                                  UploadId=target.handle, PartNumberMarker=marker)
            except StorageError as e:
                if _no_such_upload(e):
                    return None
                raise
            for p in resp.get("Parts", []):
                parts[p["PartNumber"]] = (p["ETag"], p.get("Size"))
            if not resp.get("IsTruncated"):
                return parts
            marker = resp["NextPartNumberMarker"]

    def _is_final(self, shard: str, size: int) -> bool:
        try:
            head = self._fs.call_s3("head_object", Bucket=self._bucket, Key=self._key(shard))
        except Exception:
            return False
        return head.get("ContentLength") == size

    # -- commit -----------------------------------------------------------------------------

    def finalize(self, shards: Sequence[tuple[Target, Sequence[StagedItem]]]) -> None:
        for target, items in shards:
            parts = {r.span.part: r.etag for r in items if r.etag is not None}
            body = {"Parts": [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)]}
            try:
                self._call("commit: completing", "complete_multipart_upload", Key=self._key(target.shard),
                           UploadId=target.handle, MultipartUpload=body)
            except StorageError as e:
                if _no_such_upload(e) and self._is_final(target.shard, target.size):
                    continue  # completed by an earlier commit that was cut short
                raise

    def put(self, name: str, data: bytes) -> None:
        self._call("commit: writing", "put_object", Key=self._key(name), Body=data)

    def delete(self, names: list[str]) -> None:
        for name in names:
            if plain_name(name):
                self._call("commit: removing the old", "delete_object", Key=self._key(name))

    # -- staging files: journal and lease -----------------------------------------------------

    def put_staging(self, name: str, data: bytes) -> None:
        self._call("journal: writing", "put_object", Key=self._key(f"{STAGING}/{name}"), Body=data)

    def remove_staging(self, name: str) -> None:
        if plain_name(name) and name != LEASE:
            self._call("deleting", "delete_object", Key=self._key(f"{STAGING}/{name}"))

    def _staging_names(self) -> list[str]:
        folder = f"{self._bucket}/{self._key(STAGING)}"
        try:
            self._fs.invalidate_cache(folder)
            paths = with_retries(lambda: self._fs.ls(folder, detail=False), f"resume: listing s3://{folder}")
        except FileNotFoundError:
            return []
        except Exception as e:
            raise StorageError(f"resume: listing s3://{folder} failed: {type(e).__name__}: {e}", reason_of(e)) from e
        return sorted(p.rsplit("/", 1)[-1] for p in paths)

    def staging_files(self, prefix: str = "") -> dict[str, bytes]:
        out = {}
        for name in self._staging_names():
            if name.startswith(prefix) and name != LEASE:
                path = f"{self._bucket}/{self._key(STAGING)}/{name}"
                try:
                    out[name] = with_retries(lambda p=path: self._fs.cat_file(p), f"resume: reading s3://{path}")
                except FileNotFoundError:
                    continue
                except Exception as e:
                    raise StorageError(f"resume: reading s3://{path} failed: {type(e).__name__}: {e}",
                                       reason_of(e)) from e
        return out

    def abort(self, shards: list[str], handles: list[str] | None) -> None:
        """Abort the shards' uploads (found by listing when the journal lost their ids), then clear
        the staging files."""
        if handles is None:
            self._abort_listed(shards)
        else:
            self._abort_uploads(shards, handles)
        self.clear_staging()

    def _abort_uploads(self, shards: list[str], handles: list[str]) -> None:
        for name, upload_id in zip(shards, handles):
            try:
                self._call("abort", "abort_multipart_upload", Key=self._key(name), UploadId=upload_id)
            except StorageError:
                pass  # best effort: an upload already gone needs no abort

    def _abort_listed(self, shards: list[str]) -> None:
        """Open uploads of shard files directly under the prefix: raymerge's staging, since the
        lease says this run owns the output."""
        prefix = self._key("")
        try:
            resp = self._call("abort: listing uploads under", "list_multipart_uploads", Prefix=prefix)
        except StorageError:
            return
        for up in resp.get("Uploads", []):
            name = up["Key"][len(prefix):]
            if plain_name(name) and (name in shards or not shards and name.endswith(".safetensors")):
                self._abort_uploads([name], [up["UploadId"]])

    def clear_staging(self) -> None:
        for name in self._staging_names():
            if name != LEASE:
                self._call("deleting", "delete_object", Key=self._key(f"{STAGING}/{name}"))

    # -- the lease ----------------------------------------------------------------------------

    def lease_create(self, data: bytes) -> str:
        return self._put_lease(data, IfNoneMatch="*")

    def lease_replace(self, data: bytes, token: str) -> str:
        return self._put_lease(data, IfMatch=token)

    def lease_refresh(self, data: bytes, token: str) -> str:
        return self._put_lease(data, IfMatch=token)

    def _put_lease(self, data: bytes, **condition: str) -> str:
        try:
            resp = self._call("lease: writing", "put_object", Key=self._key(f"{STAGING}/{LEASE}"), Body=data,
                              **condition)
        except StorageError as e:
            if e.reason == CHANGED:  # the condition was refused: another run holds or replaced it
                raise LeaseTaken() from e
            if "IfNoneMatch" in condition:  # the first write of a run: a bad bucket, endpoint or credentials
                raise OutputError(f"--out {urls.redact(self.url)}: cannot write there ({e}); check the bucket, "
                                  "credentials and endpoint") from e
            raise
        return resp["ETag"]

    def lease_read(self) -> LeaseRecord | None:
        key = self._key(f"{STAGING}/{LEASE}")
        try:
            resp = with_retries(lambda: self._fs.call_s3("get_object", Bucket=self._bucket, Key=key),
                                f"lease: reading s3://{self._bucket}/{key}")
        except FileNotFoundError:
            return None
        except Exception as e:
            raise StorageError(f"lease: reading s3://{self._bucket}/{key} failed: {type(e).__name__}: {e}",
                               reason_of(e)) from e
        data = _read_body(self._fs, resp)
        # Age by the server's clock alone: its Date now, against the object's LastModified.
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date).timestamp() if date else None
        modified = resp["LastModified"].timestamp()
        age = max(0.0, now - modified) if now is not None else 0.0
        return LeaseRecord(data, resp["ETag"], age)

    def lease_delete(self, token: str) -> None:
        try:
            self._call("lease: releasing", "delete_object", Key=self._key(f"{STAGING}/{LEASE}"), IfMatch=token)
        except StorageError:
            pass  # taken over, or already gone: either way it is not ours to delete

    def close(self) -> None:
        pass


def _read_body(fs, resp: dict) -> bytes:
    """The body of a get_object response made through s3fs's sync wrapper."""
    from fsspec.asyn import sync

    async def read():
        body = resp["Body"]
        try:
            return await body.read()
        finally:
            body.close()

    return sync(fs.loop, read)


def _no_such_upload(e: StorageError) -> bool:
    """The upload was aborted or completed (s3fs turns S3's NoSuchUpload into FileNotFoundError)."""
    return isinstance(e.__cause__, FileNotFoundError) or "NoSuchUpload" in str(e)
