"""Options and recipes, validated at the boundary: every bad value becomes one clear InputError."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from raymerge.errors import InputError
from raymerge.safetensors.dtypes import ALIASES, FLOATS

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int, option: str) -> int:
    """Bytes from '5GB' (decimal, as Hugging Face counts), '64MiB' (binary) or a plain integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise InputError(f"{option} {value!r}: not a size; write e.g. 5GB, 500MB, 64MiB or a byte count")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise InputError(f"{option} {value!r}: must be a positive size")
    return n


def parse_scale(value: float | str, option: str = "--scale") -> float:
    try:
        x = float(value)
    except (TypeError, ValueError) as e:
        raise InputError(f"{option} {value!r}: not a number; write e.g. 0.5 or 1.0") from e
    if not math.isfinite(x):
        raise InputError(f"{option} {value!r}: must be a finite number")
    return x


def parse_dtype(value: str | None) -> str | None:
    """A safetensors float dtype name from 'bfloat16', 'bf16', 'BF16', ...; None stays None."""
    if value is None:
        return None
    name = ALIASES.get(value.lower(), value.upper())
    if name not in FLOATS:
        raise InputError(f"--dtype {value!r}: not a float dtype; use float32, bfloat16 or float16")
    return name


def parse_storage_options(value: str | dict | None) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise InputError(f"--storage-options: not valid JSON ({e.msg} at character {e.pos}); "
                         'write e.g. \'{"client_kwargs": {"endpoint_url": "http://host:9000"}}\'') from e
    if not isinstance(obj, dict):
        raise InputError("--storage-options: must be a JSON object of fsspec options")
    return obj


def parse_count(value: int | None, option: str, minimum: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{option} {value!r}: must be an integer >= {minimum}")
    return value


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to compute): layout, pool and storage settings."""

    shard_size: int = 5_000_000_000
    item_size: int = 32 * 2**20
    dtype: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    in_flight: int = 2
    address: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False

    @classmethod
    def parse(cls, *, shard_size: str | int = "5GB", item_size: str | int = "32MiB", dtype: str | None = None,
              workers: int | None = None, cpus_per_worker: float = 1.0, in_flight: int = 2,
              address: str | None = None, storage_options: str | dict | None = None,
              overwrite: bool = False) -> RunOptions:
        cpus = parse_scale(cpus_per_worker, "--cpus-per-worker")
        if cpus <= 0:
            raise InputError(f"--cpus-per-worker {cpus_per_worker!r}: must be positive")
        return cls(parse_size(shard_size, "--shard-size"), parse_size(item_size, "--item-size"),
                   parse_dtype(dtype), parse_count(workers, "--workers"), cpus,
                   parse_count(in_flight, "--in-flight"), address, parse_storage_options(storage_options),
                   overwrite)
