"""What the fuzz tests share: hostile values, the settings of every property, and the one check
each of them makes of a parser: it returns, or raises one of its allowed errors with a one-line
message of bounded length. Any other exception fails the property, and hypothesis shrinks it."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

MAX_MESSAGE = 600  # characters: one line of a terminal or a log, not a dump of the input


# The share of each property's `examples` a run generates: half by default (the suite's time on
# CI); RAYMERGE_FUZZ_DEPTH=1 (or more) for every document, or a deeper search.
DEPTH = float(os.environ.get("RAYMERGE_FUZZ_DEPTH", "0.5"))


def fuzz(examples: int, deadline_s: float = 2.0) -> settings:
    """`examples` generated documents (times DEPTH), the same ones on every run (CI is
    reproducible), each parsed within `deadline_s` seconds: the time bound of an untrusted parser."""
    return settings(max_examples=max(1, round(examples * DEPTH)), derandomize=True, database=None,
                    deadline=timedelta(seconds=deadline_s), print_blob=False)


def check_message(e: BaseException) -> None:
    """An error a user reads: one line, of a bounded length."""
    text = str(e)
    assert "\n" not in text and "\r" not in text, f"{type(e).__name__} message is not one line: {text[:300]!r}"
    assert len(text) <= MAX_MESSAGE, f"{type(e).__name__} message is {len(text)} characters: {text[:300]!r}..."


def pick(values: list) -> st.SearchStrategy:
    """sampled_from(values), without writing every value into the strategy's repr (hypothesis
    warns about, and spends time on, reprs of many kilobytes)."""
    values = list(values)
    return st.integers(0, len(values) - 1).map(values.__getitem__)


def rarely(draw: st.DrawFn, odds: int = 10) -> bool:
    """True about one time in `odds`. Hypothesis draws 0, the simplest choice, far more often than
    the rest (a third of the time): a rare branch must be taken on another value."""
    return draw(st.integers(0, odds - 1)) == odds - 1


def mostly(good: st.SearchStrategy, other: st.SearchStrategy, odds: int = 5) -> st.SearchStrategy:
    """`good`, but one time in `odds + 1` `other` (one_of weighs its branches alike, and drops a
    branch repeated to weigh it)."""
    return st.integers(0, odds).flatmap(lambda i: good if i < odds else other)


REFUSED = object()  # what `attempt` returns when the parser refused the input with an allowed error


def attempt(allowed: type[BaseException] | tuple[type[BaseException], ...], fn: Callable[..., Any],
            *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, or REFUSED when it raised one of `allowed` with a sound message.
    Any other exception propagates: that is the failure the fuzz tests look for."""
    try:
        return fn(*args, **kwargs)
    except allowed as e:
        check_message(e)
        return REFUSED


# -- hostile leaves -----------------------------------------------------------------------------

# Decimal digits other than ASCII (int() takes them; some regexes' \d matches them), digits that
# are not decimal (superscripts: str.isdigit() says yes, int() says no), and control characters.
ODD_DIGITS = ["\u0661\u0662\u0663", "\u06f4\u06f5", "\u0966\u096f", "\u00b2", "\u00b3\u00b9", "\U0001d7d7",
              "\uff11\uff12", "\u07c0", "\u0ed2", "\u2460", "\u00bd"]
CONTROL = ["\x00", "\n", "\r", "\r\n", "\t", "\x0b", "\x0c", "\x1b", "\x1c", "\x7f", "\x85", "\u2028", "\u2029",
           "\ufeff", "\u202e", "\ud7ff"]
SURROGATES = ["\ud800", "\udfff", "\udc80x", "\ud83d\ude00"]  # lone ones, and a pair (one emoji) in two halves
WORDS = ["", " ", ".", "..", "../x", "/etc/passwd", "a\\b", "a/./b", "nan", "NaN", "inf", "-inf", "-1", "1e999",
         "0x10", "1_000", "true", "null", "~", "*", "__metadata__", "weight", "model.layers.0.mlp.weight",
         "s3://b/x", "hf://org/name", "org/name", "a+b", "5GB", "0.5", "1:2", "%s%n", "{0}", "'\"", "\\u0000"]

odd_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(WORDS + ODD_DIGITS + CONTROL + SURROGATES),
    st.lists(st.sampled_from([*CONTROL, *ODD_DIGITS, "a", ".", "0", "9", "'", '"', "\\"]), max_size=10).map("".join),
    st.builds(lambda d, n: d * n, st.sampled_from(["9", "1", "\u0663", "\u00b2"]),
              st.sampled_from([39, 41, 400, 4400])),
    st.builds(lambda c, n: c * n, st.sampled_from(["x", "\n", "\u00e9"]), st.sampled_from([100, 700, 5000])),
)
keys = st.one_of(st.text(max_size=6), st.sampled_from(WORDS + ODD_DIGITS + CONTROL))

EDGE_INTS = [0, 1, -1, 2, 7, 255, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**61, 2**62 - 1, 2**62, 2**63 - 1, 2**63,
             2**64, 10**18, 10**39, -2**31, -2**63, -(10**39)]
odd_ints = st.one_of(st.integers(-3, 12), st.sampled_from(EDGE_INTS), st.integers())
json_floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                        st.sampled_from([0.5, -0.0, 1.0, 1e308, 5e-324, 1e-46, 3.5e38, 2.0**62, 1e39]))
json_leaves = st.one_of(st.none(), st.booleans(), odd_ints, json_floats, odd_text)


def containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4))


json_values = st.recursive(json_leaves, containers, max_leaves=10)

# Values JSON cannot carry but YAML or the Python API can: inf / NaN, integers past what str()
# converts (Python refuses more than 4300 decimal digits), tuples, bytes.
python_leaves = st.one_of(json_leaves, st.sampled_from([math.inf, -math.inf, math.nan]),
                          st.sampled_from([14300, -14300]).map(lambda e: 2**e if e > 0 else -(2**-e)),
                          st.binary(max_size=8))
python_values = st.recursive(python_leaves, lambda c: st.one_of(containers(c), st.tuples(c, c)), max_leaves=10)


def nest(leaf: Any, depth: int) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


deep = st.builds(nest, json_leaves, st.sampled_from([63, 64, 65, 200]))
# Values that are valid but large: whatever quotes them in a message must cut them.
big_values = st.one_of(
    st.builds(lambda c, n: c * n, st.sampled_from(["x", "\n", "\u00e9", "\x1b[2J"]), st.sampled_from([700, 5000])),
    st.builds(lambda v, n: [v] * n, st.one_of(st.integers(), st.text(max_size=3), st.none()),
              st.sampled_from([300, 3000])),
    st.builds(lambda n: {f"k{i}": "v" * 20 for i in range(n)}, st.sampled_from([100, 1000])))
hostile_values = mostly(json_values, st.one_of(big_values, deep), odds=2)


def dumps(obj: Any, ascii_only: bool) -> bytes:
    """JSON bytes of a generated document. A lone surrogate in it is written as a \\ud800 escape
    (`ascii_only`), or as the invalid UTF-8 a careless writer makes (surrogatepass)."""
    text = json.dumps(obj, ensure_ascii=ascii_only, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


def mutated_bytes(draw: st.DrawFn, raw: bytes) -> bytes:
    """`raw` as it is, truncated, with bytes overwritten, or with a tail of garbage. A function of
    `draw` (a composite's, or `data.draw`) rather than a strategy of `raw`: a strategy's repr would
    hold every byte of it."""
    how = draw(st.sampled_from(["same"] * 6 + ["truncate", "flip", "append"]))  # mostly whole: reach past parsing
    if how == "truncate" and raw:
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if how == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + draw(st.binary(min_size=1, max_size=3)) + raw[at + 1:]
    if how == "append":
        return raw + draw(st.binary(max_size=8) | st.sampled_from([b"]", b"}", b",", b"\xff", b"[" * 100]))
    return raw


@st.composite
def mutated_document(draw: st.DrawFn, good: Any, values: st.SearchStrategy = hostile_values) -> Any:
    """A copy of the JSON document `good` with a few of its fields replaced by `values`, deleted,
    or joined by extra keys: a near-valid document, which reaches the checks past the first."""
    if rarely(draw, 20):
        return draw(values)  # not even the document's type
    doc = json.loads(json.dumps(good))
    for _ in range(draw(st.integers(0, 3))):
        paths = list(_paths(doc))[1:]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        op = draw(st.sampled_from(["replace", "replace", "delete", "extra"]))
        if op == "replace":
            parent[last] = draw(values)
        elif op == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(keys)] = draw(values)
        else:
            parent.append(draw(values))
    return doc


def _paths(doc: Any, prefix: tuple = ()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))
