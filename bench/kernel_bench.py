"""Time the numpy kernel alone, in one thread, on synthetic inputs; optionally against another copy of it.

    python bench/kernel_bench.py                              # this checkout's raymerge/ops/numpy_kernel.py
    python bench/kernel_bench.py --compare /tmp/kernel_old.py # interleaved rounds of both, medians
    python bench/kernel_bench.py --compare /tmp/kernel_old.py --n 1e6 --rounds 300  # a noisy machine

Cases (64M elements by default): BF16 and F16 chat vectors (`cp + 0.5 * (chat - base)`, output of the
inputs' type), BF16 with two terms, and a BF16 -> F16 cast with no terms (an override row's path).
Values are normal with a weight-like spread, so every chunk takes the common, all-finite path.
Rounds interleave the kernels, in alternating order, so that a drift of the machine's speed reaches
both alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
KERNEL = os.path.join(HERE, "..", "raymerge", "ops", "numpy_kernel.py")
BITS = {"BF16": np.uint16, "F16": np.float16}  # output arrays, as the kernel's `view` gives them


def load(path: str, name: str):
    """The kernel a file defines: a `numpy_kernel.py` (its NUMPY), or an older module-level kernel.py."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    if hasattr(module, "NUMPY"):
        return module.NUMPY
    return SimpleNamespace(scratch=module.Scratch, weighted_sum=module.weighted_sum)


def inputs(n: int, dtype: str, count: int, seed: int) -> list[np.ndarray]:
    """`count` arrays of n weight-like values (std 0.02), as the kernel's `view` gives them."""
    rng = np.random.default_rng(seed)
    made = []
    for _ in range(count):
        x = (rng.standard_normal(n, dtype=np.float32) * np.float32(0.02))
        made.append((x.view(np.uint32) >> 16).astype(np.uint16) if dtype == "BF16" else x.astype(np.float16))
    return made


def cases(n: int) -> dict[str, tuple[str, object, list]]:
    """name -> (output dtype, anchor, terms)."""
    cp, chat, base, v = inputs(n, "BF16", 4, 0)
    hcp, hchat, hbase = inputs(n, "F16", 3, 1)
    return {
        "bf16 1 term": ("BF16", cp, [(0.5, chat, base)]),
        "f16 1 term": ("F16", hcp, [(0.5, hchat, hbase)]),
        "bf16 2 terms": ("BF16", cp, [(0.5, chat, base), (0.25, v, None)]),
        "bf16->f16 cast": ("F16", cp, []),
    }


def time_once(module, out: np.ndarray, anchor, terms, scratch) -> float:
    t0 = time.perf_counter()
    module.weighted_sum(out, anchor, terms, scratch)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=float, default=64 * 2**20, help="elements per tensor")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--compare", help="path of another kernel.py to time against this one")
    args = p.parse_args()
    kernels = {"new": load(KERNEL, "kernel_new")}
    if args.compare:
        kernels["old"] = load(args.compare, "kernel_old")
    n = int(args.n)
    table = cases(n)
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for case, (dtype, anchor, terms) in table.items():
            out = np.zeros(n, BITS[dtype])  # touched: no page faults in the timing
            order = list(kernels.items())
            for name, module in order if r % 2 == 0 else order[::-1]:  # neither kernel always runs first
                scratch = module.scratch()
                times.setdefault((case, name), []).append(time_once(module, out, anchor, terms, scratch))
    for case in table:
        row = {name: statistics.median(times[(case, name)]) for name in kernels}
        cells = "  ".join(f"{name} {t * 1e3:7.1f} ms ({n / t / 1e9:5.2f} Gelem/s)" for name, t in row.items())
        ratio = ""
        if "old" in row:  # the ratio within each round: the two ran back to back, on the same machine state
            pairs = [a / b for a, b in zip(times[(case, "new")], times[(case, "old")])]
            ratio = f"  new/old {statistics.median(pairs):.3f} (median of {len(pairs)} rounds' ratios)"
        sys.stdout.write(f"{case:15s} {cells}{ratio}\n")


if __name__ == "__main__":
    main()
