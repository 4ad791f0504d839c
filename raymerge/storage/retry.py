"""Retries with backoff for transient storage errors; permanent ones fail at once.

Transient: connection trouble, timeouts, throttling, 5xx. Permanent: a missing object or bucket,
denied access, bad credentials, an unknown upload: retrying cannot help, the user must act.
`RAYMERGE_IO_RETRIES` sets the number of retries (default 4, waits of 0.5, 1, 2, 4 s).

What an exception means is for the backend that raised it to say: each backend module (named in
storage.writers.WRITERS) has a `classify(e)` that gives the reason of the exceptions it knows and
whether they are transient, and None for the others.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TypeVar

from raymerge.errors import CHANGED, DENIED, MISSING, TRANSIENT, StorageError

log = logging.getLogger("raymerge")
T = TypeVar("T")

# Errors of the program or of a request, never of the storage: retrying gives the same answer.
NEVER_TRANSIENT = (FileExistsError, ValueError, TypeError, KeyError)


@dataclass(frozen=True, slots=True)
class Failure:
    """What a storage failure is: its reason (errors.TRANSIENT, FULL, MISSING, DENIED or CHANGED),
    which decides whether the driver may suggest --resume, and whether a retry can help."""

    reason: str
    transient: bool


Classifier = Callable[[BaseException], "Failure | None"]


def classify(e: BaseException) -> Failure:
    if isinstance(e, StorageError):  # classified where it was raised
        return Failure(e.reason, e.reason not in (MISSING, DENIED, CHANGED))
    for backend in _classifiers():
        found = backend(e)
        if found is not None:
            return found
    return Failure(TRANSIENT, True)


def reason_of(e: BaseException) -> str:
    """What kind of storage failure `e` is (see `Failure`)."""
    return classify(e).reason


def is_transient(e: BaseException) -> bool:
    return classify(e).transient and not isinstance(e, NEVER_TRANSIENT)


@cache
def _classifiers() -> tuple[Classifier, ...]:
    """Every backend's `classify`, imported on first use: local first, whose errno classes also
    cover the OSErrors that s3fs and others translate their errors into."""
    from raymerge.storage.writers import WRITERS

    return tuple(importlib.import_module(module).classify for module in WRITERS.values())


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
