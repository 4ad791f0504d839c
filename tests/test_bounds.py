"""Bounded parsing of what users and files supply: strict integers, regular files, small YAML."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from raymerge.bounds import MAX_YAML_DEPTH, MAX_YAML_NODES, load_yaml, parse_int, read_regular_file
from raymerge.errors import InputError

# A small document whose aliases expand to 10**9 nodes for whoever walks it.
BILLION_LAUGHS = b'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + b"".join(
    f"{c}: &{c} [{','.join(['*' + p] * 10)}]\n".encode() for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("value,expected", [("12", 12), (12, 12), ("007", 7), ("0", 0), (100, 100)])
def test_parse_int_takes_ascii_digits_and_ints_in_range(value, expected):
    assert parse_int(value, "--n", 0, 100) == expected


@pytest.mark.parametrize("value", ["-3", "-0", -3])
def test_parse_int_takes_a_minus_only_where_the_range_is_negative(value):
    assert parse_int(value, "--n", -5, 5) == int(value)
    with pytest.raises(InputError, match=f"^--n {value}: must be an integer >= 0 and <= 5$"):
        parse_int(value, "--n", 0, 5)


@pytest.mark.parametrize("value", ["\u0661\u0662", "\uff11\uff12", "1_0", "+1", " 1", "1 ", "", "1.0", "0x1", "1e1",
                                   "\u00b2"])
def test_parse_int_refuses_what_int_or_isdigit_would_take(value):
    with pytest.raises(InputError, match=r"^--n .*: not an integer in ASCII digits 0-9; write an integer >= 0 and "
                                         r"<= 100$"):
        parse_int(value, "--n", 0, 100)


@pytest.mark.parametrize("value,message", [
    (True, "--n True: not an integer; write an integer >= 0 and <= 100"),
    (1.0, "--n 1.0: not an integer; write an integer >= 0 and <= 100"),
    (None, "--n None: not an integer; write an integer >= 0 and <= 100"),
    ([1], "--n [1]: not an integer; write an integer >= 0 and <= 100"),
    (101, "--n 101: must be an integer >= 0 and <= 100"),
    ("101", "--n 101: must be an integer >= 0 and <= 100"),
    (-1, "--n -1: must be an integer >= 0 and <= 100"),
])
def test_parse_int_refuses_other_types_and_the_range(value, message):
    with pytest.raises(InputError) as e:
        parse_int(value, "--n", 0, 100)
    assert str(e.value) == message


def test_a_number_of_thousands_of_digits_is_refused_by_its_length_before_conversion():
    started = time.perf_counter()
    with pytest.raises(InputError, match=r"^--n '9999.*\.\.\.: 5000 digits, more than 20; write an integer"):
        parse_int("9" * 5000, "--n", 0, 100)
    with pytest.raises(InputError, match=r"^--n <an integer of [0-9]+ [a-z]+>: must be an integer >= 0"):
        parse_int(10**5000, "--n", 0, 100)  # repr() of it would raise
    assert time.perf_counter() - started < 0.1


def test_yaml_with_small_aliases_loads():
    assert load_yaml(b"a: &x [1, 2]\nb: *x\nc: {<<: {d: 1}}\n", "recipe r.yaml") == \
        {"a": [1, 2], "b": [1, 2], "c": {"d": 1}}
    assert load_yaml(b"", "recipe r.yaml") is None


def test_billion_laughs_is_refused_quickly():
    started = time.perf_counter()
    with pytest.raises(InputError, match=rf"^recipe r.yaml: more than {MAX_YAML_NODES} nodes with its aliases "
                                         r"expanded; .*write it out plainly$"):
        load_yaml(BILLION_LAUGHS, "recipe r.yaml")
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize("doc", [b"[" * 100_000 + b"]" * 100_000, b"{a: " * 50_000 + b"1" + b"}" * 50_000,
                                 b"".join(b"  " * i + b"a:\n" for i in range(200)), b"- " * 200 + b"1"],
                         ids=["flow lists", "flow mappings", "block mappings", "block lists"])
def test_deep_nesting_is_refused_before_the_recursive_composer(doc):
    # LibYAML's scanner refuses a flow nesting past 1000 levels itself, before our count sees it.
    with pytest.raises(InputError, match=rf"^recipe r.yaml: (nested deeper than {MAX_YAML_DEPTH} levels|not valid "
                                         r"YAML \(.*exceeded maximum nesting depth)") as e:
        load_yaml(doc, "recipe r.yaml")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("doc,reason", [
    (b"a: &a [1, *a]\n", r"alias \*'a' names no complete node before it"),
    (b"a: *nowhere\n", r"alias \*'nowhere' names no complete node before it"),
    (b"seed: " + b"9" * 5000 + b"\n", "an integer of 5000 characters"),
    (b"seed: !!int '" + b"9" * 5000 + b"'\n", "an integer of 5000 characters"),
    (b"a: [1, 2\n", r"not valid YAML \(while parsing a flow sequence, did not find expected ',' or '\]' at line 2 "
                    r"column 1\); fix the file's syntax"),
    (b"a: \xff\n", r"not valid YAML \(.*invalid .*\)"),
    (b"a: 1\n---\nb: 2\n", r"not valid YAML \(expected a single document in the stream, but found another"),
    (b"a: !!python/name:os.system x\n", r"not valid YAML \(could not determine a constructor"),
    (b"models: 2001-13-45\n", r"a value YAML cannot build \(month must be in 1..12\); quote it if it is text"),
    (b"cp: !!timestamp nope\n", r"a value YAML cannot build \(.*\); quote it if it is text"),
    (b"cp: !!bool maybe\n", r"a value YAML cannot build \(.*\); quote it if it is text"),
])
def test_bad_yaml_is_one_input_error_line(doc, reason):
    with pytest.raises(InputError, match=rf"^recipe r.yaml: {reason}") as e:
        load_yaml(doc, "recipe r.yaml")
    assert "\n" not in str(e.value)


def test_yaml_larger_than_the_cap_is_refused():
    with pytest.raises(InputError, match="recipe r.yaml: larger than 1 MiB"):
        load_yaml(b"#" * (2**20 + 1), "recipe r.yaml")


def test_read_regular_file_reads_at_most_the_limit(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"x" * 100)
    assert read_regular_file(str(path), 10, "recipe") == b"x" * 10
    assert read_regular_file(str(path), 1000, "recipe") == b"x" * 100


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "r.yaml")
    os.mkfifo(fifo)
    assert_refused_without_blocking(lambda: read_regular_file(fifo, 100, "recipe"), fifo,
                                    f"recipe {fifo}: is a FIFO, not a regular file; give the path of a recipe file")


@pytest.mark.parametrize("make,words", [(lambda p: os.mkdir(p), "is a directory, not a regular file"),
                                        (lambda p: None, "cannot read it (No such file or directory); check the path")])
def test_folders_and_missing_files_are_refused(tmp_path, make, words):
    path = str(tmp_path / "r.yaml")
    make(path)
    with pytest.raises(InputError, match=re.escape(f"recipe {path}: {words}")):
        read_regular_file(path, 100, "recipe")
    with pytest.raises(InputError, match="cannot read it"):
        read_regular_file(str(tmp_path / "a\0b"), 100, "recipe")


def assert_refused_without_blocking(call, fifo: str, message: str) -> None:
    """`call` raises InputError(`message`) within 10 s; a call blocked on the FIFO is released (a
    writer opens it) so that the test fails instead of hanging."""
    outcome: list[BaseException] = []

    def target():
        try:
            call()
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the reader's open() returns
        thread.join(10)
        pytest.fail("opening the FIFO blocked")
    assert len(outcome) == 1 and isinstance(outcome[0], InputError), outcome
    assert str(outcome[0]) == message
