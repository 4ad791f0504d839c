"""The float32 weighted sum, in sub-chunks of reused scratch buffers.

    acc = anchor (or 0);  for each (scale, a, b) in order: acc += scale * (a - b);  out = round(acc)

Each step is a separate float32 operation (no fused multiply-add), so the bits match any
reference that does the same arithmetic in float32, whatever the chunking or item size. A term
shorter than `out` applies to out's first elements only (rows shared by all inputs).
"""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

CHUNK = 1 << 16  # elements: three float32 chunks stay in a core's L2 cache


class Scratch:
    """Float32 work buffers, allocated once per worker thread and reused for every item."""

    def __init__(self, chunk: int = CHUNK, device: str = "cpu") -> None:
        self.chunk = chunk
        self.device = device
        self.acc = torch.empty(chunk, dtype=torch.float32, device=device)
        self.x = torch.empty(chunk, dtype=torch.float32, device=device)
        self.y = torch.empty(chunk, dtype=torch.float32, device=device)


def view(buf: memoryview, dtype: str) -> torch.Tensor:
    """A 1-D tensor over `buf` (no copy)."""
    if len(buf) == 0:
        return torch.empty(0, dtype=TORCH_DTYPES[dtype])
    return torch.frombuffer(buf, dtype=TORCH_DTYPES[dtype])


def weighted_sum(out: torch.Tensor, anchor: torch.Tensor | None,
                 terms: list[tuple[float, torch.Tensor, torch.Tensor | None]],
                 scratch: Scratch) -> tuple[float, float]:
    """Write `round(anchor + sum(scale * (a - b)))` into `out` (1-D tensors).

    Returns the sums of squares of the change (`acc - anchor`, before rounding) and of the anchor,
    the per-tensor statistics chat-vector users look at.
    """
    n = out.numel()
    ss_delta = ss_anchor = 0.0
    for lo in range(0, n, scratch.chunk):
        hi = min(n, lo + scratch.chunk)
        acc = scratch.acc[:hi - lo]
        if anchor is None:
            acc.zero_()
        else:
            acc.copy_(anchor[lo:hi])
            ss_anchor += float(torch.dot(acc, acc))
        for scale, a, b in terms:
            m = min(hi, a.numel()) - lo  # a term may cover only a prefix of the tensor
            if m <= 0:
                continue
            x = scratch.x[:m]
            x.copy_(a[lo:lo + m])
            if b is not None:
                y = scratch.y[:m]
                y.copy_(b[lo:lo + m])
                x.sub_(y)
            if scale != 1.0:  # multiplying by one is exact: skipping it changes no bit
                x.mul_(scale)
            acc[:m].add_(x)
        if terms:
            delta = scratch.y[:hi - lo]
            if anchor is None:
                delta.copy_(acc)
            else:
                delta.copy_(anchor[lo:hi])
                delta.sub_(acc)
            ss_delta += float(torch.dot(delta, delta))
        out[lo:hi].copy_(acc)
    return ss_delta, ss_anchor
