"""One error hierarchy for raymerge.

Every message says what failed, where (file, tensor, byte range), why, and what to do.
`exit_code` is what the CLI exits with: 2 for input the user must fix, 1 for failures of a run.
`resumable` says whether running the same command with --resume can get past the failure: the
driver adds that hint only where it is true, so that it never suggests something that cannot work.
"""

from __future__ import annotations

from raymerge.text import one_line, redact


class RaymergeError(Exception):
    """Base of every error raymerge raises on purpose. Its text is one line of a few hundred
    characters at most, control characters escaped (raymerge.text): messages quote untrusted names."""

    exit_code = 1
    resumable = True  # a failed run: what is done is kept, and --resume continues

    def __str__(self) -> str:
        return one_line(redact(super().__str__()))


class InputError(RaymergeError):
    """A bad input, option or recipe: the user must change something before running again."""

    exit_code = 2
    resumable = False


class ResolveError(InputError):
    """Phase 1 (resolve): an input checkpoint cannot be found or read, or its headers are bad."""


class PlanError(InputError):
    """Phase 2 (plan): the inputs do not line up, or the options cannot make a valid layout."""


class OutputError(InputError):
    """The output location is unusable: it is an input, holds a checkpoint, or is not writable."""


class LeaseError(OutputError):
    """Another run owns the output (its lease is live), or this run lost its lease."""


class NodeViewError(InputError):
    """A node of the cluster does not see a local input or the output folder as the driver does."""


# StorageError.reason values, and whether --resume can get past each.
TRANSIENT = "transient"  # connection trouble, timeouts, throttling: resume
FULL = "full"  # no space left: resume once space is freed
MISSING = "missing"  # a file or bucket is not there: the user must fix the path
DENIED = "denied"  # permissions or credentials: the user must fix them
CHANGED = "changed"  # an input changed during the run: the run must start over


class StorageError(RaymergeError):
    """Reading or writing bytes failed during execution."""

    def __init__(self, message: str, reason: str = TRANSIENT) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # survives the trip from a worker to the driver with its reason
        return (type(self), (str(self), self.reason))

    @property
    def resumable(self) -> bool:  # type: ignore[override]
        return self.reason in (TRANSIENT, FULL)


class ExecutionError(RaymergeError):
    """Phase 3 (execute): workers could not start or items could not be completed."""


class NonFiniteError(ExecutionError):
    """Finite inputs gave inf or NaN outputs (an overflowing dtype or scale); nothing was committed."""

    resumable = False  # its message says what --resume needs: --allow-nonfinite


class CommitError(RaymergeError):
    """Phase 4 (commit): the finished items could not be turned into a checkpoint."""
