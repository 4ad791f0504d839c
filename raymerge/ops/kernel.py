"""The kernel protocol: the float32 arithmetic every merge method computes with, and which
implementation computes it.

Most methods are one weighted sum:

    acc = anchor (or 0);  for each (scale, a, b) in order: acc += scale * (a - b);  out = round(acc)

Each step is a separate float32 operation (no fused multiply-add; `fused_sum`, for mergekit's
linear, is the one fused operation), so the bits match any reference that does the same
arithmetic in float32 (torch's, mergekit's), whatever the chunking, the item size or the device. A
term shorter than `out` applies to out's first elements only (rows shared by all inputs). With no
terms, this is a cast of `anchor` (an override row).

TIES and DARE (methods/sparse.py) compute a combined change first, chunk by chunk, with the
kernel's array primitives (`Kernel`: widening, float32 arithmetic, masks as 1.0 and 0.0,
magnitude bits), on float32 arrays on the kernel's device; then `weighted_sum` adds it to the
anchor and rounds it, as above. Their statistics (histograms, exact sums) are computed on the
host (ops/sparse.py) from the magnitude bits `to_host` brings there.

Two implementations, chosen by `kernel_for`:
  - `numpy_kernel`: on the CPU for BF16, F16, F32 and F64. Importing torch costs every worker
    about 1.8 s of start-up on a 2-core machine (a quarter of a whole 1.5 GB merge), while every
    Ray worker has numpy loaded already; it is imported only by `kernel_for`, as needed.
  - `torch_kernel`: on a GPU, and for FP8 (which numpy has no types for) on the CPU.

The bits of the output are defined here, once, and both implementations give them:
  - Widening to float32 is exact: BF16 by a 16-bit shift, F16 by `f16_to_f32()` (a NaN keeps its
    sign and payload, a signalling one stays signalling), F64 rounded once.
  - Rounding is to nearest, ties to even. BF16 rounds on the bits (add 0x7FFF, plus one when the
    kept half is odd) and every BF16 NaN is written 0xFFFF. That is what torch's tensor conversion
    on the CPU writes (`t.to(torch.bfloat16)` of a float32 tensor, its vector body and its tail
    alike; torch 2.13, AVX2); torch's scalar conversion (c10::BFloat16 made from a float, as in
    `torch.tensor(nan, dtype=torch.bfloat16)`) writes 0x7FC0 instead.
  - The NaN an operation gives is not left to the hardware: CPUs choose between two NaN operands
    differently in SIMD and scalar loops (numpy keeps the second in its vector body, the first in
    its tail), ARM's default NaN is positive, and a GPU writes one canonical NaN. Every NaN of acc
    is given the bits of `nan_rule` instead, the x86 rule made exact: an operation on a NaN gives
    its first NaN operand, quieted; one that makes a NaN from numbers gives 0xFFC00000. Output
    NaNs then narrow as `nan_bits` says (F16: sign, quiet bit, the payload's top bits).
  - The array primitives leave a NaN's bits to the hardware. A method computing with them gives
    the NaNs of its result the same rule: it replays those few elements, operation by operation,
    with `numpy_kernel.EXACT` (numpy's arithmetic with this rule) before `weighted_sum`. No
    decision depends on a NaN's bits: TIES ranks every NaN's magnitude as one (ops/sparse.py).

Non-finite outputs are counted, and told apart from those an input's NaN or infinity explains: a
finite input that gives an infinity (F16's narrow range, a huge scale) is a broken merge.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from raymerge.errors import InputError

NUMPY_DTYPES: dict[str, type] = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
QUIET_BIT = 0x00400000  # of a float32 NaN
DEFAULT_NAN = 0xFFC00000  # the NaN an x86 operation makes from numbers (inf - inf, 0 * inf)


class Sums(NamedTuple):
    """What `weighted_sum` tells of the elements it wrote."""

    ss_delta: float  # sum of squares of the applied change, sum(scale * (a - b))
    ss_anchor: float  # sum of squares of the anchor
    nonfinite: int  # output elements that are an infinity or a NaN, after rounding to the output type
    new_nonfinite: int  # of those, the ones whose every input element is finite: made by the arithmetic


@dataclass(slots=True)
class Scratch:
    """Float32 work buffers of an implementation's array type, allocated once per worker thread
    and reused for every item: acc, the sum; x, y, a term's operands; d, the change, with several
    terms; work, rounding. `staging`: what else the implementation keeps (host and device buffers,
    `table`s)."""

    chunk: int
    acc: Any
    x: Any
    y: Any
    d: Any
    work: Any
    staging: dict[Any, Any] = field(default_factory=dict)


class Kernel(Protocol):
    """One implementation of the kernel's arithmetic. Hashable: a worker keys its per-thread scratch by it.

    1. `scratch()` once per worker thread;
    2. `view(buf, dtype)` over each input and output buffer (no copy; the arrays slice and have a length);
    3. `weighted_sum(out, anchor, terms, scratch)` for each tensor piece, or a method's own steps
       with the array primitives below, chunk by chunk, then `weighted_sum`.

    The array primitives, which TIES and DARE compute with:
      - buffers and transfers: table, widen, gather, from_host, put, to_host;
      - float32 arithmetic: copy, fill, add, subtract, multiply, divide, maximum, minimum, absolute,
        reciprocal, greater, greater_equal, equal, magnitude_bits;
      - rounding: round_to (a float32 array rounded to a narrower type's values, as torch rounds
        each operation of a BF16 or F16 tensor on the CPU: mergekit's compute dtype).
    They work on the kernel's arrays: 1-D slices of `table` rows, float32 (or magnitude bits), on
    the kernel's device. Arithmetic is float32, each operation rounded once (never fused); `y` is
    an array as long as `x`, or a scalar (a float32 value, or an integer for magnitude bits); `out`
    may be `x` or `y` itself. Comparisons write 1.0 where true, else 0.0. The inputs (`view`) enter
    only through `widen` and `gather`; host arrays (numpy's) go in with `from_host` and `put`, and
    come out with `to_host`.
    """

    name: str

    def scratch(self, chunk: int | None = None, wide: bool = False) -> Scratch:
        """Buffers of `chunk` elements (None: the kernel's chunk; `wide`: its chunk for a method
        whose chunks cost more in Python than in arithmetic, Method.wide_chunks)."""

    def view(self, buf: memoryview, dtype: str) -> Any: ...

    def weighted_sum(self, out: Any, anchor: Any | None, terms: list[tuple[float, Any, Any | None]],
                     scratch: Scratch) -> Sums:
        """Write `round(anchor + sum(scale * (a - b)))` into `out` (1-D arrays from `view`; a term's `a`
        may also be a float32 array of the kernel's).

        Returns the sums of squares of the applied change and of the anchor (in float32, up to the
        order of summation): the per-tensor statistics chat-vector users look at. And the counts of
        non-finite outputs: all of them, and those no non-finite input explains.
        """
        ...

    def fused_sum(self, out: Any, terms: list[tuple[float, Any]], scratch: Scratch) -> None:
        """out (float32) = 0, then for each (scale, a) in order out = fma(a, scale, out): a product and
        a sum rounded once, as torch's addcmul_ does (mergekit's linear). No statistics: `out`
        is an intermediate that `weighted_sum` then rounds and counts. Its NaNs follow the NaN rule
        above, the operands of a step taken in the order a, scale, out
        (`numpy_kernel.fused_nan_rule`)."""
        ...

    # --- array primitives: buffers and transfers ---

    def table(self, scratch: Scratch, key: str, rows: int, bits: bool = False) -> Any:
        """A (rows, scratch.chunk) array on the device, float32 (or magnitude bits), kept in
        scratch.staging under `key` and reused (fresh pages are slow to touch); its contents are
        left from earlier use. Asking for more rows makes a new one."""
        ...

    def widen(self, dst: Any, src: Any, scratch: Scratch) -> None:
        """dst (float32, as long as src) = an input's elements (`view`), widened exactly."""
        ...

    def gather(self, src: Any, at: np.ndarray | slice) -> np.ndarray:
        """The float32 values of elements `at` (indices, or a slice) of an input (`view`) or a float32
        array, on the host, widened exactly (NaNs keep their bits): for the few elements a NaN rule
        replays, and the whole rows della ranks."""
        ...

    def from_host(self, dst: Any, src: np.ndarray) -> None:
        """dst (float32) = a host array (bool: 1.0 and 0.0)."""
        ...

    def put(self, dst: Any, at: np.ndarray, values: Any) -> None:
        """dst[at] = values (float32: a host array as long as `at`, or a scalar)."""
        ...

    def to_host(self, x: Any, scratch: Scratch) -> np.ndarray:
        """x's values as a host array (magnitude bits as uint32), valid until the next call: x
        itself where the device is the host."""
        ...

    # --- array primitives: float32 arithmetic ---

    def copy(self, out: Any, x: Any) -> None: ...

    def fill(self, out: Any, value: float) -> None: ...

    def add(self, x: Any, y: Any, out: Any) -> None: ...

    def subtract(self, x: Any, y: Any, out: Any) -> None: ...

    def multiply(self, x: Any, y: Any, out: Any) -> None: ...

    def divide(self, x: Any, y: Any, out: Any) -> None: ...

    def greater(self, x: Any, y: Any, out: Any) -> None: ...

    def greater_equal(self, x: Any, y: Any, out: Any) -> None: ...

    def equal(self, x: Any, y: Any, out: Any) -> None: ...

    def maximum(self, x: Any, y: Any, out: Any) -> None:
        """The larger of x and y, a NaN where either is one (torch's clamp and maximum)."""
        ...

    def minimum(self, x: Any, y: Any, out: Any) -> None:
        """The smaller of x and y, a NaN where either is one."""
        ...

    def absolute(self, x: Any, out: Any) -> None: ...

    def reciprocal(self, x: Any, out: Any) -> None:
        """1 / x, rounded once (torch computes `t / x` as `x.reciprocal() * t`)."""
        ...

    def magnitude_bits(self, x: Any, out: Any, nans_equal: bool = False) -> Any:
        """out (magnitude bits) = the bits of |x|; with nans_equal (one more pass), every NaN's as
        `sparse.NAN_MAGNITUDE` (NaNs rank equal, above +inf, whatever their payloads). Returns out."""
        ...

    def round_to(self, x: Any, dtype: str) -> None:
        """x (float32) = x rounded half to even to `dtype` ("BF16" or "F16"), kept as float32: the value
        torch's CPU gives an operation on tensors of that type (it computes in float32 and rounds).
        Overflow gives an infinity; a NaN stays a NaN (its bits are the output's rule)."""
        ...


COMPUTE_DTYPES = ("BF16", "F16")  # what `round_to` rounds to; float32 needs no rounding


def round_scalar(value: float, dtype: str | None) -> np.float32:
    """A number as float32, rounded to `dtype` (None: float32) as `round_to` rounds: a weight as mergekit
    holds it in a tensor of its compute dtype."""
    x = np.array([value], np.float32)
    if dtype is not None:
        from raymerge.ops.numpy_kernel import NUMPY

        NUMPY.round_to(x, dtype)
    return x[0]


def supports(dtype: str) -> bool:
    """Whether the numpy kernel handles a dtype."""
    return dtype in NUMPY_DTYPES


def kernel_for(device: str, dtypes: set[str], threads: int = 1) -> Kernel:
    """numpy on the CPU when it handles every dtype; torch otherwise (FP8, or a GPU: "cuda", "cuda:N").
    `threads`: torch's intra-op threads on the CPU."""
    if device == "cpu" and all(supports(d) for d in dtypes):
        from raymerge.ops.numpy_kernel import NUMPY

        return NUMPY
    from raymerge.ops.torch_kernel import TorchKernel

    return TorchKernel(device, threads)


def check_device(device: str) -> None:
    """Fail at a worker's start-up, not at its first item, when `device` cannot be used."""
    if device == "cpu":
        return
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise InputError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'")
    try:
        import torch
    except ImportError as e:
        raise InputError(f"device {device!r} needs torch, which this worker cannot import ({e}): install torch "
                         "with CUDA on the GPU nodes, or compute on CPUs (--gpus-per-worker 0)") from e
    if not torch.cuda.is_available():
        raise InputError(f"device {device!r}: torch {torch.__version__} on this worker sees no CUDA GPU; run GPU "
                         "workers on GPU nodes with a CUDA build of torch, or compute on CPUs (--gpus-per-worker 0)")
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise InputError(f"device {device!r}: this worker sees {torch.cuda.device_count()} CUDA device(s); "
                         "use one of them, or set CUDA_VISIBLE_DEVICES to match")


@functools.cache
def f16_to_f32() -> np.ndarray:
    """float32 of every F16 bit pattern, exactly; a NaN keeps its sign and payload and stays signalling
    if it was (numpy's own conversion quiets it or not depending on how it was built)."""
    h = np.arange(1 << 16, dtype=np.uint32)
    bits = (h & 0x7FFF) << 13
    value = bits.view(np.float32) * np.float32(2.0 ** 112)  # rebiases the exponent; exact, subnormals too
    out = value.view(np.uint32)
    special = (h & 0x7C00) == 0x7C00
    out[special] = bits[special] | 0x7F800000  # infinities and NaNs: all exponent bits set
    out |= (h & 0x8000) << 16
    out.flags.writeable = False
    return out.view(np.float32)


def nan_rule(anchor: np.ndarray | None, terms: list[tuple[float, np.ndarray, np.ndarray | None, int]],
             n: int) -> np.ndarray:
    """The float32 acc of n elements where `weighted_sum`'s acc is NaN, with every NaN's bits fixed.

    anchor, a, b: those elements of the inputs, widened (exactly) to float32; a term's arrays hold its
    first p elements (it covers the prefix of the elements that lie inside it). Few elements: cost is
    no concern here, only the bits.
    """
    acc = anchor.copy() if anchor is not None else np.zeros(n, np.float32)
    with np.errstate(all="ignore"):
        for scale, a, b, p in terms:
            x = a if b is None else exact_op(np.subtract, a, b)
            if np.float32(scale) != 1.0:  # the kernels skip multiplying by one, so a NaN of `a` stays as it is
                x = exact_op(np.multiply, x, np.full(p, scale, np.float32))
            acc[:p] = exact_op(np.add, acc[:p], x)
    return acc


def exact_op(op, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """op(p, q) in float32, with x86's NaN made exact: the first NaN operand, quieted, else 0xFFC00000."""
    r = op(p, q).view(np.uint32)
    nan = np.isnan(r.view(np.float32))
    if nan.any():
        pick = np.where(np.isnan(p), p.view(np.uint32), np.where(np.isnan(q), q.view(np.uint32), DEFAULT_NAN))
        r = np.where(nan, pick | QUIET_BIT, r).astype(np.uint32)
    return r.view(np.float32)


def nan_bits(acc: np.ndarray, dtype: str) -> np.ndarray:
    """The output bits of float32 NaNs `acc`, as unsigned integers of the output's width."""
    bits = acc.view(np.uint32)
    if dtype == "BF16":
        return np.full(bits.size, 0xFFFF, np.uint16)
    if dtype == "F16":  # quieted, as torch's conversion does (numpy's keeps a signalling NaN)
        return ((bits >> 16) & 0x8000 | 0x7C00 | ((bits | QUIET_BIT) & 0x7FFFFF) >> 13).astype(np.uint16)
    if dtype == "F32":
        return bits.copy()
    if dtype == "F64":  # quieted, as converting on x86 does
        wide = bits.astype(np.uint64)
        return (wide & 0x80000000) << 32 | 0x7FF8000000000000 | ((wide | QUIET_BIT) & 0x7FFFFF) << 29
    raise ValueError(f"no NaN rule for {dtype}")  # FP8 keeps its conversion's NaN
