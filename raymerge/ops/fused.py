"""Chains of elementwise steps run as one compiled loop (docs/ARCHITECTURE.md: native loops).

A method's rule is a chain of kernel primitives over a chunk's rows (widen, subtract, round to the
compute dtype, divide, ...), each a pass of numpy over the chunk (256K elements). `fused(kernel)`
hands out a kernel that records those steps instead and runs them at the end of the `with` block
(or before any other primitive is called) as one program of `run_program` (raymerge/ops/_native.c):
every step over a block of 512 elements, then the next block, so the values stay in a core's L1
cache between steps. Each step is elementwise and rounds as numpy's ufunc does, so the order of blocks and steps
changes no bit. A step it cannot record (another type, a float64 scalar, no compiled loops) runs at
once as the kernel's own, after the steps recorded before it; a program whose arrays overlap in
part (which the blocks' order would change) runs one step at a time.

Inside the block, arrays are read and written through the kernel only: `to_host` (and every other
primitive) runs what was recorded first, but a value read straight from an array's memory between
two recorded steps would be stale.

A program also sums (`Program.sum`): the exact sum of x * y over narrow values (ops.exact.dot_sum),
block by block as its other steps, into an accumulator (ops.exact.Lanes) that the programs of a
piece's chunks share: a row that is only summed is never written to memory and read again. And it
writes the BF16 halves of a value a pass keeps (`Program.halves`, for steps.keep): the value's float32
row need not be written to memory either.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import numpy as np

from raymerge.ops import exact, native
from raymerge.ops.numpy_kernel import NumpyKernel

# run_program's operations (raymerge/ops/_native.c)
_WIDEN_BF16, _COPY, _ADD, _SUBTRACT, _MULTIPLY, _DIVIDE, _ROUND_BF16, _GREATER, _GREATER_EQUAL, _EQUAL, _SUM, \
    _HALVES = range(12)
_NAMES = {_ADD: "add", _SUBTRACT: "subtract", _MULTIPLY: "multiply", _DIVIDE: "divide", _GREATER: "greater",
          _GREATER_EQUAL: "greater_equal", _EQUAL: "equal"}
_ARITHMETIC = (_ADD, _SUBTRACT, _MULTIPLY, _DIVIDE)
_ROUNDED = 0x100  # on an arithmetic step: its result rounded to BF16 in the same loop (a round_to folded in)
_RAN, _RAN_LOW_SET = 1, 2  # run_program's results: it ran; it ran, and a halves step met a low half set
_MAX_ARRAYS, _MAX_STEPS = 32, 256


@contextlib.contextmanager
def fused(kernel: Any) -> Iterator[Any]:
    """A kernel whose elementwise steps inside the block run as one compiled loop at its end (the
    kernel itself where that loop was not built, or for any kernel but numpy's)."""
    if native.loops is None or type(kernel) is not NumpyKernel:  # EXACT's NaN rule is its own
        yield kernel
        return
    program = Program(kernel)
    yield program
    program.flush(last=True)
    program.closed = True  # a step recorded now would never run: `halves` refuses


def _binary(op: int, name: str):
    """Program's `name(x, y, out)`: recorded, or the kernel's own at once."""
    def step(self: Program, x: Any, y: Any, out: np.ndarray) -> None:
        if not self._record(op, out, x, y):
            self.flush()
            getattr(self.kernel, name)(x, y, out)
    step.__name__ = name
    return step


class Program:
    """The recording kernel `fused` hands out: the steps it can run compiled, recorded; any other
    attribute is the kernel's own, reached after the recorded steps have run."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.closed = False
        self._runs = 0
        self._discarded: list[tuple[int, int]] = []  # memory spans (`discard`)
        self._kept: list[tuple[int, int]] = []
        self._reset()

    def discard(self, *tables: np.ndarray, keep: tuple[np.ndarray, ...] = ()) -> None:
        """The values the block's steps write into `tables` (arrays, each a region of memory) are
        not read after the block, but for those in `keep`: the program's last run keeps them in
        a core's cache, block by block, and writes them nowhere (the tables hold stale values)."""
        self._discarded += [_span(t) for t in tables if t.flags.c_contiguous]  # else: not spanned, kept
        self._kept += [_span(t) for t in keep]

    def _dead(self) -> bytes:
        """run_program's flags: the arrays inside a discarded table that overlap no kept array."""
        spans = [_span(x) for x in self._arrays]
        return bytes(any(t[0] <= s[0] and s[1] <= t[1] for t in self._discarded)
                     and not any(s[0] < k[1] and k[0] < s[1] for k in self._kept) for s in spans)

    def _reset(self) -> None:
        self._code: list[tuple[int, int, int, int]] = []
        self._arrays: list[np.ndarray] = []
        self._at: dict = {}  # id of an array object recorded, and its memory span and type -> its index
        self._views: list[np.ndarray] = []  # other objects over an array's memory, by id in `_at`
        self._scalars: list[np.float32] = []
        self._lanes: exact.Lanes | None = None  # what the program's sum steps add to
        self._on_low: list[Callable[[], None]] = []  # `halves`' calls for a value no BF16 holds
        self._length = -1
        self._runs += 1  # a new program: the operand indices taken before are void

    def flush(self, last: bool = False) -> None:
        """Run the recorded steps, in order; a new program from here (operands taken for a step
        that was not recorded are dropped with it). `last`: the block's end, after which what was
        discarded is read no more (before it, a later step of the block may read it)."""
        code, arrays, scalars, lanes, on_low = self._code, self._arrays, self._scalars, self._lanes, self._on_low
        dead = self._dead() if last and self._discarded and code else None
        if code or arrays or scalars:
            self._reset()
        if not code:
            return
        ran = native.loops.run_program(np.array(code, np.int32), arrays, np.array(scalars, np.float32), dead,
                                       None if lanes is None else lanes.lanes)
        if not ran:  # arrays overlapping in part: nothing ran
            ran = self._one_at_a_time(code, arrays, scalars, lanes)
        if ran == _RAN_LOW_SET:
            for call in on_low:
                call()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        self.flush()
        return getattr(self.kernel, name)

    def table(self, scratch: Any, key: str, rows: int, bits: bool = False) -> np.ndarray:
        return self.kernel.table(scratch, key, rows, bits)  # buffers, nothing read

    def widen(self, dst: np.ndarray, src: np.ndarray, scratch: Any) -> None:
        if src.dtype == np.uint16 and self._record(_WIDEN_BF16, dst, src, 0, src=np.uint16):
            return
        if src.dtype == np.float32 and self._record(_COPY, dst, src, 0):
            return
        self.flush()
        self.kernel.widen(dst, src, scratch)

    def copy(self, out: np.ndarray, x: np.ndarray) -> None:
        if not self._record(_COPY, out, x, 0):
            self.flush()
            self.kernel.copy(out, x)

    def fill(self, out: np.ndarray, value: float) -> None:
        if not self._record(_COPY, out, value, 0):  # a scalar copied to every element
            self.flush()
            self.kernel.fill(out, value)

    def round_to(self, x: np.ndarray, dtype: str) -> None:
        if dtype == "BF16" and self._fold_round(x):
            return
        if not (dtype == "BF16" and self._record(_ROUND_BF16, x, x, 0)):
            self.flush()
            self.kernel.round_to(x, dtype)

    def _fold_round(self, x: Any) -> bool:
        """Whether rounding x to BF16 is folded into the last step recorded: an arithmetic step
        whose result is x (the very next step: nothing read x between them)."""
        if not self._code or not isinstance(x, np.ndarray):
            return False
        op, d, a, b = self._code[-1]
        if op & ~_ROUNDED not in _ARITHMETIC:
            return False
        out = self._arrays[d]
        if out is not x and not (x.dtype == np.float32 and x.ndim == 1 and x.flags.c_contiguous and
                                 x.flags.writeable and _span(x) == _span(out)):
            return False  # another array: recorded (or refused) as a step of its own
        self._code[-1] = (op | _ROUNDED, d, a, b)
        return True

    def halves(self, out: np.ndarray, x: np.ndarray, on_low: Callable[[], None]) -> bool:
        """Records out (uint16) = the high halves of x's float32s (BF16 values kept in 2 bytes each,
        as steps.keep keeps them), to run with the program; `on_low()` is called once it has run
        if a value a halves step of the program wrote had a low half set (no BF16 holds it: it was
        lost; run_program tells no more than that). False where it cannot be recorded (nothing is
        then)."""
        if self.closed or out.size and not self._record(_HALVES, out, x, 0, dst=np.uint16):
            return False
        self._on_low.append(on_low)
        return True

    def sum(self, x: np.ndarray, y: Any, lanes: exact.Lanes, j: int) -> None:
        """Adds the exact sum of x * y (y: an array, or a number such as 1), both of narrow values (at
        most 12 significant bits: exact.dot_sum's `narrow`), to sum j of `lanes`: block by block in
        the program where the step can be recorded, else now."""
        if x.size == 0:
            return
        if len(self._code) >= _MAX_STEPS or (self._lanes is not None and self._lanes is not lanes) or \
                not lanes.takes(j, x.size):
            self.flush()  # one accumulator a program, each of its bucket sums exact
            lanes.settle()
        got = self._take((x, np.float32, False), (y, np.float32, False))
        if got is None or got[0] < 0:  # x no array: summed now
            self.flush()
            lanes.add(j, exact.dot_sum(x, y, narrow=True))
            return
        self._code.append((_SUM, j, *got))
        self._lanes = lanes
        lanes.added(j, x.size)

    add, subtract, multiply, divide = (_binary(op, _NAMES[op]) for op in (_ADD, _SUBTRACT, _MULTIPLY, _DIVIDE))
    greater, greater_equal, equal = (_binary(op, _NAMES[op]) for op in (_GREATER, _GREATER_EQUAL, _EQUAL))

    def _record(self, op: int, out: np.ndarray, x: Any, y: Any, src: type = np.float32,
                dst: type = np.float32) -> bool:
        """Whether the step was recorded (else nothing was: the caller runs it at once). Where taking
        an operand ran the program so far (`flush`), the operands are taken again in the new one."""
        if isinstance(out, np.ndarray) and out.size == 0:
            return True  # a step over no element does nothing
        binary = op not in (_WIDEN_BF16, _COPY, _ROUND_BF16, _HALVES)
        if binary and not (isinstance(x, np.ndarray) or isinstance(y, np.ndarray)):
            self.flush()  # two numbers: numpy computes them in float64 (or int64), then rounds once
            return False
        if len(self._code) >= _MAX_STEPS:
            self.flush()
        got = self._take((out, dst, True), (x, src, False), *([(y, np.float32, False)] if binary else []))
        if got is None:
            return False
        d, a, b = got if binary else (*got, 0)
        self._code.append((op, d, a, b))
        return True

    def _take(self, *wanted: tuple[Any, type, bool]) -> list[int] | None:
        """The operand indices of each (x, dtype, write), all in one program: taken again where
        taking one ran the program so far (`flush`: the indices taken before are void); None where
        one cannot be an operand."""
        for _ in range(2):
            runs = self._runs
            got = [self._operand(x, dtype, write) for x, dtype, write in wanted]
            if any(i is None for i in got):
                return None
            if runs == self._runs:
                return got
        return None

    def _operand(self, x: Any, dtype: type, write: bool = False) -> int | None:
        """x's operand index: an array's (>= 0) or a scalar's (-1 - k); None where x cannot be one
        (the steps recorded so far then run, so that x's step runs after them)."""
        if isinstance(x, np.ndarray):
            return self._array(x, dtype, write)
        if type(x) in (np.float32, float, int) and not write and dtype is np.float32:
            # numpy takes a Python number as float32 beside a float32 array (NEP 50): the same value
            self._scalars.append(np.float32(x))
            return -len(self._scalars)
        self.flush()
        return None

    def _array(self, x: np.ndarray, dtype: type, write: bool) -> int | None:
        got = self._at.get(id(x))
        if got is not None and self._arrays[got] is x:
            return got
        if x.dtype != dtype or x.ndim != 1 or not (x.flags.c_contiguous and x.flags.aligned) or \
                (write and not x.flags.writeable):
            self.flush()
            return None
        where = (_span(x), x.dtype.char)  # another view of an array taken already is that array
        got = self._at.get(where)
        if got is not None:
            if write and not self._arrays[got].flags.writeable:
                self._views.append(self._arrays[got])
                self._arrays[got] = x  # the program writes it: through this (writable) view
            self._at[id(x)] = got
            self._views.append(x)  # alive while its id is a key
            return got
        if self._length not in (-1, x.size) or len(self._arrays) >= _MAX_ARRAYS:
            self.flush()
        self._length = x.size
        self._at[id(x)] = self._at[where] = len(self._arrays)
        self._arrays.append(x)
        return len(self._arrays) - 1

    def _one_at_a_time(self, code: list, arrays: list, scalars: list, lanes: exact.Lanes | None) -> int:
        """The recorded steps, each as the kernel's own primitive, in order; run_program's result."""
        k, ran = self.kernel, _RAN
        for code_op, d, a, b in code:
            op = code_op & ~_ROUNDED
            x, y = (arrays[i] if i >= 0 else scalars[-1 - i] for i in (a, b))
            if op == _SUM:
                lanes.add(d, exact.dot_sum(x, y, narrow=True))
                continue
            out = arrays[d]
            if op == _HALVES:  # the compiled bf16_halves: False where a low half was set
                ran = _RAN if native.loops.bf16_halves(x, out) and ran == _RAN else _RAN_LOW_SET
                continue
            if op == _WIDEN_BF16:
                k.widen(out, x, None)
            elif op == _COPY:
                k.copy(out, x) if a >= 0 else k.fill(out, x)
            elif op == _ROUND_BF16:
                k.round_to(out, "BF16")
            else:
                getattr(k, _NAMES[op])(x, y, out)
            if code_op & _ROUNDED:
                k.round_to(out, "BF16")
        return ran


def _span(x: np.ndarray) -> tuple[int, int]:
    """The memory an array lies in, [its first byte, past its last): a C-contiguous one's exactly,
    any other's at most (a kept array's span may be wider than its elements, never narrower)."""
    if native.loops is not None:
        try:
            return native.loops.span(x)  # a C-contiguous array's, compiled
        except ValueError:
            pass
    lo = x.__array_interface__["data"][0]
    if x.flags.c_contiguous:
        return lo, lo + x.nbytes
    ends = [lo + (n - 1) * st for n, st in zip(x.shape, x.strides) if n]
    return min([lo, *ends]), max([lo, *ends]) + x.itemsize


def discard(kernel: Any, *tables: np.ndarray, keep: tuple[np.ndarray, ...] = ()) -> None:
    """`Program.discard` where kernel is `fused`'s recording kernel; nothing for any other kernel
    (whose steps have written their values already)."""
    if isinstance(kernel, Program):
        kernel.discard(*tables, keep=keep)
