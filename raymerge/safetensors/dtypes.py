"""safetensors dtype names: element size, and whether the float32 arithmetic applies to them;
element and byte counts of a shape."""

from __future__ import annotations

import math
from collections.abc import Iterable

ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

FLOATS = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})

# The spellings users type for --dtype, mapped to safetensors names.
ALIASES: dict[str, str] = {
    "float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16",
    "bfloat16": "BF16", "bf16": "BF16", "float64": "F64",
}


def is_float(dtype: str) -> bool:
    return dtype in FLOATS


def numel(shape: Iterable[int]) -> int:
    """Elements of a tensor of this shape (1 for a scalar's empty shape)."""
    return math.prod(shape)


def nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Bytes of a `dtype` tensor of this shape."""
    return ITEMSIZE[dtype] * numel(shape)
