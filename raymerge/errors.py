"""One error hierarchy for raymerge.

Every message says what failed, where (file, tensor, byte range), why, and what to do.
`exit_code` is what the CLI exits with: 2 for input the user must fix, 1 for failures of a run.
"""


class RaymergeError(Exception):
    """Base of every error raymerge raises on purpose."""

    exit_code = 1


class InputError(RaymergeError):
    """A bad input, option or recipe: the user must change something before running again."""

    exit_code = 2


class ResolveError(InputError):
    """Phase 1 (resolve): an input checkpoint cannot be found or read, or its headers are bad."""


class PlanError(InputError):
    """Phase 2 (plan): the inputs do not line up, or the options cannot make a valid layout."""


class OutputError(InputError):
    """The output location is unusable: it is an input, holds a checkpoint, or is not writable."""


class StorageError(RaymergeError):
    """Reading or writing bytes failed during execution."""


class ExecutionError(RaymergeError):
    """Phase 3 (execute): workers could not start or items could not be completed."""


class CommitError(RaymergeError):
    """Phase 4 (commit): the finished items could not be turned into a checkpoint."""
