"""JSON from a checkpoint, a manifest or a journal, parsed as untrusted data.

`json.loads` alone lets hostile bytes escape as `RecursionError` (nesting past the interpreter's
limit), `ValueError` (an integer of thousands of digits), or a string that cannot be written back
as UTF-8 (a lone surrogate from a `\\ud800` escape) that fails far from where it was read.
`parse_json` refuses all of them up front with one short reason; callers wrap `UntrustedJSON`
into their own error that names the file and what to do.
"""

from __future__ import annotations

import array
import itertools
import json
import math
import re
from typing import Any


class UntrustedJSON(ValueError):
    """The document is not JSON raymerge accepts; the message is a short reason, without the file."""


# A whole string, its escapes skipped: brackets inside strings mean nothing to the depth.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {ord("["): "\x01", ord("{"): "\x01", ord("]"): "\xff", ord("}"): "\xff"}
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes | str, *, max_bytes: int = 64 * 2**20, max_depth: int = 64,
               max_int_digits: int = 40) -> Any:
    """The parsed document, or `UntrustedJSON` saying why not.

    Refused: more than `max_bytes`, bytes that are not UTF-8, nesting deeper than `max_depth`,
    integers of more than `max_int_digits` digits, NaN / Infinity and numbers that overflow a
    float, lone surrogates in strings or keys, and anything `json` itself rejects.
    """
    if len(raw) > max_bytes:
        raise UntrustedJSON(f"larger than {_size(max_bytes)}")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            # utf-8-sig: a leading BOM (files saved by some editors) is dropped, as json.loads does
            text = bytes(raw).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise UntrustedJSON(f"not UTF-8 (byte {e.start})") from e
    else:
        text = raw
    _check_depth(text, max_depth)
    try:
        obj = json.loads(text, parse_int=lambda s: _int(s, max_int_digits), parse_float=_float,
                         parse_constant=_constant)
    except json.JSONDecodeError as e:
        reason = e.msg.removesuffix(" at")  # "Unterminated string starting at"
        raise UntrustedJSON(f"not valid JSON ({reason} at line {e.lineno} column {e.colno})") from e
    # A lone surrogate comes from a raw one in `str` input or from a \udxxx escape; only then
    # is the whole document walked.
    if _SURROGATE.search(text):
        raise UntrustedJSON("a lone surrogate character, which cannot be UTF-8")
    if _SURROGATE_ESCAPE.search(text):
        _check_strings(obj)
    return obj


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n % 2**20 == 0 else f"{n} bytes"


def _check_depth(text: str, max_depth: int) -> None:
    # Brackets inside an unterminated string are counted too: that can only refuse a document the
    # parser would refuse anyway, never let a deep one through. The steps (+1 / -1 as signed
    # bytes) are summed in C: a Python loop over every bracket of a large header is too slow.
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    steps = array.array("b", brackets.translate(_DEPTH_STEP).encode("latin-1"))
    if steps and max(itertools.accumulate(steps)) > max_depth:
        raise UntrustedJSON(f"nested deeper than {max_depth} levels")


def _int(s: str, max_digits: int) -> int:
    digits = len(s) - s.startswith("-")
    if digits > max_digits:
        raise UntrustedJSON(f"an integer of {digits} digits")
    return int(s)


def _float(s: str) -> float:
    x = float(s)
    if not math.isfinite(x):
        raise UntrustedJSON(f"a number too large for a float ({s[:20]}{'...' if len(s) > 20 else ''})")
    return x


def _constant(name: str) -> Any:
    raise UntrustedJSON(f"{name}, which is not a JSON number")


def _check_strings(obj: Any) -> None:
    # Depth is already bounded, so this recursion is too.
    if isinstance(obj, str):
        if _SURROGATE.search(obj):
            raise UntrustedJSON(f"a string with a lone surrogate ({_shown(obj)}), which cannot be UTF-8")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_strings(k)
            _check_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            _check_strings(v)


MAX_NAME = 1024  # a file name, an upload id, an ETag, a fact's name (S3 keys are at most 1024 bytes)
MAX_TEXT = 8192  # a tensor name, URL, fingerprint, version, plan hash or run id read from a state file


def is_text(x: object, limit: int = MAX_TEXT) -> bool:
    """Whether a value read from a state file is a string of at most `limit` characters."""
    return isinstance(x, str) and len(x) <= limit


def shown(value: object, limit: int = 60) -> str:
    """A value read from untrusted data as an error message shows it: its repr, cut to `limit`
    characters (a hostile name or number may be megabytes long).

    Only the first `limit` characters are ever made: YAML aliases can make a recipe value that
    holds billions of elements in a few hundred bytes, and `repr` of an integer of more than 4300
    digits raises ValueError. Such an integer is shown by its size."""
    text = _repr_start(value, limit + 1)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Enough(Exception):
    pass


_REPR_BITS = 14_000  # below Python's 4300-digit limit of int -> str conversion


def _repr_start(value: object, n: int) -> str:
    """`repr(value)` when it is at most `n` characters, else a text of more than `n` characters
    that starts like it, made without visiting more of `value` than those characters need."""
    parts: list[str] = []
    size = 0

    def put(text: str) -> None:
        nonlocal size
        parts.append(text)
        size += len(text)
        if size > n:
            raise _Enough

    def items(values, open_: str, close: str, one_comma: bool = False) -> None:
        put(open_)
        count = 0
        for count, v in enumerate(values, 1):
            if count > 1:
                put(", ")
            walk(v)
        put("," + close if one_comma and count == 1 else close)

    def walk(x: object) -> None:
        # Exact types only: a subclass may repr itself otherwise. Every level writes at least
        # one character, so the depth walked is bounded by `n` too.
        t = type(x)
        if t in (str, bytes, bytearray):
            put(repr(x[:n]))
        elif t is int:
            put(repr(x) if x.bit_length() <= _REPR_BITS else f"<an integer of {x.bit_length()} bits>")
        elif t is list:
            items(x, "[", "]")
        elif t is tuple:
            items(x, "(", ")", one_comma=True)
        elif t is dict:
            put("{")
            for i, (k, v) in enumerate(x.items()):
                if i:
                    put(", ")
                walk(k)
                put(": ")
                walk(v)
            put("}")
        elif t in (set, frozenset):
            if not x:
                put(f"{t.__name__}()")
            else:
                items(x, "{" if t is set else "frozenset({", "}" if t is set else "})")
        else:
            put(repr(x))

    try:
        walk(value)
    except _Enough:
        pass
    return "".join(parts)


def _shown(s: str) -> str:
    return ascii(s[:40] + ("..." if len(s) > 40 else ""))
