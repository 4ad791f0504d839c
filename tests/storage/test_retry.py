"""What a storage failure is, as each backend classifies its own exceptions: the reason (which
decides the --resume hint) and whether a retry can help."""

from __future__ import annotations

import errno
import importlib

import pytest
from botocore.exceptions import ClientError

from raymerge.errors import CHANGED, DENIED, FULL, MISSING, TRANSIENT, StorageError
from raymerge.storage.localfs import NotRegular
from raymerge.storage.retry import Failure, classify, is_transient, reason_of
from raymerge.storage.writers import WRITERS


def _s3(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def _translated(cause: BaseException) -> OSError:
    """As s3fs raises a botocore error: an OSError whose cause is the original."""
    e = OSError(errno.EIO, str(cause))
    e.__cause__ = cause
    return e


@pytest.mark.parametrize("e, reason, transient", [
    (OSError(errno.ENOSPC, "No space left on device"), FULL, True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), FULL, True),
    (FileNotFoundError(errno.ENOENT, "gone"), MISSING, False),
    (NotRegular("/x", "a FIFO"), MISSING, False),
    (PermissionError(errno.EACCES, "Permission denied"), DENIED, False),
    (OSError(errno.EROFS, "Read-only file system"), DENIED, False),
    (OSError(errno.EIO, "I/O error"), TRANSIENT, True),
    (ConnectionResetError(errno.ECONNRESET, "reset"), TRANSIENT, True),
    (_s3("NoSuchBucket", 404), MISSING, False),
    (_s3("AccessDenied", 403), DENIED, False),
    (_s3("PreconditionFailed", 412), CHANGED, False),
    (_s3("ConditionalRequestConflict", 409), CHANGED, False),
    (_s3("SlowDown", 503), TRANSIENT, True),
    (_s3("RequestTimeout", 408), TRANSIENT, True),
    (_s3("InvalidPart", 400), TRANSIENT, False),
    (_translated(_s3("InternalError", 500)), TRANSIENT, True),
    (_translated(_s3("PreconditionFailed", 412)), CHANGED, False),
    (StorageError("x", FULL), FULL, True),
    (StorageError("x", DENIED), DENIED, False),
    (FileExistsError(errno.EEXIST, "exists"), TRANSIENT, False),
    (ValueError("a bug, not the storage"), TRANSIENT, False),
])
def test_each_backend_classifies_its_own_errors(e, reason, transient):
    assert reason_of(e) == reason and is_transient(e) is transient


def test_a_backend_says_nothing_of_errors_it_does_not_know():
    for module in WRITERS.values():
        backend = importlib.import_module(module)
        assert backend.OUTPUT.rules is not None and backend.classify(RuntimeError("elsewhere")) is None
    assert classify(RuntimeError("elsewhere")) == Failure(TRANSIENT, True)
