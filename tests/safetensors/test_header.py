import json
import struct

import pytest
import torch
from safetensors.torch import save

from raymerge.errors import ResolveError
from raymerge.safetensors.header import HEADER_CAP, parse_header, serialize_header


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
