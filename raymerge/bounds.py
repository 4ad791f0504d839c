"""Bounded work for every text a user or a file supplies: integers, files, YAML.

Python's own parsers do more than a boundary should let them:

- `int()`, `str.isdigit()` and regex `\\d` take non-ASCII digits ('١٢', '１２') and `int()` takes
  underscores ('1_000'); past 4300 digits `int()` raises a `ValueError` with advice meant for
  programmers. `parse_int` takes ASCII digits only, counts them before converting, and checks the
  range.
- `open()` on a FIFO blocks until a writer comes, and a device may never end. `read_regular_file`
  opens without blocking (storage.localfs), refuses anything but a regular file and reads a
  bounded number of bytes.
- `yaml.safe_load` expands aliases: ten lines of nested aliases ("billion laughs") are billions of
  nodes to whoever walks the result, a node may contain itself, and deep nesting overflows the
  stack of the recursive composer. `load_yaml` reads the event stream first (PyYAML's parser is
  not recursive), counting nesting and the nodes the document has with every alias expanded, and
  only then builds it.

Every refusal is one `InputError` line: what, where, why and what to do.
"""

from __future__ import annotations

import os
import re
from typing import Any

from raymerge.errors import InputError
from raymerge.storage.localfs import NotRegular, open_regular
from raymerge.untrusted import shown

MAX_INT_DIGITS = 20  # 2**63 has 19: every integer raymerge takes fits
MAX_YAML_BYTES = 2**20  # a recipe is a short mapping; mergekit's longest configs are a few KiB
MAX_YAML_NODES = 100_000  # with aliases expanded
MAX_YAML_DEPTH = 64  # a recipe nests about 7 levels; PyYAML's composer recurses per level
MAX_YAML_INT_CHARS = 100  # PyYAML's int() refuses past 4300 digits with a ValueError, not a YAMLError

_ASCII_INT = re.compile(r"-?[0-9]+")  # no '+', no spaces, no underscores: the fullmatch is the number
_INT_TAG = "tag:yaml.org,2002:int"


def parse_int(value: Any, what: str, lo: int, hi: int, max_digits: int = MAX_INT_DIGITS) -> int:
    """`value` as an int from `lo` to `hi`: an int (not a bool) or its text in ASCII digits (a flag's,
    a recipe's), with a leading '-' only where `lo` < 0; InputError naming `what` otherwise."""
    wanted = f"an integer >= {lo} and <= {hi}"
    if isinstance(value, str):
        if not _ASCII_INT.fullmatch(value):
            raise InputError(f"{what} {shown(value, 40)}: not an integer in ASCII digits 0-9; write {wanted}")
        digits = len(value) - value.startswith("-")
        if digits > max_digits:  # counted before int(): its cost grows with the length, and past 4300 it raises
            raise InputError(f"{what} {shown(value, 40)}: {digits} digits, more than {max_digits}; write {wanted}")
        number, shown_as = int(value), value  # a short run of ASCII digits: shown as it is
    elif isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what} {shown(value, 40)}: not an integer; write {wanted}")
    else:
        number, shown_as = value, shown(value, 40)
    if not lo <= number <= hi or (lo >= 0 and shown_as.startswith("-")):  # '-0' too: no '-' unless lo < 0
        raise InputError(f"{what} {shown_as}: must be {wanted}")
    return number


def read_regular_file(path: str, limit: int, what: str) -> bytes:
    """At most `limit` bytes of the regular file at `path`, read without ever blocking (a FIFO, a
    socket or a device is refused: storage.localfs)."""
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            return f.read(limit)
    except NotRegular as e:
        raise InputError(f"{what} {path}: {e.strerror}; give the path of a {what} file") from e
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise InputError(f"{what} {path}: cannot read it ({getattr(e, 'strerror', None) or e}); "
                         "check the path") from e


def load_yaml(raw: bytes, where: str) -> Any:
    """The single YAML document in `raw`, built with the safe loader once it is known to be small:
    at most MAX_YAML_BYTES, MAX_YAML_DEPTH levels, MAX_YAML_NODES nodes with aliases expanded, no
    alias to a node containing it, no integer of more than MAX_YAML_INT_CHARS characters."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    if len(raw) > MAX_YAML_BYTES:
        raise InputError(f"{where}: larger than {MAX_YAML_BYTES // 2**20} MiB; a recipe is a short YAML mapping")
    try:
        reason = _too_big(yaml.parse(raw, Loader=loader))
        if reason:
            raise InputError(f"{where}: {reason}; a recipe is a short mapping of keys, write it out plainly")
        return yaml.load(raw, Loader=loader)
    except yaml.YAMLError as e:
        raise InputError(f"{where}: not valid YAML ({_yaml_reason(e)}); fix the file's syntax") from e
    # A value the constructor cannot build: the date 2001-13-45 (ValueError), `!!timestamp nope`
    # and `!!bool maybe` (PyYAML's constructor fails on them with AttributeError, KeyError).
    except (ValueError, OverflowError, AttributeError, TypeError, KeyError, IndexError) as e:
        raise InputError(f"{where}: a value YAML cannot build ({_yaml_reason(e)}); quote it if it is text") from e


def _too_big(events) -> str | None:
    """Why a document's events are too much to build, or None. Expanded sizes are summed per node
    as its end event comes, so each alias costs one lookup however deep its expansion is."""
    import yaml

    sizes: dict[str, int] = {}  # anchor -> nodes of its node, aliases expanded
    open_: list[list] = []  # per collection being read: [anchor, nodes so far]
    total = 0
    for event in events:
        if isinstance(event, yaml.CollectionStartEvent):
            open_.append([event.anchor, 1])
            if len(open_) > MAX_YAML_DEPTH:
                return f"nested deeper than {MAX_YAML_DEPTH} levels"
            total += 1
            continue
        if isinstance(event, yaml.AliasEvent):
            if event.anchor not in sizes:
                return (f"alias *{shown(event.anchor, 40)} names no complete node before it (undefined, or "
                        "inside the node it names)")
            n = sizes[event.anchor]
        elif isinstance(event, yaml.ScalarEvent):
            if _long_int(event):
                return f"an integer of {len(event.value)} characters"
            n = 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, n = open_.pop()
            if anchor is not None:
                sizes[anchor] = n
            if open_:
                open_[-1][1] += n
            continue
        else:
            continue  # stream and document starts and ends
        total += n
        if total > MAX_YAML_NODES:
            return f"more than {MAX_YAML_NODES} nodes with its aliases expanded"
        if open_:
            open_[-1][1] += n
    return None


def _long_int(event) -> bool:
    """Whether PyYAML would build this scalar with int() and it is too long for that; its tag is
    resolved as the composer resolves it, only for long scalars."""
    import yaml
    from yaml.resolver import Resolver

    if len(event.value) <= MAX_YAML_INT_CHARS:
        return False
    tag = event.tag
    if tag in (None, "!"):
        tag = Resolver().resolve(yaml.ScalarNode, event.value, event.implicit)
    return tag == _INT_TAG


def _yaml_reason(e: Exception) -> str:
    """A YAMLError in a few words on one line: PyYAML's own text spans several, with quoted input."""
    import yaml

    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        what = " ".join(", ".join(filter(None, (e.context, e.problem))).split())[:120]
        return f"{what} at line {e.problem_mark.line + 1} column {e.problem_mark.column + 1}"
    return " ".join(str(e).split())[:120]
