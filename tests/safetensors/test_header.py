import json
import struct

import pytest
import torch
from safetensors.torch import save

from raymerge.errors import ResolveError
from raymerge.safetensors.dtypes import nbytes, numel
from raymerge.safetensors.header import FIRST_READ, HEADER_CAP, parse_header, read_header_bytes, serialize_header


def _raw(obj: dict, data_len: int, pad: int = 0) -> bytes:
    text = json.dumps(obj).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + b"\0" * data_len


def test_parses_what_the_safetensors_package_writes():
    blob = save({"b": torch.zeros(3, 2, dtype=torch.bfloat16), "a": torch.ones(5, dtype=torch.float32)},
                metadata={"format": "pt"})
    h = parse_header(blob, "x", len(blob))
    assert {e.name: (e.dtype, e.shape, e.end - e.begin) for e in h.entries} == \
        {"a": ("F32", (5,), 20), "b": ("BF16", (3, 2), 12)}
    assert h.metadata == {"format": "pt"}
    assert h.data_start == 8 + struct.unpack("<Q", blob[:8])[0]


def test_serialize_is_exact_and_readable_by_safetensors():
    header = serialize_header([("w", "BF16", (2, 3), 0, 12), ("n", "F32", (1,), 12, 16)])
    text = b'{"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},' \
           b'"n":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}'
    text += b" " * (-len(text) % 8)
    assert header == struct.pack("<Q", len(text)) + text
    assert len(header) % 8 == 0
    from safetensors.torch import load

    loaded = load(header + bytes(range(16)))
    assert loaded["w"].shape == (2, 3) and loaded["n"].dtype == torch.float32


@pytest.mark.parametrize("obj,data_len,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "gap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, "truncated or corrupt"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "needs 12"),
    ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, 8, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, "begin <= end"),
    ({"__metadata__": {"k": 1}}, 0, "__metadata__"),
])
def test_rejects_bad_headers(obj, data_len, match):
    raw = _raw(obj, data_len)
    with pytest.raises(ResolveError, match=match):
        parse_header(raw, "shard.safetensors", len(raw))


def test_a_shape_past_any_file_is_refused_without_its_thousand_digit_size():
    # 64 dims, each in range, multiply to a number of some 1200 digits: the message says so briefly.
    raw = _raw({"a": {"dtype": "F32", "shape": [2**62 - 1] * 64, "data_offsets": [0, 4]}}, 4)
    with pytest.raises(ResolveError, match=r"needs more than 2\*\*62 bytes; the file is corrupt") as e:
        parse_header(raw, "shard.safetensors", len(raw))
    assert len(str(e.value)) < 300 and "[..." not in str(e.value)


def test_rejects_absurd_lengths_and_garbage():
    raw = struct.pack("<Q", HEADER_CAP + 1) + b"{}"
    with pytest.raises(ResolveError, match="cap"):
        parse_header(raw, "f", 1 << 40)
    raw = struct.pack("<Q", 1000) + b"{}"
    with pytest.raises(ResolveError, match="truncated"):
        parse_header(raw, "f", len(raw))
    with pytest.raises(ResolveError, match="too short"):
        parse_header(b"abc", "f", 3)
    raw = struct.pack("<Q", 4) + b"{{{{"
    with pytest.raises(ResolveError, match="not valid JSON"):
        parse_header(raw, "f", len(raw))


def _raw_text(text: bytes, data_len: int) -> bytes:
    return struct.pack("<Q", len(text)) + text + b"\0" * data_len


@pytest.mark.parametrize("text,data_len,match", [
    (b'{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', 4, r"unknown dtype \['F32'\]"),
    (b'{"w": {"dtype": {"a": 1}, "shape": [1], "data_offsets": [0, 4]}}', 4, "unknown dtype"),
    (b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 0, "nested deeper than 64 levels"),
    (b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', 4,
     "an integer of 5000 digits"),
    (b'{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4, "lone surrogate"),
    (b'{"": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4, "empty name"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": []}', 4, "__metadata__"),
    (b'{"w": {"dtype": "F32", "shape": [' + b"1," * 64 + b'1], "data_offsets": [0, 4]}}', 4, "at most 64"),
    (b'{"w": {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 4]}}', 4, "shape"),
    (b'{"w": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', 4, "shape"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4611686018427387904]}}', 4, "data_offsets"),
    (b'{"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}', 4, "shape"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": NaN}}', 4, "NaN"),
    (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}\xff', 4, "not UTF-8"),
])
def test_hostile_headers_are_one_resolve_error(text, data_len, match):
    raw = _raw_text(text, data_len)
    with pytest.raises(ResolveError, match=match) as e:
        parse_header(raw, "shard.safetensors", len(raw))
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_long_hostile_values_are_cut_short_in_the_error():
    obj = {"w" * 10_000: {"dtype": "Q" * 10_000, "shape": [1], "data_offsets": [0, 4]}}
    raw = _raw(obj, 4)
    with pytest.raises(ResolveError, match="unknown dtype") as e:
        parse_header(raw, "shard.safetensors", len(raw))
    assert len(str(e.value)) < 400


def test_header_bytes_take_a_second_read_only_for_long_headers():
    short = save({"a": torch.ones(3)})
    long = save({f"t{i:06d}": torch.ones(1) for i in range(FIRST_READ // 40)})
    files = [short, long]
    calls = []

    def read(requests):
        calls.append(requests)
        return [files[i][start:end] for i, start, end in requests]

    raws = read_header_bytes(read, [len(f) for f in files], ["short", "long"])
    n_long = struct.unpack("<Q", long[:8])[0]
    assert n_long + 8 > FIRST_READ
    assert calls == [[(0, 0, len(short)), (1, 0, FIRST_READ)], [(1, FIRST_READ, 8 + n_long)]]
    assert raws[0] == short[:8 + struct.unpack("<Q", short[:8])[0]] and raws[1] == long[:8 + n_long]
    with pytest.raises(ResolveError, match="bad: file is 4 bytes, too short"):
        read_header_bytes(read, [4], ["bad"])


def test_element_and_byte_counts():
    assert (numel(()), numel((3, 4)), numel([2, 0, 5])) == (1, 12, 0)
    assert nbytes("BF16", (3, 4)) == 24 and nbytes("F8_E4M3", ()) == 1
