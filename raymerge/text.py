"""Untrusted text as messages show it: escaped, capped, listed briefly, on one line.

Tensor names, file names and values come from checkpoints, recipes and state files that anyone may
have written: a name may hold a newline, a carriage return or an ANSI escape sequence that would
rewrite the user's terminal, or be megabytes long, and a list of them may have thousands. Every
message raymerge prints is one line of at most `LIMIT` characters (`one_line`, applied by every
RaymergeError and by the CLI's log format); names inside it are capped (`name`) and lists cut
to their first few (`listed`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

LIMIT = 600  # characters of one message: a few hundred, the hint at its end kept
NAME_LIMIT = 80

# Characters that move the cursor, reorder text or end a line, besides the C0/C1 controls
_INVISIBLE = {"\u2028", "\u2029", "\u200e", "\u200f", *map(chr, range(0x202A, 0x202F)),
              *map(chr, range(0x2066, 0x206A))}


def _escaped(ch: str) -> str:
    if ch in _INVISIBLE or unicodedata.category(ch) == "Cc":
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return ch


def escape(text: str) -> str:
    """`text` with every control or line-breaking character written as an escape (\\n -> \\x0a)."""
    if text.isprintable():
        return text
    return "".join(_escaped(ch) for ch in text)


def redact(text: str) -> str:
    """Hide user:password@ parts of URLs (before any cut, which could split one)."""
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)


def one_line(text: str, limit: int = LIMIT) -> str:
    """`text` escaped and, past `limit` characters, cut in the middle: its start says what failed,
    its end what to do."""
    text = escape(text)
    if len(text) <= limit:
        return text
    tail = limit // 4
    marker = f" [... {len(text)} characters, cut ...] "
    return text[:limit - tail - len(marker)] + marker + text[-tail:]


def name(value: object, limit: int = NAME_LIMIT) -> str:
    """A name from untrusted data, escaped and capped."""
    text = escape(str(value))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def listed(values: Iterable[object], first: int = 5) -> str:
    """'a, b, c and 12 more': the first few names, escaped and capped."""
    values = list(values)
    shown = ", ".join(name(v) for v in values[:first])
    return shown + (f" and {len(values) - first} more" if len(values) > first else "")
