"""Check the torch kernel on a device bit for bit against the numpy kernel, then time it.

    python bench/gpu_check.py                  # on the GPU ("cuda")
    python bench/gpu_check.py --device cpu     # the same steps on the CPU (quick; no GPU needed)
    python bench/gpu_check.py --mb 2048        # time over more input bytes

Inputs hold NaNs (several payloads, signalling and quiet, both signs), infinities, subnormals and
the rounding midpoints of BF16 and F16 among normal values; cases cover BF16, F16 and F32 in and
out, no anchor, one and several terms, terms covering a prefix, and a cast (no terms), with the
default chunk and a small odd one. Every output byte and both non-finite counts must be equal.
Then every method in the registry (methods.METHODS), driven as the worker and the driver drive it:
each statistics pass's results per piece reduced into facts, then each piece applied, for each
shape of its recipe kinds, BF16, F16, F32 and F64, its default parameters and others, three
vectors (densities 0, 0.3 and 1; covering the whole anchor, or its first rows), whole and cut into
pieces; the facts must be equal too.

Prints one verdict line, "gpu_check: OK ..." or "gpu_check: MISMATCH ...", and exits 1 on a
mismatch, 2 when the device cannot be used.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from raymerge.errors import InputError  # noqa: E402
from raymerge.methods import METHODS, Operands, Vector  # noqa: E402
from raymerge.ops import kernel  # noqa: E402
from raymerge.ops.numpy_kernel import NUMPY  # noqa: E402
from raymerge.planning.plan import TensorPlan, Term  # noqa: E402

BITS = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32, "F64": np.uint64}
SPECIAL = {  # bit patterns: NaNs (quiet, signalling, payloads, signs), infinities, subnormals, zeros
    "BF16": [0x7FC0, 0xFFC0, 0x7F81, 0xFF81, 0x7FA5, 0x7FFF, 0xFFFF, 0x7F80, 0xFF80, 0x0001, 0x8001, 0x007F,
             0x0000, 0x8000, 0x7F7F, 0xFF7F],
    "F16": [0x7E00, 0xFE00, 0x7C01, 0xFC01, 0x7D55, 0x7FFF, 0xFFFF, 0x7E01, 0x7C00, 0xFC00, 0x0001, 0x8001,
            0x03FF, 0x0000, 0x8000, 0x7BFF, 0xFBFF],
    "F32": [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FA5A5A5, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00001,
            0x7F800000, 0xFF800000, 0x00000001, 0x80000001, 0x007FFFFF, 0x00000000, 0x80000000, 0x7F7FFFFF,
            0x7F7F8000, 0x477FF000, 0xC77FF000],  # the last three: BF16's and F16's overflow midpoints
    "F64": [0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001, 0x7FF4A5A5A5A5A5A5, 0xFFFFFFFFFFFFFFFF,
            0x7FF0000000000000, 0xFFF0000000000000, 0x0000000000000001, 0x36A0000000000000, 0x0000000000000000,
            0x8000000000000000, 0x47EFFFFFF0000000],  # a float32 subnormal; float32's overflow midpoint
}


def values(dtype: str, n: int, rng: np.random.Generator, special: float = 0.05) -> np.ndarray:
    """n raw values of dtype: weight-like normals, with specials (a `special` fraction) and rounding
    midpoints spread among them."""
    x = rng.standard_normal(n).astype(np.float32)
    if dtype == "F32":  # midpoints of BF16 (low half 0x8000) and F16 (13 low bits 0x1000), sometimes
        bits = x.view(np.uint32)
        pick = rng.random(n)
        bits[pick < 0.1] = bits[pick < 0.1] & 0xFFFF0000 | 0x8000
        bits[(pick >= 0.1) & (pick < 0.2)] = bits[(pick >= 0.1) & (pick < 0.2)] & 0xFFFFE000 | 0x1000
    raw = {"F32": lambda: x.view(np.uint32), "F64": lambda: x.astype(np.float64).view(np.uint64),
           "BF16": lambda: (x.view(np.uint32) >> 16).astype(np.uint16),
           "F16": lambda: x.astype(np.float16).view(np.uint16)}[dtype]()
    raw = raw.copy()
    where = rng.random(n) < special
    raw[where] = rng.choice(np.array(SPECIAL[dtype], dtype=BITS[dtype]), int(where.sum()))
    return raw


def cases(n: int, rng: np.random.Generator) -> list[tuple[str, str, str | None, list]]:
    """(name, out dtype, anchor dtype, terms as (scale, a dtype, b dtype, length))."""
    made = []
    for din in ("BF16", "F16", "F32"):
        for dout in ("BF16", "F16", "F32"):
            made += [
                (f"{din}->{dout} cast", dout, din, []),
                (f"{din}->{dout} one term", dout, din, [(0.5, din, din, n)]),
                (f"{din}->{dout} no anchor", dout, None, [(1.0, din, din, n)]),
                (f"{din}->{dout} several terms, prefixes", dout, din,
                 [(0.7, din, din, n), (1.0, din, None, n // 3), (-1.5, "F32", din, n - 1)]),
            ]
    return made


def run(k, chunk: int | None, out_dtype: str, arrays: dict, anchor: str | None, terms: list):
    """The kernel's output bytes and Sums over fresh buffers holding `arrays`."""
    def v(key):
        raw = arrays[key]
        return k.view(memoryview(bytearray(raw.tobytes())), key[0])

    n = arrays["out"]
    out = bytearray(n * np.dtype(BITS[out_dtype]).itemsize)
    a = v((anchor, "anchor")) if anchor else None
    t = [(scale, v((da, "a", j))[:length], v((db, "b", j))[:length] if db else None)
         for j, (scale, da, db, length) in enumerate(terms)]
    sums = k.weighted_sum(k.view(memoryview(out), out_dtype), a, t, k.scratch(chunk))
    return bytes(out), sums


def check(k, n: int, seed: int) -> tuple[int, list[str]]:
    rng = np.random.default_rng(seed)
    bad, count = [], 0
    for name, dout, anchor, terms in cases(n, rng):
        arrays = {"out": n}
        if anchor:
            arrays[(anchor, "anchor")] = values(anchor, n, rng)
        for j, (_s, da, db, _len) in enumerate(terms):
            arrays[(da, "a", j)] = values(da, n, rng)
            if db:
                arrays[(db, "b", j)] = values(db, n, rng)
        want, ws = run(NUMPY, None, dout, arrays, anchor, terms)
        for chunk in (None, 333):
            count += 1
            got, gs = run(k, chunk, dout, arrays, anchor, terms)
            if got != want or (gs.nonfinite, gs.new_nonfinite) != (ws.nonfinite, ws.new_nonfinite):
                g, w = np.frombuffer(got, BITS[dout]), np.frombuffer(want, BITS[dout])
                i = np.flatnonzero(g != w)
                first = f"first at {i[0]}: {g[i[0]]:#x} != {w[i[0]]:#x}" if i.size else "bytes equal"
                bad.append(f"{name} chunk={chunk}: {i.size} elements differ ({first}); counts "
                           f"{(gs.nonfinite, gs.new_nonfinite)} != {(ws.nonfinite, ws.new_nonfinite)}")
            elif not all(_close(x, y) for x, y in ((gs.ss_delta, ws.ss_delta), (gs.ss_anchor, ws.ss_anchor))):
                bad.append(f"{name} chunk={chunk}: sums of squares {gs[:2]} != {ws[:2]}")
    return count, bad


def method_cases(n: int):
    """(method, dtype, has an anchor, terms as (scale, has b, density, limit), params) for every
    method in the registry: each shape of its recipe kinds, its defaults and other values."""
    for name, m in METHODS.items():
        other = tuple((p.name, p.other()) for p in m.parameters if not p.per_vector)
        for anchor, minus in sorted({(r.anchor is not None, r.minus is not None) for r in m.recipes}):
            for dtype in ("BF16", "F16", "F32", "F64"):
                for params in ((), other):
                    # With other parameters, an expanded vocabulary: the vectors cover the anchor's first rows.
                    limit = n - n // 5 if anchor and params else None
                    yield name, dtype, anchor, [(0.7, minus, 0.3, limit), (-0.4, minus, 1.0, limit),
                                                (1.3, minus, 0.0, limit)], params


def run_method(k, chunk: int | None, t: TensorPlan, arrays: dict, cuts: list[int]):
    """(output bytes, non-finite counts, facts) of tensor t computed piece by piece with kernel k."""
    m = METHODS[t.method]
    n, size = t.shape[0], np.dtype(BITS[t.dtype]).itemsize
    bufs = {key: memoryview(bytearray(raw.tobytes())) for key, raw in arrays.items()}
    bounds = [0, *cuts, n]
    pieces = list(zip(bounds, bounds[1:]))
    scratch = k.scratch(chunk)

    def operands(lo: int, hi: int, facts) -> Operands:
        vecs = []
        for j, term in enumerate(t.terms):
            end = hi if term.limit is None else min(hi, term.limit)
            if lo < end:  # a term past its limit has no operands in this piece
                b = k.view(bufs[("b", j)][lo * size:end * size], t.dtype) if ("b", j) in bufs else None
                vecs.append(Vector(term.scale, k.view(bufs[("a", j)][lo * size:end * size], t.dtype), b, term=j,
                                   values=term.values))
        anchor = k.view(bufs["anchor"][lo * size:hi * size], t.dtype) if "anchor" in bufs else None
        return Operands(anchor, tuple(vecs), t.params, t.name, lo, facts)

    facts = None
    for p in m.passes_for(t)[:-1]:
        facts = m.reduce(p, t, [(lo, m.statistic(k, p, operands(lo, hi, facts), scratch)) for lo, hi in pieces], facts)
    out = bytearray(n * size)
    counts = [0, 0]
    for lo, hi in pieces:
        s = m.apply(k, k.view(memoryview(out)[lo * size:hi * size], t.dtype), operands(lo, hi, facts), scratch)
        counts = [counts[0] + s.nonfinite, counts[1] + s.new_nonfinite]
    return bytes(out), counts, facts


def check_methods(k, n: int, seed: int) -> tuple[int, list[str]]:
    rng = np.random.default_rng(seed)
    bad, count = [], 0
    for (name, dtype, anchor, terms, params), special in itertools.product(method_cases(n), (0.0, 0.05)):
        t = TensorPlan("model.layers.0.mlp.up_proj.weight", dtype, (n,), 0, 0, 0, "cp" if anchor else None,
                       tuple(Term(s, None, None, limit, (("density", d),)) for s, _, d, limit in terms),
                       method=name, params=params)
        # Without specials too: an infinity in a delta makes a rescaled tensor's every element NaN.
        arrays = {("a", j): values(dtype, n, rng, special) for j in range(len(terms))}
        arrays.update({("b", j): values(dtype, n, rng, special) for j, (_, minus, _, _) in enumerate(terms) if minus})
        if anchor:
            arrays["anchor"] = values(dtype, n, rng, special)
        for chunk, cuts in ((None, []), (4099, [1, n // 3, n // 3 + 1])):
            count += 1
            want = run_method(NUMPY, None, t, arrays, cuts)
            got = run_method(k, chunk, t, arrays, cuts)
            if got != want:
                g, w = np.frombuffer(got[0], BITS[dtype]), np.frombuffer(want[0], BITS[dtype])
                i = np.flatnonzero(g != w)
                first = f"first at {i[0]}: {g[i[0]]:#x} != {w[i[0]]:#x}" if i.size else "bytes equal"
                bad.append(f"{name} {dtype} anchor={anchor} {params} special={special} chunk={chunk} "
                           f"pieces={len(cuts) + 1}: {i.size} elements differ ({first}); counts {got[1]} != "
                           f"{want[1]}, facts equal: {got[2] == want[2]}")
    return count, bad


def _close(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == y or abs(x - y) <= 1e-3 * max(abs(x), abs(y))


def throughput(k, mb: float) -> float:
    """GB/s of a BF16 chat vector, cp + 0.5 * (chat - base): input and output bytes over the best of 3."""
    n = int(mb * 2**20 / 8)  # three inputs and one output of 2 bytes each
    rng = np.random.default_rng(1)
    bufs = [memoryview(bytearray((rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16)
                                 .astype(np.uint16).tobytes())) for _ in range(3)]
    out = memoryview(bytearray(2 * n))
    cp, chat, base = (k.view(b, "BF16") for b in bufs)
    scratch = k.scratch()
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        k.weighted_sum(k.view(out, "BF16"), cp, [(0.5, chat, base)], scratch)
        best = min(best, time.perf_counter() - t0)
    return 8 * n / best / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--n", type=int, default=100_003, help="elements per checked case (odd: chunk tails)")
    p.add_argument("--method-n", type=int, default=20_011, help="elements per checked method case")
    p.add_argument("--mb", type=float, help="MB of input and output to time (default 512 on a GPU, 16 on the CPU)")
    args = p.parse_args()
    try:
        kernel.check_device(args.device)
    except InputError as e:
        sys.stdout.write(f"gpu_check: device unavailable: {e}\n")
        return 2
    from raymerge.ops.torch_kernel import TorchKernel

    k = TorchKernel(args.device)
    count, bad = check(k, args.n, seed=0)
    method_count, method_bad = check_methods(k, args.method_n, seed=1)
    count, bad = count + method_count, bad + method_bad
    for line in bad:
        sys.stdout.write(f"  {line}\n")
    if bad:
        sys.stdout.write(f"gpu_check: MISMATCH on {args.device}: {len(bad)} of {count} runs differ from the numpy kernel\n")
        return 1
    mb = args.mb or (16 if args.device == "cpu" else 512)
    speed = throughput(k, mb)
    sys.stdout.write(f"gpu_check: OK on {args.device}: {count} runs bit for bit equal to the numpy kernel "
                     f"({count - method_count} kernel runs of {args.n} elements, {method_count} runs of every method "
                     f"of {args.method_n}); BF16 chat vector over {mb:g} MB: {speed:.2f} GB/s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
