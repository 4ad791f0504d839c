"""raymerge: chat-vector and task-arithmetic merges of LLM checkpoints, streamed on Ray."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["MergeResult", "__version__", "apply", "extract", "merge", "plan"]


def plan(*args: Any, **kwargs: Any):
    """The plan of a run, made from the inputs' headers alone (see raymerge.api.plan)."""
    from raymerge import api

    return api.plan(*args, **kwargs)


def __getattr__(name: str) -> Any:
    # The API is imported on first use, so that a worker importing raymerge.execution.worker
    # does not load the driver's modules (it starts faster).
    if name in ("MergeResult", "apply", "extract", "merge"):
        from raymerge import api

        return getattr(api, name)
    raise AttributeError(f"module 'raymerge' has no attribute {name!r}")
