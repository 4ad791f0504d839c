"""The float32 weighted sum with torch: on a worker's GPU, and for FP8 tensors on the CPU.

The CPU kernel (`kernel`, numpy) does the same arithmetic on the same chunks for every other
type; this one is imported only where it is needed, since importing torch is slow.

    acc = anchor (or 0);  for each (scale, a, b) in order: acc += scale * (a - b);  out = round(acc)

Each step is a separate float32 operation (no fused multiply-add), so the bits match any
reference that does the same arithmetic in float32, whatever the chunking or item size. A term
shorter than `out` applies to out's first elements only (rows shared by all inputs).

Non-finite outputs are counted as `kernel` counts them, on the rounded output itself: FP8 E4M3
has no infinity, and torch's conversion (2.13, on the CPU) saturates an out-of-range value, an
infinity too, to 448: counting what was written stays right whatever a conversion does.
"""

from __future__ import annotations

import math
import warnings

import torch

from raymerge.ops.kernel import Sums

# Inputs are read-only mappings of the files; the kernel only reads them.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

CHUNK = 1 << 16  # elements: three float32 chunks stay in a core's L2 cache
GPU_CHUNK = 1 << 22  # on a GPU, few large copies and kernels beat many small ones


class Scratch:
    """Float32 work buffers, allocated once per worker thread and reused for every item.

    On a GPU the same loop runs with the buffers on the device: each chunk of the inputs is
    copied to it, computed there with the same float32 operations, and copied back once cast.
    """

    def __init__(self, chunk: int | None = None, device: str = "cpu") -> None:
        chunk = chunk or (CHUNK if device == "cpu" else GPU_CHUNK)
        self.chunk = chunk
        self.device = device
        self.acc = torch.empty(chunk, dtype=torch.float32, device=device)
        self.x = torch.empty(chunk, dtype=torch.float32, device=device)
        self.y = torch.empty(chunk, dtype=torch.float32, device=device)
        self.d = torch.empty(chunk, dtype=torch.float32, device=device)  # the change, with several terms


def view(buf: memoryview, dtype: str) -> torch.Tensor:
    """A 1-D tensor over `buf` (no copy)."""
    if len(buf) == 0:
        return torch.empty(0, dtype=TORCH_DTYPES[dtype])
    return torch.frombuffer(buf, dtype=TORCH_DTYPES[dtype])


def weighted_sum(out: torch.Tensor, anchor: torch.Tensor | None,
                 terms: list[tuple[float, torch.Tensor, torch.Tensor | None]],
                 scratch: Scratch) -> Sums:
    """Write `round(anchor + sum(scale * (a - b)))` into `out` (1-D tensors).

    Returns the sums of squares of the applied change `sum(scale * (a - b))` and of the anchor (in
    float32): the per-tensor statistics chat-vector users look at. They cost one pass each. And
    the counts of non-finite outputs: all of them, and those no non-finite input explains.
    Per-chunk views come from `split` (made in C++ at once): per-op Python overhead, not memory,
    is what bounds this loop.
    """
    n = out.numel()
    c = scratch.chunk
    chunks = [(lo, min(n, lo + c)) for lo in range(0, n, c)]
    outs = out.split(c)
    anchors = anchor.split(c) if anchor is not None else [None] * len(chunks)
    split_terms = [(scale, a.split(c), b.split(c) if b is not None else None, a.numel()) for scale, a, b in terms]
    largest = torch.finfo(out.dtype).max if out.dtype.is_floating_point else math.inf
    ss_delta = ss_anchor = 0.0
    nonfinite = new = 0
    for k, (lo, hi) in enumerate(chunks):
        m = hi - lo
        acc, x, y, d = (t if m == c else t[:m] for t in (scratch.acc, scratch.x, scratch.y, scratch.d))
        if anchors[k] is None:
            acc.zero_()
        else:
            acc.copy_(anchors[k])
            ss_anchor += float(torch.dot(acc, acc))
        live = [(scale, a[k], b[k] if b is not None else None, min(m, limit - lo))
                for scale, a, b, limit in split_terms if limit > lo]  # a term may cover only a prefix
        for j, (scale, a, b, p) in enumerate(live):
            xp = x if p == m else x[:p]
            xp.copy_(a)
            if b is not None:
                yp = y if p == m else y[:p]
                yp.copy_(b)
                xp.sub_(yp)
            if scale != 1.0:  # multiplying by one is exact: skipping it changes no bit
                xp.mul_(scale)
            (acc if p == m else acc[:p]).add_(xp)
            if len(live) == 1:
                ss_delta += float(torch.dot(xp, xp))
            elif j == 0:
                d.zero_()
                d[:p].copy_(xp)
            else:
                d[:p].add_(xp)
        if len(live) > 1:
            ss_delta += float(torch.dot(d, d))
        outs[k].copy_(acc)
        if not _provably_finite(acc, largest):
            total, fresh = _count_nonfinite(outs[k], anchors[k], live)
            nonfinite += total
            new += fresh
    return Sums(ss_delta, ss_anchor, nonfinite, new)


def _provably_finite(acc: torch.Tensor, largest: float) -> bool:
    """Whether every element of acc rounds to a finite output: rounding to nearest is monotone, so
    no |acc| above the output type's largest finite value means none (a NaN fails the test)."""
    low, high = torch.aminmax(acc)
    return float(torch.maximum(-low, high)) <= largest


def _count_nonfinite(out: torch.Tensor, anchor: torch.Tensor | None, live: list) -> tuple[int, int]:
    """(non-finite outputs, those whose inputs covering them are all finite), element by element."""
    bad = ~_finite(out)
    total = int(bad.sum())
    if total == 0:
        return 0, 0
    if anchor is not None:
        bad &= _finite(anchor)
    for _scale, a, b, p in live:  # a term covers out's first p elements only
        bad[:p] &= _finite(a)
        if b is not None:
            bad[:p] &= _finite(b)
    return total, int(bad.sum())


def _finite(t: torch.Tensor) -> torch.Tensor:
    """Which elements are neither an infinity nor a NaN, in t's own type (torch has no isfinite for FP8;
    widening it to float32 is exact)."""
    return torch.isfinite(t.float() if t.dtype.itemsize == 1 else t)
