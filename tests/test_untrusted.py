"""parse_json refuses hostile documents with a short reason, before any RecursionError or
ValueError can escape, and parses honest ones exactly like json.loads."""

import json
import sys
import time

import pytest

from raymerge.untrusted import UntrustedJSON, parse_json, shown

HONEST = [
    b'{"weight_map": {"a.weight": "model-00001-of-00002.safetensors"}, "metadata": {"total_size": 12}}',
    b'{"w": {"dtype": "BF16", "shape": [4096, 11008], "data_offsets": [0, 90177536]}}',
    '{"chat_template": "{% for m in messages %}[{{ m }}]{% endfor %}", "eos": "\u00e9\U0001f600"}'.encode(),
    b'["\\ud83d\\ude00", "\\\\ud800", "[[[[{{{{", -1e-05, 1.5, -12, true, null]',
    b'{"model_max_length": 1000000000000000019884624838656}',
    "[\"str input\", 1]",
    b" [ ] ",
    b'\xef\xbb\xbf{"bom": "a leading BOM, as json.loads accepts from bytes"}',
]


@pytest.mark.parametrize("raw", HONEST)
def test_honest_documents_parse_like_json_loads(raw):
    assert parse_json(raw) == json.loads(raw)


@pytest.mark.parametrize("raw,reason", [
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 64 levels"),
    (b'{"a": ' + b"[" * 65 + b"]" * 65 + b"}", "nested deeper than 64 levels"),
    (b'{"shape": [' + b"9" * 5000 + b"]}", "an integer of 5000 digits"),
    (b'[-' + b"1" * 41 + b"]", "an integer of 41 digits"),
    (b'{"a": NaN}', "NaN"),
    (b'[-Infinity]', "-Infinity"),
    (b"[1e999]", "too large for a float"),
    (b'{"\\ud800": 1}', "lone surrogate"),
    (b'{"a": ["x\\udfffy"]}', "lone surrogate"),
    ('["\ud800"]', "lone surrogate"),
    (b'{"a": "\xff"}', "not UTF-8 (byte 7)"),
    (b'{"a", 1}', "not valid JSON (Expecting ':' delimiter at line 1 column 5)"),
    (b'"unterminated', "not valid JSON (Unterminated string starting at line 1 column 1)"),
    (b"", "not valid JSON (Expecting value at line 1 column 1)"),
])
def test_hostile_documents_are_refused_with_a_short_reason(raw, reason):
    with pytest.raises(UntrustedJSON) as e:
        parse_json(raw)
    assert reason in str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 120


def test_limits_are_the_callers():
    assert parse_json(b"[[[1]]]", max_depth=3) == [[[1]]]
    with pytest.raises(UntrustedJSON, match="nested deeper than 2 levels"):
        parse_json(b"[[[1]]]", max_depth=2)
    assert parse_json(b"[123]", max_int_digits=3) == [123]
    with pytest.raises(UntrustedJSON, match="an integer of 4 digits"):
        parse_json(b"[1234]", max_int_digits=3)
    assert parse_json(b"[1]" + b" " * 13, max_bytes=16) == [1]
    with pytest.raises(UntrustedJSON, match="larger than 16 bytes"):
        parse_json(b"[1]" + b" " * 14, max_bytes=16)
    with pytest.raises(UntrustedJSON, match="larger than 1 MiB"):
        parse_json(b" " * (2**20 + 1), max_bytes=2**20)


def test_brackets_inside_strings_do_not_count_as_depth():
    deep_text = '"' + "[{" * 1000 + '\\" ]]"'
    assert parse_json(f'{{"k": {deep_text}}}'.encode()) == {"k": "[{" * 1000 + '" ]]'}


def test_refusal_is_an_error_callers_catch_as_value_error():
    # Callers that already catch ValueError (the commit's aux patching) keep working.
    assert issubclass(UntrustedJSON, ValueError)
    with pytest.raises(ValueError):
        parse_json(b"[" * (sys.getrecursionlimit() * 2))


def test_shown_is_the_repr_cut_to_the_limit():
    for value in ["a\nb", [1, "x", (2,), ()], {"a": [1, {}]}, set(), {3}, frozenset({2}), b"ab", None, 1.5,
                  "x" * 100, [[[]]] * 30, 10**100, -(10**4000), {"k": ["v" * 70]}]:
        text = repr(value)
        assert shown(value) == (text if len(text) <= 60 else text[:57] + "..."), value
    assert shown("abcdef", limit=5) == "'a..."


def test_shown_of_an_integer_past_the_repr_limit_is_its_size():
    # repr() raises ValueError past 4300 digits: a YAML hex integer gets there in a few KB.
    assert shown(2**14300) == "<an integer of 14301 bits>"
    assert shown({"scale": [-(2**20000)]}) == "{'scale': [<an integer of 20001 bits>]}"


def test_shown_of_an_alias_bomb_visits_only_what_it_shows():
    # 10 ** 12 elements, as YAML aliases make them from a few hundred bytes: repr would never end.
    bomb: list = ["x"] * 10
    for _ in range(11):
        bomb = [bomb] * 10
    looped: list = []
    looped.append(looped)
    start = time.monotonic()
    assert shown(bomb, 30) == "[[[[[[[[[[[['x', 'x', 'x', ..."
    assert shown(looped, 10) == "[[[[[[[..."
    assert time.monotonic() - start < 0.5
