"""Retries with backoff for transient storage errors; permanent ones fail at once.

Transient: connection trouble, timeouts, throttling, 5xx. Permanent: a missing object or bucket,
denied access, bad credentials, an unknown upload: retrying cannot help, the user must act.
`RAYMERGE_IO_RETRIES` sets the number of retries (default 4, waits of 0.5, 1, 2, 4 s).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

from raymerge.errors import CHANGED, DENIED, FULL, MISSING, TRANSIENT, StorageError
from raymerge.storage.localfs import NotRegular

log = logging.getLogger("raymerge")
T = TypeVar("T")

PERMANENT_CODES = {"NoSuchKey", "NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                   "NoSuchUpload", "InvalidPart", "InvalidPartOrder", "EntityTooSmall", "InvalidRange",
                   "InvalidBucketName", "403", "404", "416"}


def is_transient(e: BaseException) -> bool:
    if reason_of(e) in (MISSING, DENIED, CHANGED):
        return False
    if isinstance(e, (FileExistsError, ValueError, TypeError, KeyError)):
        return False
    code, status = _s3_error(e)
    return not (code in PERMANENT_CODES or 400 <= status < 500 and status not in (408, 429))


def reason_of(e: BaseException) -> str:
    """What kind of storage failure `e` is (errors.TRANSIENT, FULL, MISSING, DENIED or CHANGED):
    it decides whether a retry can help and whether the driver may suggest --resume."""
    if isinstance(e, StorageError):
        return e.reason
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return FULL
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, NotRegular)):
        return MISSING
    if isinstance(e, PermissionError) or isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DENIED
    code, status = _s3_error(e)
    if code in ("NoSuchKey", "NoSuchBucket", "404"):
        return MISSING
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
        return DENIED
    # A conditional request refused: the object is no longer the version read (If-Match), exists
    # already (If-None-Match), or another conditional write won the race.
    if code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status == 412:
        return CHANGED
    return TRANSIENT


def _s3_error(e: BaseException) -> tuple[str, int]:
    """The S3 error code and HTTP status behind `e`, if any: s3fs translates botocore's errors into
    OSErrors and keeps the original as the cause."""
    response = getattr(e, "response", None) or getattr(e.__cause__, "response", None)
    if not isinstance(response, dict):
        return "", 0
    return (str(response.get("Error", {}).get("Code", "")),
            response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def retries() -> int:
    try:
        return max(0, int(os.environ.get("RAYMERGE_IO_RETRIES", "4")))
    except ValueError:
        return 4


def with_retries(fn: Callable[[], T], what: str) -> T:
    """Call `fn`, retrying transient failures with exponential backoff; re-raise the last one."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:
            if attempt >= retries() or not is_transient(e):
                raise
            delay = min(0.5 * 2 ** attempt, 8.0)
            log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(e).__name__, e, delay)
            time.sleep(delay)
            attempt += 1
