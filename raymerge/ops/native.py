"""The compiled loops of raymerge/ops/_native.c (`loops`), or None where that optional extension was
not built (no C compiler at install): then each caller runs its numpy form, which gives the same
bits (docs/ARCHITECTURE.md: native loops). Read `native.loops` at each call, not once at import,
so that a test can run either form."""

from __future__ import annotations

from types import ModuleType

loops: ModuleType | None
try:
    from raymerge.ops import _native as loops
except ImportError:
    loops = None
