"""The compiled loops of raymerge/ops/_native.c (`loops`), or None where that optional extension was
not built (no C compiler at install): then each caller runs its numpy form, which gives the same
bits (docs/ARCHITECTURE.md: native loops). Read `native.loops` at each call, not once at import,
so that a test can run either form."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

VERSION = 52  # _native.c's: a build of another source is not used (its functions or buffers differ)

loops: ModuleType | None
try:
    from raymerge.ops import _native as loops
except ImportError:
    loops = None
if loops is not None and getattr(loops, "VERSION", None) != VERSION:
    loops = None  # built from an older _native.c and not built again since: numpy's loops


def takes(x: Any, dtype: type) -> bool:
    """Whether the compiled loops are built and can read x as they read every buffer: a numpy
    array of `dtype`, C-contiguous and aligned (else the caller runs its numpy form)."""
    return loops is not None and isinstance(x, np.ndarray) and x.dtype == dtype and x.flags.c_contiguous \
        and x.flags.aligned
