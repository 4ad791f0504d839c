"""The kernel (`kernel`) with torch: on a worker's GPU, and for FP8 tensors on the CPU.

Imported only where it is needed (`kernel.kernel_for`), since importing torch is slow.

Each chunk of an item goes through the same steps on any device ("cpu" runs them too, which is how
they are tested without a GPU):
  1. the raw bits of each input's chunk are copied into a reused host buffer (pinned when CUDA is
     there), then, without blocking, to a reused device buffer: 16-bit inputs cross as 16 bits;
  2. on the device they widen to float32 with integer operations (BF16: a shift; F16: a table of
     every bit pattern), the float32 arithmetic runs, and the sum rounds to the output's raw bits
     (BF16: on the bits, as `numpy_kernel` does; other types with torch's conversion, whose NaNs
     step 4 replaces);
  3. the raw output goes back to a pinned host buffer, the sums of squares and the largest
     magnitude with it (one synchronisation per chunk), and is copied into `out`;
  4. only in a chunk that may hold a NaN or an infinity: NaNs get `kernel.nan_rule`'s bits and
     non-finite outputs are counted, on the host, on the rounded output itself. FP8 E4M3 has no
     infinity, and torch's conversion (2.13, on the CPU) saturates an out-of-range value, an
     infinity too, to 448: counting what was written stays right whatever a conversion does.
     FP8 outputs keep their conversion's NaNs.

The array primitives (TIES, DARE) run on the device too: `widen` takes an input's chunk through the
same host and device buffers (step 1); the tables, and what the arithmetic writes, stay on the device
until `weighted_sum` takes a method's float32 result as a term, as it is. Magnitude bits are int32:
their sign bit is clear, so they compare as uint32 would (torch has few uint32 operations).
Statistics come to the host with `to_host`. Division by a scalar divides by a device tensor:
CUDA multiplies by the reciprocal of a host scalar instead, which is off by an ulp at times.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from raymerge.ops import sparse
from raymerge.ops.kernel import NUMPY_DTYPES, Scratch, Sums, f16_to_f32, nan_bits, nan_rule
from raymerge.ops.numpy_kernel import fused_nan_rule, widened

# Inputs are read-only mappings of the files; the kernel only reads them.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES: dict[torch.dtype, str] = {t: name for name, t in TORCH_DTYPES.items()}
BITS: dict[int, torch.dtype] = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # itemsize ->

CHUNK = 1 << 16  # elements: three float32 chunks stay in a core's L2 cache
GPU_CHUNK = 1 << 22  # on a GPU, few large copies and kernels beat many small ones
WIDEST = 8  # bytes per element of any input or output type


def _binary(fn):
    """A kernel primitive `op(x, y, out)`: the torch function, a number taken as torch takes it."""
    def op(self, x, y, out: torch.Tensor) -> None:
        fn(x, _scalar(y, x), out=out)
    return op


@dataclass(frozen=True, slots=True)
class TorchKernel:
    device: str = "cpu"
    threads: int = 1  # torch's intra-op threads, on the CPU
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", f"torch:{self.device}")

    def scratch(self, chunk: int | None = None, wide: bool = False) -> Scratch:
        """Float32 buffers on the device, and `staging`: raw host and device buffers per input slot
        (made on first use), the F16 table and, on a GPU, this thread's stream. `wide` changes
        nothing: torch's chunks are L2's on a CPU and already large on a GPU."""
        device = torch.device(self.device)
        if device.type == "cpu":
            torch.set_num_threads(self.threads)
        chunk = chunk or (CHUNK if device.type == "cpu" else GPU_CHUNK)
        acc, x, y, d = (torch.empty(chunk, dtype=torch.float32, device=device) for _ in range(4))
        work = torch.empty(chunk, dtype=torch.int32, device=device)
        staging = {"f16": torch.from_numpy(f16_to_f32().copy()).to(device)}
        if device.type == "cuda":
            staging["stream"] = torch.cuda.Stream(device)
            torch.cuda.synchronize(device)  # the buffers exist before the stream uses them
        return Scratch(chunk, acc, x, y, d, work, staging)

    def view(self, buf: memoryview, dtype: str) -> torch.Tensor:
        """A 1-D CPU tensor over `buf` (no copy)."""
        if len(buf) == 0:
            return torch.empty(0, dtype=TORCH_DTYPES[dtype])
        return torch.frombuffer(buf, dtype=TORCH_DTYPES[dtype])

    def weighted_sum(self, out: torch.Tensor, anchor: torch.Tensor | None,
                     terms: list[tuple[float, torch.Tensor, torch.Tensor | None]], scratch: Scratch) -> Sums:
        n = out.numel()
        c = scratch.chunk
        terms32 = [(float(np.float32(scale)), a, b) for scale, a, b in terms]  # float32(scale), as numpy_kernel
        largest = torch.finfo(out.dtype).max if out.dtype.is_floating_point else math.inf
        stream = scratch.staging.get("stream")
        if stream is not None:  # a term may be a float32 array the current stream is still writing
            stream.wait_stream(torch.cuda.current_stream(stream.device))
        ss_delta = ss_anchor = 0.0
        nonfinite = new = 0
        for lo in range(0, n, c):
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                sd, sa, bad, fresh = _chunk(out, anchor, terms32, scratch, lo, min(n, lo + c), largest)
            ss_delta += sd
            ss_anchor += sa
            nonfinite += bad
            new += fresh
        return Sums(ss_delta, ss_anchor, nonfinite, new)

    def fused_sum(self, out: torch.Tensor, terms: list[tuple[float, torch.Tensor]], scratch: Scratch) -> None:
        _fused_sum(out, terms)

    # The array primitives (kernel.Kernel), on the device.

    def table(self, scratch: Scratch, key: str, rows: int, bits: bool = False) -> torch.Tensor:
        t = scratch.staging.get(key)
        if t is None or t.shape[0] < rows:
            t = scratch.staging[key] = torch.empty((rows, scratch.chunk), dtype=torch.int32 if bits else torch.float32,
                                                   device=scratch.acc.device)
        return t

    def widen(self, dst: torch.Tensor, src: torch.Tensor, scratch: Scratch) -> None:
        _widen(dst, _to_device(src, "widen", scratch), scratch)

    def gather(self, src: torch.Tensor, at: np.ndarray | slice) -> np.ndarray:
        return _host_widened(src, at)

    def from_host(self, dst: torch.Tensor, src: np.ndarray) -> None:
        dst.copy_(torch.from_numpy(src))

    def put(self, dst: torch.Tensor, at: np.ndarray, values) -> None:
        if isinstance(values, np.ndarray):
            values = torch.from_numpy(values).to(dst.device)
        dst[torch.from_numpy(at).to(dst.device)] = values

    def to_host(self, x: torch.Tensor, scratch: Scratch) -> np.ndarray:
        if x.device.type != "cpu":
            host = _host_buffer("to_host", x.numel() * x.element_size(), scratch)
            host.copy_(x.view(torch.uint8))  # waits for the copy
            x = host.view(x.dtype)
        a = x.numpy()
        return a.view(np.uint32) if a.dtype == np.int32 else a

    def copy(self, out: torch.Tensor, x: torch.Tensor) -> None:
        out.copy_(x)

    def fill(self, out: torch.Tensor, value: float) -> None:
        out.fill_(value)

    # Elementwise float32 arithmetic and comparisons: torch's, each rounded once.
    add, subtract, multiply = (_binary(f) for f in (torch.add, torch.sub, torch.mul))
    greater, greater_equal, equal = (_binary(f) for f in (torch.gt, torch.ge, torch.eq))

    def maximum(self, x: torch.Tensor, y, out: torch.Tensor) -> None:
        (torch.maximum if isinstance(y, torch.Tensor) else torch.clamp_min)(x, _scalar(y, x), out=out)

    def minimum(self, x: torch.Tensor, y, out: torch.Tensor) -> None:
        (torch.minimum if isinstance(y, torch.Tensor) else torch.clamp_max)(x, _scalar(y, x), out=out)

    def absolute(self, x: torch.Tensor, out: torch.Tensor) -> None:
        torch.abs(x, out=out)

    def reciprocal(self, x: torch.Tensor, out: torch.Tensor) -> None:
        torch.reciprocal(x, out=out)

    def divide(self, x, y, out: torch.Tensor) -> None:
        if not isinstance(y, torch.Tensor):  # see the module's doc: never by a host scalar
            y = torch.tensor(float(y), dtype=torch.float32, device=x.device)
        torch.div(x, y, out=out)

    def magnitude_bits(self, x: torch.Tensor, out: torch.Tensor, nans_equal: bool = False) -> torch.Tensor:
        torch.bitwise_and(x.view(torch.int32), 0x7FFFFFFF, out=out)
        return out.clamp_max_(sparse.NAN_MAGNITUDE) if nans_equal else out

    def round_to(self, x: torch.Tensor, dtype: str) -> None:
        x.copy_(x.to(TORCH_DTYPES[dtype]))  # torch's own conversion: half to even (a NaN stays a NaN)


def _scalar(y, x: torch.Tensor):
    """y as torch takes it: a tensor as it is, a number as a Python number of x's kind (a float32
    value stays exact as a float)."""
    if isinstance(y, torch.Tensor):
        return y
    return float(y) if x.dtype.is_floating_point else int(y)


def _fused_sum(out: torch.Tensor, terms: list[tuple[float, torch.Tensor]]) -> None:
    """`Kernel.fused_sum` with torch's own addcmul_ (fused on the CPU), on the host tensors; then
    its NaNs get `numpy_kernel.fused_nan_rule`'s bits."""
    out.zero_()
    for scale, a in terms:
        out.addcmul_(torch.from_numpy(_host_widened(a)), torch.tensor(float(np.float32(scale)), dtype=torch.float32))
    nans = torch.isnan(out).nonzero().flatten().numpy()
    if nans.size:
        rule = fused_nan_rule([(scale, _host_widened(a, nans)) for scale, a in terms], nans.size)
        out.view(torch.int32).numpy().view(np.uint32)[nans] = rule.view(np.uint32)


def _chunk(out: torch.Tensor, anchor: torch.Tensor | None, terms32: list, scratch: Scratch, lo: int, hi: int,
           largest: float) -> tuple[float, float, int, int]:
    """Elements lo .. hi of `weighted_sum`: their `Sums`, as a plain tuple."""
    m = hi - lo
    acc, x, y, d = scratch.acc[:m], scratch.x, scratch.y, scratch.d
    stats = []  # 0-d device tensors: read together, in one synchronisation
    if anchor is None:
        acc.zero_()
    else:
        _widen(acc, _to_device(anchor[lo:hi], "anchor", scratch), scratch)
        stats.append(torch.dot(acc, acc))
    live = [(scale, a, b, min(m, a.numel() - lo)) for scale, a, b in terms32 if a.numel() > lo]  # a prefix, maybe
    for j, (scale, a, b, p) in enumerate(live):
        xp = x[:p]
        _widen(xp, _to_device(a[lo:lo + p], ("a", j), scratch), scratch)
        if b is not None:
            _widen(y[:p], _to_device(b[lo:lo + p], ("b", j), scratch), scratch)
            xp.sub_(y[:p])
        if scale != 1.0:  # multiplying by one is exact: skipping it changes no bit
            xp.mul_(scale)
        acc[:p].add_(xp)
        if len(live) == 1:
            stats.append(torch.dot(xp, xp))
        elif j == 0:
            d[:m].zero_()
            d[:p].copy_(xp)
        else:
            d[:p].add_(xp)
    if len(live) > 1:
        stats.append(torch.dot(d[:m], d[:m]))
    raw = _narrow(acc, out.dtype, scratch)
    low, high = torch.aminmax(acc)
    stats.append(torch.maximum(-low, high))
    host = _host_buffer("out", raw.numel() * raw.element_size(), scratch)
    host.copy_(raw.view(torch.uint8), non_blocking=True)
    *sums, top = torch.stack(stats).tolist()  # waits for this chunk's work, the copy of `raw` too
    sa = sums[0] if anchor is not None else 0.0
    sd = sums[-1] if live else 0.0
    span = out[lo:hi]
    span.view(torch.uint8).copy_(host)
    if top <= largest:  # a NaN fails the test too
        return sd, sa, 0, 0
    if math.isnan(top) and out.dtype != torch.float8_e4m3fn and out.dtype != torch.float8_e5m2:
        _fix_nans(span, torch.isnan(acc).nonzero().flatten().cpu().numpy(), anchor, live, lo)
    anchors = anchor[lo:hi] if anchor is not None else None
    parts = [(scale, a[lo:lo + p], None if b is None else b[lo:lo + p], p) for scale, a, b, p in live]
    return (sd, sa, *_count_nonfinite(span, anchors, parts))


def _host_buffer(key, nbytes: int, scratch: Scratch) -> torch.Tensor:
    """The first `nbytes` of a reused host buffer (pinned when CUDA is there)."""
    buf = scratch.staging.get(("host", key))
    if buf is None:
        pin = scratch.acc.device.type == "cuda"
        buf = scratch.staging[("host", key)] = torch.empty(scratch.chunk * WIDEST, dtype=torch.uint8, pin_memory=pin)
    return buf[:nbytes]


def _to_device(src: torch.Tensor, key, scratch: Scratch) -> torch.Tensor:
    """src's raw bits in a reused device buffer, as a tensor of src's type: host buffer, then device.
    A tensor on a GPU already (a float32 array of the kernel's) is used as it is."""
    if src.device.type != "cpu":
        return src
    nbytes = src.numel() * src.element_size()
    host = _host_buffer(key, nbytes, scratch)
    copied = scratch.staging.get(("copied", key))
    if copied is not None:
        copied.synchronize()  # the last copy out of this host buffer has ended: it may be refilled
    host.copy_(src.view(torch.uint8))
    if scratch.acc.device.type == "cpu":  # the host buffer is the device buffer
        return host.view(src.dtype)
    dev = scratch.staging.get(("device", key))
    if dev is None:
        dev = scratch.staging[("device", key)] = torch.empty(scratch.chunk * WIDEST, dtype=torch.uint8,
                                                             device=scratch.acc.device)
    dev = dev[:nbytes]
    dev.copy_(host, non_blocking=True)
    if copied is None:
        copied = scratch.staging[("copied", key)] = torch.cuda.Event()
    copied.record()
    return dev.view(src.dtype)


def _widen(dst: torch.Tensor, src: torch.Tensor, scratch: Scratch) -> None:
    """dst (float32) = src, on the device, exactly (rounded once for F64)."""
    if src.dtype == torch.bfloat16:  # its bits are the high half of a float32's
        bits = dst.view(torch.int32)
        bits.copy_(src.view(torch.int16))
        bits.bitwise_left_shift_(16)
    elif src.dtype == torch.float16:
        index = scratch.work[:src.numel()]
        index.copy_(src.view(torch.int16))
        index.bitwise_and_(0xFFFF)
        torch.index_select(scratch.staging["f16"], 0, index, out=dst)
    else:
        dst.copy_(src)


def _narrow(acc: torch.Tensor, dtype: torch.dtype, scratch: Scratch) -> torch.Tensor:
    """acc rounded half to even to `dtype`, in a device buffer. NaNs are `_fix_nans`'s."""
    m = acc.numel()
    raw = scratch.staging.get("out")
    if raw is None:
        raw = scratch.staging["out"] = torch.empty(scratch.chunk * WIDEST, dtype=torch.uint8, device=acc.device)
    raw = raw[:m * dtype.itemsize].view(dtype)
    if dtype == torch.bfloat16:  # add 0x7FFF, plus one when the kept half is odd, then keep the high half
        bits, tmp = acc.view(torch.int32), scratch.work[:m]
        torch.bitwise_right_shift(bits, 16, out=tmp)
        tmp.bitwise_and_(1)
        tmp.add_(bits)
        tmp.add_(0x7FFF)
        tmp.bitwise_right_shift_(16)  # arithmetic: the low 16 bits are the logical shift's
        raw.view(torch.int16).copy_(tmp)  # keeps the low 16 bits
    else:
        raw.copy_(acc)
    return raw


def _fix_nans(out: torch.Tensor, nans: np.ndarray, anchor: torch.Tensor | None, live: list, lo: int) -> None:
    """Give the NaNs of out (a host tensor), at the sorted indices `nans`, `kernel.nan_rule`'s bits."""
    if nans.size == 0:
        return
    at = lo + nans
    terms = []
    for scale, a, b, p in live:
        k = int(np.searchsorted(nans, p))  # the NaNs inside the term's prefix: the first k
        terms.append((scale, _host_widened(a, at[:k]), None if b is None else _host_widened(b, at[:k]), k))
    acc = nan_rule(None if anchor is None else _host_widened(anchor, at), terms, nans.size)
    bits = out.view(BITS[out.element_size()]).numpy().view(f"u{out.element_size()}")
    bits[nans] = nan_bits(acc, NAMES[out.dtype])


def _host_widened(t: torch.Tensor, at: np.ndarray | slice | None = None) -> np.ndarray:
    """The float32 values of a host tensor's elements (all, or those `at`), widened exactly as the
    device widens them (F16 NaNs keep their bits: torch's own conversion would not, at a tail).
    A tensor on a GPU (a float32 array of the kernel's) sends those elements over first."""
    if t.device.type != "cpu":
        t = (t if at is None else t[at if isinstance(at, slice) else torch.from_numpy(at).to(t.device)]).cpu()
        at = None
    name = NAMES[t.dtype]
    if name in NUMPY_DTYPES:
        bits = t.view(BITS[t.element_size()]).numpy().view(NUMPY_DTYPES[name])
        with np.errstate(all="ignore"):  # an F64 NaN, or a value past float32's range, narrows as it should
            return widened(bits if at is None else bits[at])
    return (t if at is None else t[at if isinstance(at, slice) else torch.from_numpy(at)]).float().numpy()  # FP8: exact


def _count_nonfinite(out: torch.Tensor, anchor: torch.Tensor | None, live: list) -> tuple[int, int]:
    """(non-finite outputs, those whose inputs covering them are all finite), element by element, on the host."""
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
    widening it to float32 is exact). On the host: a float32 array of the kernel's comes over."""
    t = t.cpu()
    return torch.isfinite(t.float() if t.dtype.itemsize == 1 else t)
