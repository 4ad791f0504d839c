"""Fuzzing the parsers of what a checkpoint holds: safetensors headers (one read and parsed, or
several through the speculative reads), the HF index, any JSON document, and the auxiliary
files whose chat template and EOS a merge patches. Thousands of generated documents each, mostly
near-valid ones (a valid document with a few fields broken), so that every check is reached."""

from __future__ import annotations

import json
import struct
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st

from raymerge.commit.aux import TAKEN, patched
from raymerge.errors import ResolveError
from raymerge.safetensors import header as header_module
from raymerge.safetensors.dtypes import ITEMSIZE, nbytes
from raymerge.safetensors.header import HEADER_CAP, parse_header, read_header_bytes
from raymerge.safetensors.index import parse_index
from raymerge.untrusted import UntrustedJSON, parse_json
from tests.fuzz.strategies import (
    CONTROL,
    EDGE_INTS,
    REFUSED,
    SURROGATES,
    attempt,
    big_values,
    deep,
    dumps,
    fuzz,
    hostile_values,
    json_floats,
    json_leaves,
    json_values,
    keys,
    mostly,
    mutated_bytes,
    mutated_document,
    odd_ints,
    odd_text,
    pick,
    rarely,
)

WHERE = "/data/cp/model-00001-of-00002.safetensors"
DTYPES = list(ITEMSIZE)

tensor_names = st.one_of(
    pick(["a", "model.layers.0.mlp.weight", "lm_head.weight", "", "__metadata__", "a\nb", "\u202e",
                     "x" * 5000, *CONTROL, *SURROGATES]),
    odd_text)
odd_dtypes = st.one_of(st.sampled_from(DTYPES),
                       st.sampled_from(["f32", "F128", "", "BF16 ", "F8_E4M3FN", "bool", "F32\x00", "I4"]),
                       hostile_values)
odd_dims = st.one_of(st.integers(-3, 6), st.sampled_from(EDGE_INTS), st.booleans(), json_floats, odd_text,
                     st.none(), st.lists(st.integers(0, 3), max_size=2))
odd_shapes = st.one_of(
    st.lists(odd_dims, max_size=5),
    # every dim in range, and their product astronomically large (past int64, past any file)
    st.lists(st.sampled_from([2**61, 2**62 - 1, 2**40, 3]), min_size=1, max_size=64),
    st.lists(st.integers(0, 2), min_size=62, max_size=70),  # around MAX_DIMS
    hostile_values)
odd_offsets = st.one_of(
    st.lists(odd_ints, max_size=3),
    st.sampled_from([[2**62 - 4, 2**62], [2**63, 2**63 + 4], [2**64 - 4, 2**64], [-4, 0], [True, 5], [0.0, 4.0]]),
    st.lists(json_floats, min_size=2, max_size=2),
    hostile_values)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, int]:
    """(the first 8 + N bytes, the file size) of a near-valid safetensors file: a valid header of a
    few tensors tiling the data, then some of its fields broken, its offsets shifted (overlaps,
    gaps), its length prefix or file size off."""
    names = draw(st.lists(tensor_names, max_size=5, unique=True))
    obj: dict = {}
    pos = 0
    for name in names:
        dtype, shape = draw(st.sampled_from(DTYPES)), draw(st.lists(st.integers(0, 6), max_size=4))
        size = nbytes(dtype, shape)
        obj[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    obj = {k: obj[k] for k in draw(st.permutations(list(obj)))}  # the file's order is not the data's
    if draw(st.booleans()):
        obj["__metadata__"] = draw(mostly(
            st.one_of(st.just({"format": "pt"}), st.dictionaries(keys, odd_text, max_size=3)), hostile_values))
    for _ in range(draw(st.integers(0, 2)) if names else 0):
        name = draw(st.sampled_from(names))
        spec = obj.get(name)
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "shift", "entry", "extra", "missing"]))
        if not isinstance(spec, dict):
            continue
        if field == "dtype":
            spec["dtype"] = draw(odd_dtypes)
        elif field == "shape":
            spec["shape"] = draw(odd_shapes)
        elif field == "data_offsets":
            spec["data_offsets"] = draw(odd_offsets)
        elif field == "shift" and isinstance(spec.get("data_offsets"), list) and len(spec["data_offsets"]) == 2:
            k = draw(st.sampled_from([-8, -1, 1, 4, 2**62, -(2**62)]))
            spec["data_offsets"] = [o + k if isinstance(o, int) else o for o in spec["data_offsets"]]
        elif field == "entry":
            obj[name] = draw(hostile_values)
        elif field == "extra":
            spec[draw(keys)] = draw(hostile_values)
        elif field == "missing" and spec:
            del spec[draw(st.sampled_from(sorted(spec)))]
    text = dumps(obj, draw(st.booleans())) + b" " * draw(st.integers(0, 7))
    n = len(text)
    claimed = draw(st.one_of(st.just(n), st.just(n), st.just(n),
                             st.sampled_from([0, max(0, n - 1), n + 1, HEADER_CAP, HEADER_CAP + 1, 2**63, 2**64 - 1])))
    data_len = pos + (draw(st.sampled_from([1, -1, 8, -pos])) if rarely(draw, 5) else 0)
    file_size = draw(st.integers(0, 2**63)) if rarely(draw, 5) else max(0, 8 + n + data_len)
    raw = mutated_bytes(draw, struct.pack("<Q", claimed) + text)
    return raw, file_size


@fuzz(1500)
@given(headers())
def test_near_valid_headers_raise_only_resolve_errors(doc):
    """Guards against a header field of the wrong type, range or size (dims and offsets past
    2**62, a product of dims past any file, overlapping or gapped offsets, odd __metadata__,
    control characters in names, deep nesting) escaping as anything but one ResolveError line."""
    raw, file_size = doc
    attempt(ResolveError, parse_header, raw, WHERE, file_size)


@fuzz(1000)
@given(st.one_of(st.binary(max_size=64),
                 st.builds(lambda n, body: struct.pack("<Q", n) + body, st.integers(0, 2**64 - 1),
                           st.binary(max_size=48)),
                 st.builds(lambda body: struct.pack("<Q", len(body)) + body, st.binary(max_size=48))),
       st.integers(0, 2**63))
def test_raw_bytes_as_headers_raise_only_resolve_errors(raw, file_size):
    """Guards against arbitrary bytes (short files, absurd length prefixes, binary garbage where
    the JSON should be) escaping the header parser as anything but one ResolveError line."""
    attempt(ResolveError, parse_header, raw, WHERE, file_size)


@fuzz(300)
@given(st.lists(headers(), min_size=1, max_size=3), st.integers(8, 120))
def test_speculative_header_reads_raise_only_resolve_errors(docs, first_read):
    """Guards against read_header_bytes (one speculative read of every file, a second for the
    longer headers) asking past a file, reading more than twice, or handing parse_header bytes
    that make it fail with anything but a ResolveError line. FIRST_READ is made tiny so that the
    second read happens."""
    blobs, sizes = [raw for raw, _ in docs], [size for _, size in docs]
    wheres = [f"{WHERE}#{i}" for i in range(len(docs))]
    calls = []

    def read(requests: list[tuple[int, int, int]]) -> list[bytes]:
        calls.append(requests)
        return [blobs[i][start:end] for i, start, end in requests]

    with mock.patch.object(header_module, "FIRST_READ", first_read):
        got = attempt(ResolveError, read_header_bytes, read, sizes, wheres)
    assert len(calls) <= 2
    if got is not REFUSED:
        for raw, size, where in zip(got, sizes, wheres):
            attempt(ResolveError, parse_header, raw, where, size)


index_files = st.one_of(
    st.sampled_from(["model-00001-of-00002.safetensors", "sub/model.safetensors", "../model.safetensors", "/abs",
                     "a\\b", "x\x00", "", ".", "./", "a/../../b", "..x", "sub/../model.safetensors", "//x"]),
    odd_text)
GOOD_INDEX = {"metadata": {"total_size": 24},
              "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                             "lm_head.weight": "model-00002-of-00002.safetensors"}}


@fuzz(1500)
@given(mostly(st.one_of(mutated_document(GOOD_INDEX, st.one_of(index_files, hostile_values)),
                        st.dictionaries(tensor_names, index_files, min_size=1, max_size=4).map(
                            lambda m: {"weight_map": m})),
              st.one_of(st.dictionaries(keys, json_values, max_size=3).map(lambda m: {"weight_map": m}),
                        hostile_values)),
       st.booleans(), st.data())
def test_index_files_raise_only_resolve_errors(doc, ascii_only, data):
    """Guards against an index whose weight map is of the wrong type, maps to paths outside the
    checkpoint ('..', absolute, backslashes, NUL) or holds hostile JSON escaping the index parser
    as anything but one ResolveError line."""
    raw = mutated_bytes(data.draw, dumps(doc, ascii_only))
    attempt(ResolveError, parse_index, raw, "/data/cp/model.safetensors.index.json")


TOKENS = ["[", "]", "{", "}", '"', "\\", ":", ",", " ", "\n", "1", "-", "0", ".", "e", "E", "+", "9" * 41, "9" * 5000,
          "1e400", "-1e-400", "NaN", "Infinity", "-Infinity", "true", "null", "tru", '"\\ud800"', '"\\udfff\\ud800"',
          '"\\u00e9"', '"\\x"', '"a', "\x00", "\x1f", "\ufeff", "\u00e9", "\ud800", '"\\ud83d\\ude00"']


@fuzz(2000)
@given(st.one_of(
    st.binary(max_size=80),
    st.lists(pick(TOKENS), max_size=30).map("".join),
    st.lists(pick(TOKENS), max_size=30).map(lambda t: "".join(t).encode("utf-8", "surrogatepass")),
    st.builds(lambda o, c, tail: "[" * o + tail + "]" * c, st.integers(0, 130), st.integers(0, 130),
              st.sampled_from(["", "1", '"]]]["', '"\\"[[["'])),
    st.builds(dumps, hostile_values, st.booleans()),
    st.composite(lambda draw: mutated_bytes(draw, dumps(draw(json_values), draw(st.booleans()))))()))
def test_any_document_is_parsed_or_refused_as_untrusted_json(raw):
    """Guards against parse_json letting RecursionError (deep nesting, brackets hidden in
    strings), ValueError (integers of thousands of digits), UnicodeDecodeError, NaN/Infinity or a
    lone surrogate through as anything but an UntrustedJSON line."""
    attempt(UntrustedJSON, parse_json, raw)


GOOD_TOKENIZER = {"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}", "eos_token": "</s>",
                  "eos_token_id": 2, "model_max_length": 1000000000000000019884624838656, "added_tokens": []}
aux_documents = st.one_of(
    st.builds(dumps, mutated_document(GOOD_TOKENIZER), st.booleans()),
    st.builds(dumps, st.dictionaries(st.sampled_from(["chat_template", "eos_token", "eos_token_id", "x"]),
                                     st.one_of(json_leaves, big_values, deep), max_size=3), st.booleans()),
    st.lists(pick(TOKENS), max_size=20).map(lambda t: "".join(t).encode("utf-8", "surrogatepass")),
    st.binary(max_size=40))


@fuzz(1500)
@given(st.sampled_from([*TAKEN, "config.json", "tokenizer.json"]), aux_documents, aux_documents)
def test_aux_patching_raises_only_what_commit_catches(name, ours, theirs):
    """Guards against patching cp's tokenizer / generation files with the chat model's template
    and EOS failing with anything but the ValueError (UntrustedJSON included) or
    UnicodeDecodeError that aux_contents turns into a ResolveError, and against a patched file that
    the committer cannot read back as a JSON object."""
    merged = attempt((ValueError, UnicodeDecodeError), patched, name, ours, theirs)
    if merged is not REFUSED and merged is not ours:
        assert isinstance(json.loads(merged), dict)
