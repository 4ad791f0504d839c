"""raymerge: chat-vector and task-arithmetic merges of LLM checkpoints, streamed on Ray."""

__version__ = "0.1.0"

from raymerge.api import MergeResult, apply, extract, merge, plan  # noqa: E402

__all__ = ["MergeResult", "__version__", "apply", "extract", "merge", "plan"]
