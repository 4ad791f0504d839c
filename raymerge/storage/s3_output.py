"""An S3 output prefix: one multipart upload per shard, invisible until completed at commit;
small objects (`S3Store`) written by single PUTs.

Conditional writes are S3's own: an object created only if absent (`If-None-Match: *`), replaced
or deleted only if it is still the one read (`If-Match: <ETag>`). S3 and MinIO decide atomically
which of two runs wins (execution.lease).
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

from raymerge.errors import CHANGED, DENIED, MISSING, TRANSIENT, OutputError, StorageError
from raymerge.storage import urls
from raymerge.storage.retry import Failure, reason_of, with_retries
from raymerge.storage.store import SMALL_CAP, Conflict, Stored, plain, plain_name
from raymerge.storage.writers import STAGING, PartRules, ShardState, Span, StagedItem, Target, Verified

T = TypeVar("T")

# S3 error codes that no retry can change.
PERMANENT_CODES = {"NoSuchKey", "NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                   "NoSuchUpload", "InvalidPart", "InvalidPartOrder", "EntityTooSmall", "InvalidRange",
                   "InvalidBucketName", "403", "404", "416"}


class _Bucket:
    """One bucket through s3fs, with retries, and failures as StorageErrors naming the object."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        self.fs, path = urls.filesystem(url, storage_options)
        self.name, _, self.prefix = path.partition("/")

    def call(self, what: str, method: str, **kwargs: Any) -> dict:
        where = f"s3://{self.name}/{kwargs.get('Key', '')}"
        return _attempt(f"{what} {where}", lambda: self.fs.call_s3(method, Bucket=self.name, **kwargs))


class S3Output:
    """An S3 prefix. One multipart upload per shard; uploads stay invisible until completed."""

    # Multipart limits: parts of at least 5 MiB (all but the last), at most 10,000 an upload.
    rules: ClassVar[PartRules] = PartRules(min_part=5 * 1024 * 1024, max_parts=10_000)

    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        self.url = urls.normalize(url)
        self._s3 = _Bucket(self.url, storage_options)
        self.files = S3Store(self._s3, self._s3.prefix)
        self.staging = S3Store(self._s3, _join(self._s3.prefix, STAGING))

    def _key(self, name: str) -> str:
        return _join(self._s3.prefix, name)

    def _call(self, what: str, method: str, **kwargs: Any) -> dict:
        return self._s3.call(what, method, **kwargs)

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
            head = self._s3.fs.call_s3("head_object", Bucket=self._s3.name, Key=self._key(shard))
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

    def abort(self, shards: list[str], handles: list[str] | None) -> None:
        """Abort the shards' uploads (found by listing when the journal lost their ids)."""
        if handles is None:
            self._abort_listed(shards)
        else:
            self._abort_uploads(shards, handles)

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

    def close(self) -> None:
        pass


class S3Store:
    """Small objects directly under one prefix (storage.store); an object's version is its ETag."""

    def __init__(self, s3: _Bucket, prefix: str) -> None:
        self._s3, self._prefix = s3, prefix
        self.url = f"s3://{s3.name}/{prefix}".rstrip("/")

    def _key(self, name: str) -> str:
        return _join(self._prefix, plain(name, self.url))

    def put(self, name: str, data: bytes) -> str:
        return self._s3.call("writing", "put_object", Key=self._key(name), Body=data)["ETag"]

    def put_if_absent(self, name: str, data: bytes) -> str:
        return self._put(name, data, IfNoneMatch="*")

    def put_if_match(self, name: str, data: bytes, version: str) -> str:
        return self._put(name, data, IfMatch=version)

    def _put(self, name: str, data: bytes, **condition: str) -> str:
        try:
            return self._s3.call("writing", "put_object", Key=self._key(name), Body=data, **condition)["ETag"]
        except StorageError as e:
            # The condition refused, another conditional write won the race, or (If-Match) the
            # object is gone: in any case not the version given.
            if e.reason == CHANGED or e.reason == MISSING and "IfMatch" in condition:
                raise Conflict(name) from e
            raise

    def get(self, name: str) -> Stored | None:
        key = self._key(name)
        fs = self._s3.fs

        def fetch() -> tuple[dict, bytes]:  # the request and its body, retried together
            resp = fs.call_s3("get_object", Bucket=self._s3.name, Key=key)
            return resp, _read_body(fs, resp, SMALL_CAP + 1)  # never the whole of a hostile object

        try:
            resp, data = _attempt(f"reading s3://{self._s3.name}/{key}", fetch)
        except StorageError as e:
            if e.reason == MISSING:
                return None
            raise
        # Age by the server's clock alone: its Date now, against the object's LastModified.
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date).timestamp() if date else None
        age = max(0.0, now - resp["LastModified"].timestamp()) if now is not None else 0.0
        return Stored(data if len(data) <= SMALL_CAP else b"", resp["ETag"], age)

    def delete_if_match(self, name: str, version: str) -> None:
        try:
            self._s3.call("deleting", "delete_object", Key=self._key(name), IfMatch=version)
        except StorageError as e:
            if e.reason not in (CHANGED, MISSING):  # replaced, or already gone: not for this caller
                raise

    def delete(self, names: list[str]) -> None:
        for name in names:
            self._s3.call("deleting", "delete_object", Key=self._key(name))

    def list(self, prefix: str = "") -> list[str]:
        folder = f"{self._s3.name}/{self._prefix}".rstrip("/")
        self._s3.fs.invalidate_cache(folder)  # s3fs caches listings: this one must be of now
        try:
            paths = _attempt(f"listing s3://{folder}", lambda: self._s3.fs.ls(folder, detail=False))
        except StorageError as e:
            if e.reason == MISSING:
                return []
            raise
        return sorted(n for n in (p.rsplit("/", 1)[-1] for p in paths) if n.startswith(prefix))


def classify(e: BaseException) -> Failure | None:
    """S3's errors by their code and HTTP status; None for an exception without an S3 response."""
    code, status = _s3_error(e)
    if not code and not status:
        return None
    if code in ("NoSuchKey", "NoSuchBucket", "404"):
        return Failure(MISSING, False)
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
        return Failure(DENIED, False)
    # A conditional request refused: the object is no longer the version read (If-Match), exists
    # already (If-None-Match), or another conditional write won the race.
    if code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status == 412:
        return Failure(CHANGED, False)
    return Failure(TRANSIENT, not (code in PERMANENT_CODES or 400 <= status < 500 and status not in (408, 429)))


def _s3_error(e: BaseException) -> tuple[str, int]:
    """The S3 error code and HTTP status behind `e`, if any: s3fs translates botocore's errors into
    OSErrors and keeps the original as the cause."""
    response = getattr(e, "response", None) or getattr(e.__cause__, "response", None)
    if not isinstance(response, dict):
        return "", 0
    return (str(response.get("Error", {}).get("Code", "")),
            response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


OUTPUT = S3Output  # what storage.writers opens for s3:// (WRITERS)


def _attempt(what: str, fn: Callable[[], T]) -> T:
    """`fn()`, retried where transient; a failure as a StorageError saying what failed, where, why."""
    try:
        return with_retries(fn, what)
    except Exception as e:  # botocore and s3fs raise many types; keep the reason and where
        raise StorageError(f"{what} failed: {type(e).__name__}: {e}", reason_of(e)) from e


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _read_body(fs, resp: dict, limit: int) -> bytes:
    """The body of a get_object response made through s3fs's sync wrapper, up to `limit` bytes:
    read until its end, since one read returns only what has arrived."""
    from fsspec.asyn import sync

    async def read():
        body, got = resp["Body"], bytearray()
        try:
            while len(got) < limit:
                chunk = await body.read(limit - len(got))
                if not chunk:
                    break
                got += chunk
            return bytes(got)
        finally:
            body.close()

    return sync(fs.loop, read)


def _no_such_upload(e: StorageError) -> bool:
    """The upload was aborted or completed (s3fs turns S3's NoSuchUpload into FileNotFoundError)."""
    return isinstance(e.__cause__, FileNotFoundError) or "NoSuchUpload" in str(e)
