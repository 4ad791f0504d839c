"""Steps the methods that compute with the kernel's array primitives share: chunks of a piece
widened into a thread's table rows, exact sums on the host (ops.exact), the facts of a tensor's
statistics summed over its pieces, and NaNs given the kernels' one rule.

The geometric methods (slerp, nuslerp, multislerp, model_stock) reduce a whole tensor
(norms, dot products) in statistics passes: each piece sums its products exactly (`exact_sum`, or
`add_sum` inside a fused program's blocks), the driver adds the pieces' sums (`total`) and
rounds once. So the facts do not depend on how a
tensor is cut, and a worker holds one chunk of each operand at a time.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from raymerge.methods import torch_process
from raymerge.ops import native
from raymerge.ops.exact import ExactSum, Lanes, dot_sum
from raymerge.ops.fused import Program, discard, fused
from raymerge.ops.kernel import Sums
from raymerge.ops.numpy_kernel import EXACT

if TYPE_CHECKING:
    from raymerge.methods.base import Operands

_ROWS = "elementwise-rows"


def chunks(n: int, scratch: Any) -> Iterator[tuple[int, int]]:
    """(lo, m): the chunks of n elements a thread's scratch holds, in order."""
    c = scratch.chunk
    with np.errstate(all="ignore"):  # numpy's warnings: overflows and NaNs are data here
        for lo in range(0, n, c):
            yield lo, min(c, n - lo)


def widen_rows(kernel: Any, scratch: Any, key: str, arrays: list, lo: int, m: int, spare: int = 0) -> list:
    """Elements lo .. lo + m of each input array (`view`s), widened into the rows of a float32
    table of the thread's (`key`), then `spare` rows more (their contents left from earlier use):
    valid until the next call with the same key."""
    rows = kernel.table(scratch, key, max(1, len(arrays) + spare))
    for i, a in enumerate(arrays):
        kernel.widen(rows[i, :m], a[lo:lo + m], scratch)
    return [rows[i, :m] for i in range(len(arrays) + spare)]


def exact_sum(kernel: Any, x: Any, scratch: Any, square: bool = False, narrow: bool = False,
              times: Any = None) -> ExactSum:
    """sum x (or sum x * x, or sum x * times), exactly, of float32 arrays of the kernel's: the
    products are exact here (a method that sums rounded products makes them with kernel.multiply
    first). `narrow`: x (and times) hold BF16 or F16 values (an input of those types, or a value
    rounded to the compute dtype): summed faster (ops.exact)."""
    other = np.float32(1.0)
    if times is not None:
        other = kernel.to_host(times, scratch)
        if not isinstance(times, np.ndarray):
            other = other.copy()  # a device's host buffer: the next to_host reuses it
    hx = kernel.to_host(x, scratch)
    return dot_sum(hx, hx if square else other, _host_work(scratch), narrow)


def add_sum(kernel: Any, lanes: Lanes, j: int, x: Any, scratch: Any, square: bool = False, narrow: bool = False,
            times: Any = None) -> None:
    """exact_sum, added to sum j of `lanes` (read once every chunk is in: `Lanes.sums`): where
    kernel is `fused`'s and the values narrow, by the block's program, block by block, so that x
    need not be kept for it (`discard`); else now."""
    if isinstance(kernel, Program) and narrow:
        kernel.sum(x, x if square else np.float32(1) if times is None else times, lanes, j)
    else:
        lanes.add(j, exact_sum(kernel, x, scratch, square, narrow, times))


def is_narrow(array: Any) -> bool:
    """Whether an input array (a kernel's `view`) holds values of at most 12 significant bits:
    BF16, F16 or FP8."""
    size = getattr(array, "itemsize", None)
    return (size if size is not None else array.element_size()) <= 2


def total(results: list[tuple[int, list]], term: int, index: int) -> ExactSum:
    """The sum over every piece's result of one term's `index`-th ExactSum (as `to_json` wrote it)."""
    s = ExactSum()
    for _, r in results:
        if term < len(r) and r[term] is not None:
            s += ExactSum.from_json(r[term][index])
    return s


def quiet(fn: Callable) -> Callable:
    """fn without numpy's warnings: overflows and NaNs are data here."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)
    return wrapped


def facts_problem(facts: Any, terms: int, wanted: dict[str, int]) -> str | None:
    """Why a geometric method's facts (read back from a journal or a manifest) are not what its
    `reduce` records, or None: one entry per term, the first an object holding each `wanted` fact as
    a list of that many float32 bit patterns (0: one bit pattern, not a list)."""
    if not (isinstance(facts, list) and len(facts) == terms and isinstance(facts[0], dict)):
        return "expected a list, one entry per vector, the first an object"

    def is_bits(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32

    def all_bits(x: list) -> bool:  # every one is_bits, in C-level passes (a row-wise fact has millions)
        return not x or (set(map(type, x)) == {int} and min(x) >= 0 and max(x) < 2**32)

    for k, n in wanted.items():
        x = facts[0].get(k)
        if not (is_bits(x) if n == 0 else isinstance(x, list) and len(x) == n and all_bits(x)):
            return f"vector 1's {k}: expected {'a float32 bit pattern' if n == 0 else f'{n} float32 bit patterns'}"
    return None


def in_torch(fn: Callable, *args: Any) -> Any:
    """fn(*args), a module-level function that computes mergekit's scalars with torch (its acos, sin
    and cos give mergekit's bits; numpy's can differ): in the torch process (methods.torch_process)
    where this process is a Ray driver, so that the driver never imports torch (470 MiB); here
    otherwise (tests)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return torch_process.call(fn, *args)
    return fn(*args)


def warm_torch() -> None:
    """Start `in_torch`'s process, which imports torch while a run's workers start: not waited for."""
    torch_process.start()


def step(op: Callable, x: Any, y: Any, out: Any) -> Any:
    """op(x, y, out) (a kernel primitive), returning out: steps chain in one line."""
    op(x, y, out)
    return out


def bits(x: Any) -> int:
    """A float32 as the fact that records it: its bits."""
    return int(np.float32(x).view(np.uint32))


def tensor_bits(t: Any) -> list[int]:
    """Each value of a torch tensor, as float32 bits (`bits`), flattened: in one numpy step, not one
    Python call per value (a row-by-row method has a fact per row, hundreds of thousands)."""
    return t.float().reshape(-1).numpy().view(np.uint32).tolist()


def value(fact: int) -> np.float32:
    return np.uint32(fact).view(np.float32)


def keep(kernel: Any, operands: Operands, scratch: Any, name: str, x: Any, at: int, n: int) -> None:
    """Keep chunk x (float32, elements at.. of the n a pass works on) for the item's next pass, as
    `name` (docs/ARCHITECTURE.md: values kept between passes); nothing where the pass keeps nothing.
    Values of BF16 are kept as their high halves, 2 bytes each, until a chunk holds another value
    (a NaN's payload): from then on, the whole array as float32. Given a `fused` kernel, the halves
    are a step of its program (x need not be written to memory: see `discard`), and a chunk with
    another value makes the piece keep nothing of `name` (None: the next passes compute it again)."""
    if operands.keep is None:
        return
    if name in operands.keep and operands.keep[name] is None:  # given up (a fused chunk's value no BF16 holds)
        return
    store = operands.keep.get(name)
    if store is None:
        store = operands.keep[name] = np.empty(n, np.uint16 if operands.compute == "BF16" else np.float32)
    if isinstance(kernel, Program) and store.dtype == np.uint16 and \
            kernel.halves(store[at:at + len(x)], x, lambda: operands.keep.__setitem__(name, None)):
        return
    host = kernel.to_host(x, scratch)  # a GPU's is a reused buffer: copied at once
    if store.dtype == np.uint16:
        if _halves(host, store[at:at + len(host)]):
            return
        store = operands.keep[name] = _widened_halves(store, np.empty(n, np.float32))
    store[at:at + len(host)] = host


def carried(kernel: Any, operands: Operands, name: str, out: Any, at: int, m: int) -> bool:
    """out = the values an earlier pass kept as `name` (`keep`), elements at .. at + m; False, out
    untouched, where none were carried."""
    store = (operands.carried or {}).get(name)
    if store is None:
        return False
    chunk = store[at:at + m]
    if isinstance(kernel, Program):
        if chunk.dtype == np.uint16:
            kernel.widen(out, chunk, None)  # a step of the program: widened block by block, in L1
            return True
        kernel.flush()  # out is written below, not through the kernel: what was recorded runs first
    if chunk.dtype == np.uint16:
        if isinstance(out, np.ndarray):
            _widened_halves(chunk, out)
            return True
        chunk = _widened_halves(chunk, np.empty(m, np.float32))
    kernel.from_host(out, chunk if chunk.flags.writeable else chunk.copy())  # torch takes no read-only array
    return True


def _halves(x: np.ndarray, out: np.ndarray) -> bool:
    """out (uint16) = the high halves of float32 x; whether x holds BF16 values alone (every low
    half 0: out then holds them whole). Compiled where raymerge/ops/_native.c was built."""
    if native.takes(x, np.float32) and native.takes(out, np.uint16):
        return native.loops.bf16_halves(x, out)
    halves = x.view(np.uint16)
    if halves[_LOW::2].any():
        return False
    out[:] = halves[_HIGH::2]
    return True


def _widened_halves(halves: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (float32) = the BF16 values whose high halves are `halves`."""
    if native.takes(halves, np.uint16) and native.takes(out, np.float32):
        native.loops.bf16_widen(halves, out)
        return out
    words = out.view(np.uint16)
    words[_LOW::2] = 0
    words[_HIGH::2] = halves
    return out


# where a float32's halves lie among its two uint16s
_LOW, _HIGH = (0, 1) if sys.byteorder == "little" else (1, 0)


def replay_nans(kernel: Any, result: Any, scratch: Any, inputs: list, lo: int,
                rule: Callable[..., Any], indexed: bool = False) -> None:
    """Give the NaNs of `result` (float32, the chunk at element lo of the inputs) the bits the
    kernels' NaN rule gives (ops/kernel.py: NaN bits): `rule(kernel, widened inputs)` computed again
    over those elements alone with numpy_kernel.EXACT (`indexed`: `rule(kernel, inputs, at)`, with
    their indices in the chunk). Hardware picks among NaN operands otherwise."""
    at = np.flatnonzero(np.isnan(kernel.to_host(result, scratch)))
    if at.size:
        inputs = [kernel.gather(a, lo + at) for a in inputs]
        kernel.put(result, at, rule(EXACT, inputs, at) if indexed else rule(EXACT, inputs))


def each_chunk(kernel: Any, out: Any, operands: Operands, scratch: Any, rule: Callable, inputs: int) -> Sums:
    """out = rule(kernel, *operands, work), chunk by chunk: the vector's b and a (or its a alone:
    `inputs`), widened, and a work row; rounded once to out. NaNs are replayed with the kernels' rule;
    elements past the vector's rows are the anchor's (`past_rows`). The change the stats count is the whole
    result, as linear's is."""
    v = operands.vectors[0] if operands.vectors else None
    arrays = [v.b, v.a][-inputs:] if v is not None else []
    n = min(len(v.a), len(out)) if v is not None else 0
    sums = past_rows(kernel, out, operands, scratch, n)
    for lo, m in chunks(n, scratch):
        with fused(kernel) as k:
            widened = widen_rows(k, scratch, _ROWS, arrays, lo, m, spare=1)
            result = rule(k, *widened)
            discard(k, *widened, keep=(result,))  # read after it: the result alone (a NaN replay widens again)
        replay_nans(kernel, result, scratch, arrays, lo,
                    lambda k, xs: rule(k, *xs, np.empty(len(xs[0]), np.float32)))
        sums = counted(sums, kernel.weighted_sum(out[lo:lo + m], result, [], scratch))  # rounded once to out
    return sums


def row_length(shape: tuple[int, ...]) -> int:
    """The elements of a tensor's row: its last dimension (a 1-D tensor is one row)."""
    return shape[-1] if len(shape) > 1 else math.prod(shape)


def vector_length(operands: Operands) -> int:
    """How many elements of the piece every vector covers (fewer than the piece where the vectors
    cover the tensor's first rows only: an expanded vocabulary); 0 without vectors."""
    return min((len(v.a) for v in operands.vectors), default=0)


def apply_chunks(kernel: Any, out: Any, operands: Operands, scratch: Any, inputs: list,
                 rule: Callable[..., Any]) -> Sums:
    """out[:n] = rule(kernel, at, m, given) chunk by chunk (n: `length`; `given`: () to read the
    inputs from the operands, or their elements already widened, a NaN replay's), the NaNs given
    the kernels' rule over `inputs`, rounded once to out; past n, the anchor's rows (`past_rows`).
    The stats count the whole result as the change."""
    n = vector_length(operands)
    sums = past_rows(kernel, out, operands, scratch, n)
    for at, m in chunks(n, scratch):
        with fused(kernel) as k:
            result = rule(k, at, m, ())
        replay_nans(kernel, result, scratch, inputs, at, lambda k, xs: rule(k, at, m, tuple(xs)))
        sums = counted(sums, kernel.weighted_sum(out[at:at + m], result, [], scratch))
    return sums


def counted(total: Sums, s: Sums) -> Sums:
    """total plus the Sums of a chunk whose whole result is the change the stats count (as linear's:
    `weighted_sum` of the result as an anchor counts it as the anchor's)."""
    return Sums(*(x + y for x, y in zip(total, s._replace(ss_delta=s.ss_anchor, ss_anchor=0.0))))


def past_rows(kernel: Any, out: Any, operands: Operands, scratch: Any, n: int) -> Sums:
    """out[n:], past the vectors' rows (an expanded vocabulary): the anchor's, as they are (zeros
    without one); no Sums where there is nothing past them."""
    if n >= len(out):
        return Sums(0.0, 0.0, 0, 0)
    return kernel.weighted_sum(out[n:], operands.anchor[n:] if operands.anchor is not None else None, [], scratch)


def apply_rows(kernel: Any, out: Any, operands: Operands, scratch: Any, inputs: list, n: int, length: int,
               rows: tuple[np.ndarray, ...], key: str, rule: Callable) -> Sums:
    """out[:n] = rule(kernel, *inputs widened, coef=...), chunk by chunk, where `coef` holds each of
    `rows` (per-vector values, one per row of `length` elements) at the chunk's elements (`per_row`);
    NaNs replayed with the kernels' rule and their rows' values; rounded once to out; past n, the
    anchor's rows (`past_rows`). The stats count the whole result as the change."""
    total = past_rows(kernel, out, operands, scratch, n)
    for at, m in chunks(n, scratch):
        begin = operands.begin + at
        coef = tuple(per_row(kernel, scratch, f"{key}-{i}", begin, m, length, r) for i, r in enumerate(rows))
        with fused(kernel) as k:  # the rule's steps, one compiled loop where they can be
            widened = widen_rows(k, scratch, key, inputs, at, m)
            result = rule(k, *widened, coef=coef)
            discard(k, *widened, keep=(result,))  # read after it: the result alone (a NaN replay widens again)
        replay_nans(kernel, result, scratch, inputs, at, lambda k, xs, idx: rule(
            k, *xs, coef=tuple(r[(begin + idx) // length] for r in rows)), indexed=True)
        total = counted(total, kernel.weighted_sum(out[at:at + m], result, [], scratch))
    return total


def torch_dtype(compute: str | None) -> Any:
    """The torch dtype mergekit computes in: float32, or the compute dtype (in `in_torch`'s functions)."""
    from raymerge.ops.torch_kernel import TORCH_DTYPES

    return TORCH_DTYPES[compute or "F32"]


def per_row(kernel: Any, scratch: Any, key: str, begin: int, m: int, length: int, values: np.ndarray) -> Any:
    """A per-vector (row) value over the m elements from the tensor's element `begin` on: a float32
    scalar where they lie in one row, else an array of the kernel's (a row of its table `key`)."""
    first, last = begin // length, (begin + m - 1) // length
    if first == last:
        return values[first]
    row = kernel.table(scratch, key, 1)[0, :m]
    if isinstance(row, np.ndarray):  # the host's table: each row's value broadcast into it, in one pass
        head = (first + 1) * length - begin  # the first row's elements here
        whole = (m - head) // length  # the rows after it that lie here whole
        row[:head] = values[first]
        row[head:head + whole * length].reshape(whole, length)[:] = values[first + 1:first + 1 + whole, None]
        row[head + whole * length:] = values[last]  # the last row's first elements (none: an empty slice)
        return row
    counts = np.minimum(np.arange(first, last + 1) * length + length, begin + m) - \
        np.maximum(np.arange(first, last + 1) * length, begin)
    kernel.from_host(row, np.repeat(values[first:last + 1], counts))
    return row


def host_rows(values: list[int]) -> np.ndarray:
    """Per-row facts (float32 bits) as a float32 array."""
    return np.asarray(values, np.uint32).view(np.float32)


def row_sums(kernel: Any, scratch: Any, begin: int, n: int, length: int, roots: tuple[bool, ...],
             quantities: Callable[[int, int], list], narrow: bool) -> list:
    """A statistics result of several sums per vector (row) of a tensor, for term 0, computed chunk
    by chunk: `quantities(at, m)` gives the float32 arrays to sum (or square and sum: `roots[i]`, a
    norm) over the piece's elements at .. at + m. The rows the piece holds whole are complete, so
    they are rounded here and sent as float32 bits; the partial ones at its ends as exact sums:
    [[first whole row, [bits of each sum, row after row], [[row, [exact sums]] per partial row]]],
    small whatever the rows, with at most two exact sums per piece (`grouped_values` adds them up).
    The bits are one flat list: a list per row made the driver's unpickling of a 2.1M-row trio's
    results 10x slower (a list object each).

    A row the piece holds whole is summed in float64, with a bound on that sum's error
    (`_segment_sums`), so where both ends of the interval round to one float32 (through a square
    root, if a norm), that is the exact sum's rounding; only where they do not (rarely) is the row
    summed again exactly. A row split at the piece's
    ends is summed exactly (ops.exact). So a piece of many rows costs a few passes of numpy."""
    k = len(roots)
    whole0 = -(-begin // length)  # the first row that starts inside the piece
    whole1 = (begin + n) // length  # one past the last row that ends inside it
    count = max(whole1 - whole0, 0)
    sums, bounds = np.zeros((k, count)), np.zeros((k, count))
    settled: dict[tuple[int, int], float] = {}  # (sum, row - whole0) -> rounded exactly, where the bound cannot
    partial: dict[int, list[ExactSum]] = {}
    for at, m in chunks(n, scratch):
        lo = begin + at
        starts = np.unique(np.concatenate([[0], np.arange(-(-lo // length) * length, lo + m, length) - lo]))
        rows = (lo + starts) // length
        ends = np.append(starts[1:], m)
        inside = (rows >= whole0) & (rows < whole1)
        for i, (x, square) in enumerate(zip(quantities(at, m), roots)):
            h = kernel.to_host(x, scratch)
            if inside.any():  # rows the piece holds whole: float64 sums (the rest are exact below)
                got_sums, got_bounds = _segment_sums(h, starts, square, length)
                at_rows = rows[inside] - whole0  # each once: a chunk holds one segment of a row
                before, got = sums[i][at_rows], got_sums[inside]
                sums[i][at_rows] = after = before + got
                added = after - before  # TwoSum: this addition's rounding error, exactly (0 where the row began here)
                bounds[i][at_rows] += got_bounds[inside] + np.abs((before - (after - added)) + (got - added))
                # A row that begins and ends in this chunk is complete: where its bound cannot say,
                # it is summed exactly now, from h, not computed again after the piece.
                complete = inside & (ends - starts == length)
                if complete.any():
                    sure = _certain(got_sums[complete][None], got_bounds[complete][None], (square,))[0]
                    for s, e, r in zip(*(a[complete][np.isnan(sure)] for a in (starts, ends, rows))):
                        settled[(i, int(r) - whole0)] = _rounded(_host_sum(h[s:e], square, scratch, narrow), square)
            for r, s, e in zip(rows[~inside], starts[~inside], ends[~inside]):
                got = _host_sum(h[s:e], square, scratch, narrow)
                partial.setdefault(int(r), [ExactSum()] * k)[i] += got
    whole = _certain(sums, bounds, roots)
    for (i, j), v in settled.items():
        whole[i, j] = v
    for j in np.flatnonzero(np.isnan(whole).any(axis=0)):
        g = whole0 + int(j)  # uncertain: the row again, exactly
        exact = [ExactSum()] * k
        for at in range(g * length - begin, (g + 1) * length - begin, scratch.chunk):
            m = min(scratch.chunk, (g + 1) * length - begin - at)
            for i, (x, square) in enumerate(zip(quantities(at, m), roots)):
                h = kernel.to_host(x, scratch)
                exact[i] += _host_sum(h, square, scratch, narrow)
        whole[:, j] = [_rounded(s, root) for s, root in zip(exact, roots)]
    values = whole.astype(np.float32).view(np.uint32).T.reshape(-1).tolist()  # row after row, each sum's bits
    return [[whole0 if count else None, values, [[g, [s.to_json() for s in v]] for g, v in sorted(partial.items())]]]


def _host_sum(h: np.ndarray, square: bool, scratch: Any, narrow: bool) -> ExactSum:
    """The exact sum of host values h (of their squares: `square`)."""
    return dot_sum(h, h if square else np.float32(1), _host_work(scratch), narrow)


def _rounded(s: ExactSum, root: bool) -> float:
    """An exact sum rounded once to float32 (its square root, where `root`: a norm)."""
    return float(s.sqrt_float32() if root else s.to_float32())


def _segment_sums(h: np.ndarray, starts: np.ndarray, square: bool, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The float64 sums of h's values (squares: `square`, exact in float64) per segment from each of
    `starts` to the next (of at most `length` values), and a bound on each sum's error. Compiled
    where raymerge/ops/_native.c was built: the sum of every addition's exact rounding error, which
    the loop adds up (widened for that sum's own roundings; 0 where every addition was exact);
    numpy's, in its own order: 2 * length * 2**-53 of the sum of the magnitudes, whatever the order."""
    if native.takes(h, np.float32) and native.takes(starts, np.int64):
        out = np.empty((2, starts.size))
        native.loops.segment_sums(h, starts, square, out[0], out[1])
        return out[0], out[1] * (1 + 4 * (length + 4) * 2.0**-53)
    p = np.multiply(h, h, dtype=np.float64) if square else h.astype(np.float64)
    return np.add.reduceat(p, starts), np.add.reduceat(np.abs(p), starts) * (2.0 * length * 2.0**-53)


def _certain(sums: np.ndarray, bounds: np.ndarray, roots: tuple[bool, ...]) -> np.ndarray:
    """Each row's sum rounded to float32 (a root, where `roots`), where the float64 sum's error bound
    proves the rounding; NaN where it does not (or where the sum is NaN: the exact path says which).
    The bound is widened for its own roundings and those of the interval's ends; a bound of 0 says
    the float64 sum is exact: its rounding is the exact sum's."""
    bound = np.where(bounds > 0, bounds * (1 + 2.0**-20) + np.abs(sums) * 2.0**-51, 0.0)
    lo, hi, center = sums - bound, sums + bound, sums.copy()
    with np.errstate(all="ignore"):
        for i, root in enumerate(roots):
            if root:  # a sum of squares: its root, each end widened by the root's own rounding
                lo[i] = np.sqrt(np.maximum(lo[i], 0)) * (1 - 2.0**-52)
                hi[i] = np.sqrt(hi[i]) * (1 + 2.0**-52)
                center[i] = np.sqrt(center[i])
        same = lo.astype(np.float32) == hi.astype(np.float32)  # -0.0 and +0.0 alike: the center says which
        out = center.astype(np.float32).astype(np.float64)
    out[~same] = np.nan
    return out


def grouped_values(results: list[tuple[int, list]], count: int, k: int,
                   finish: Callable[[int, ExactSum], np.float32]) -> np.ndarray:
    """The k rounded sums of each of a tensor's `count` vectors (float32, k rows of `count`), from
    every piece's `row_sums`: a vector is whole in one piece, or split among several (added here)."""
    # A row no piece reports lies past the vectors' limit (an expanded vocabulary): no piece applies
    # it (the anchor's rows are kept there), so any value serves: 0.
    values = np.zeros((k, count), np.float32)
    partial: dict[int, list[ExactSum]] = {}
    for _, r in results:
        if not r or r[0] is None:
            continue
        first, whole, parts = r[0]
        if whole:  # k bits a row, row after row (a list per row, as journals of earlier versions hold, reads alike)
            rows = np.asarray(whole, np.uint32).reshape(-1, k)
            values[:, first:first + len(rows)] = rows.view(np.float32).T
        for g, sums in parts:
            partial[g] = [a + ExactSum.from_json(b) for a, b in zip(partial.get(g, [ExactSum()] * k), sums)]
    for g, sums in partial.items():
        for i, s in enumerate(sums):
            values[i, g] = finish(i, s)
    return values


def _host_work(scratch: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dot_sum's host buffers, a chunk long, kept per thread (fresh pages are slow to touch)."""
    key = ("exact-host", scratch.chunk)
    if key not in scratch.staging:
        c = scratch.chunk
        scratch.staging[key] = (np.empty(c, np.float64), np.empty(c, np.float64), np.empty(c, np.int64))
    return scratch.staging[key]
