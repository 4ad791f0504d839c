"""Parse and serialize safetensors headers.

Layout: 8-byte little-endian length N, N bytes of JSON
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}`, then the data.
Offsets are relative to the data start (8 + N) and must tile the data exactly: no gaps, no
overlaps, and the file ends where the last tensor ends. Writers pad the JSON with spaces to a
multiple of 8 so that the data starts 8-byte aligned.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass

from raymerge.errors import ResolveError
from raymerge.safetensors.dtypes import ITEMSIZE, nbytes
from raymerge.untrusted import UntrustedJSON, parse_json, shown

HEADER_CAP = 100_000_000  # bytes of JSON; the reference implementation refuses larger too
FIRST_READ = 100_000  # one speculative read covers the header of nearly every real shard
MAX_DIMS = 64  # real tensors have a handful; the bound keeps the product of the shape cheap
MAX_COUNT = 2**62  # dims and offsets: far past any real file, and safe in every int64 sum


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the data start
    end: int


@dataclass(frozen=True, slots=True)
class Header:
    data_start: int  # 8 + N: absolute offset of the data
    entries: tuple[Entry, ...]  # in data order
    metadata: dict[str, str]


def header_length(prefix: bytes, where: str, file_size: int) -> int:
    """N from the first 8 bytes, refusing lengths no honest file has."""
    if len(prefix) < 8:
        raise ResolveError(f"{where}: file is {file_size} bytes, too short for a safetensors header; "
                           "re-download or re-save the shard")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > HEADER_CAP:
        raise ResolveError(f"{where}: header claims {n} bytes, over the {HEADER_CAP}-byte cap; "
                           "the file is corrupt or not safetensors")
    if 8 + n > file_size:
        raise ResolveError(f"{where}: header claims {n} bytes but the file has only {file_size}; "
                           "the file is truncated or not safetensors")
    return n


def read_header_bytes(read: Callable[[list[tuple[int, int, int]]], list[bytes]], sizes: list[int],
                      wheres: list[str]) -> list[bytes]:
    """The first 8 + N bytes (length and header) of each of some files of `sizes` bytes.

    One speculative read of FIRST_READ bytes per file, all of them in one call, then a second call
    for the rest of the rare headers longer than that. `read` takes (file index, start, end)
    requests and returns their bytes in order; `wheres` name the files in errors.
    """
    firsts = read([(i, 0, min(size, FIRST_READ)) for i, size in enumerate(sizes)])
    ends = [8 + header_length(raw, where, size) for raw, where, size in zip(firsts, wheres, sizes)]
    longer = [i for i, (raw, end) in enumerate(zip(firsts, ends)) if end > len(raw)]
    rests = dict(zip(longer, read([(i, len(firsts[i]), ends[i]) for i in longer]))) if longer else {}
    return [(raw + rests[i] if i in rests else raw)[:end] for i, (raw, end) in enumerate(zip(firsts, ends))]


def parse_header(raw: bytes, where: str, file_size: int) -> Header:
    """Parse `raw` (at least the first 8 + N bytes of a file of `file_size` bytes) and check it."""
    n = header_length(raw, where, file_size)
    try:
        obj = parse_json(raw[8:8 + n], max_bytes=HEADER_CAP)
    except UntrustedJSON as e:
        raise ResolveError(f"{where}: header refused ({e}); the file is corrupt or not safetensors") from e
    if not isinstance(obj, dict):
        raise ResolveError(f"{where}: header is not a JSON object; the file is corrupt")
    metadata = _metadata(obj.pop("__metadata__", None), where)
    entries = sorted((_entry(name, spec, where) for name, spec in obj.items()),
                     key=lambda e: (e.begin, e.end))
    data_len = file_size - 8 - n
    _check_tiling(entries, data_len, where)
    return Header(8 + n, tuple(entries), metadata)


def _metadata(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ResolveError(f"{where}: __metadata__ must map strings to strings; the file is corrupt")
    return dict(value)


def _entry(name: str, spec: object, where: str) -> Entry:
    at = f"{where}: tensor {shown(name)}"
    if not name:
        raise ResolveError(f"{where}: a tensor has an empty name; the file is corrupt")
    if not isinstance(spec, dict):
        raise ResolveError(f"{at}: entry is not an object; the file is corrupt")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise ResolveError(f"{at}: unknown dtype {shown(dtype)}; supported: {', '.join(ITEMSIZE)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
        raise ResolveError(f"{at}: shape {shown(shape)} is not a list of at most {MAX_DIMS} integers "
                           f"in [0, 2**62)")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise ResolveError(f"{at}: data_offsets {shown(offsets)} are not [begin, end] with "
                           "0 <= begin <= end < 2**62")
    expected = nbytes(dtype, shape)
    if offsets[1] - offsets[0] != expected:
        # 64 dims below 2**62 multiply to some 1200 digits: past any file, and past any message
        needs = expected if expected < MAX_COUNT else "more than 2**62 bytes"
        raise ResolveError(f"{at}: data_offsets span {offsets[1] - offsets[0]} bytes but "
                           f"{dtype}{shown(shape)} needs {needs}; the file is corrupt")
    return Entry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < MAX_COUNT


def _check_tiling(entries: list[Entry], data_len: int, where: str) -> None:
    pos = 0
    for e in entries:
        if e.begin != pos:
            what = "overlaps the previous tensor" if e.begin < pos else f"leaves a gap at {pos}"
            raise ResolveError(f"{where}: tensor {shown(e.name)} at bytes [{e.begin}, {e.end}) {what}; "
                               "the file is corrupt or hostile")
        pos = e.end
    if pos != data_len:
        raise ResolveError(f"{where}: tensors end at data byte {pos} but the file holds {data_len} "
                           "data bytes; the file is truncated or corrupt")


def serialize_header(entries: list[tuple[str, str, tuple[int, ...], int, int]],
                     metadata: dict[str, str] | None = None) -> bytes:
    """Exact header bytes (length prefix + JSON padded with spaces to a multiple of 8).

    `entries` are (name, dtype, shape, begin, end) in data order.
    """
    obj: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    for name, dtype, shape, begin, end in entries:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text
