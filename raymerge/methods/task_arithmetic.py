"""mergekit's task arithmetic and linear merges, in mergekit's order of float32 operations.

    task_arithmetic:  out = round(base + lambda * (sum_i w_i * (m_i - base) [/ sum_i w_i]))
    linear:           out = round(sum_i w_i * m_i [/ sum_i w_i])

At a compute dtype (bfloat16, float16: `dtype:` of a mergekit file), task_arithmetic rounds each
operation to it as mergekit does (methods/sparse.py); linear computes in float32 from inputs cast to
it, as mergekit's does, and rounds once to it.

mergekit (0.1.5, `dtype: float32`) sums the weighted deltas first, divides by the weights' sum
when normalizing, multiplies by lambda, and only then adds the base. raymerge's own recipes
(`sum`) add each weighted delta to the anchor in turn: on float32 inputs the two orders differ in
the last bits of many elements (README: Order of operations), so a mergekit recipe runs in its own.

Both are two kernel passes over a piece: the weighted sum into a float32 buffer kept per thread
(linear's with fused multiply-adds, as mergekit's addcmul_ computes it), then the anchor plus
lambda times that sum, rounded once to the output. Non-finite outputs are counted in the second pass: an overflow inside
the float32 sum itself (beyond 3.4e38) would count as inherited from an input.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raymerge.methods.base import LAMBDA, NORMALIZE, SCALE, Method, Operands, mergekit_kind
from raymerge.methods.sparse import Sparse

_TEMP = "mergekit-sum"  # the key of the float32 buffer in a thread's scratch


class TaskArithmetic(Sparse):
    """mergekit's generalized task arithmetic without sparsification or consensus. In float32, one
    weighted sum (below); at a compute dtype, the generalized steps of methods/sparse.py, each rounded
    to it as mergekit's is."""

    name = "task_arithmetic"
    sparsify, consensus = None, False
    parameters = (SCALE, NORMALIZE, LAMBDA)
    recipes = (mergekit_kind("task_arithmetic"),)
    combining = False

    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        if operands.compute is not None:
            return super().apply(kernel, out, operands, scratch)
        mixed = _weighted(kernel, operands, scratch, len(out), self.value(operands, "normalize"))
        return kernel.weighted_sum(out, operands.anchor, [(self.value(operands, "lambda"), mixed, None)], scratch)


class Linear(Method):
    name = "linear"
    parameters = (SCALE, NORMALIZE.default_to(True))
    recipes = (mergekit_kind("linear", anchor=None, minus=None),)

    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        mixed = _weighted(kernel, operands, scratch, len(out), self.value(operands, "normalize"))
        # The weighted sum is rounded as an anchor would be (a cast: its bits, -0.0 included), but
        # it is the change from zero that the output is: the stats count it as the change made.
        sums = kernel.weighted_sum(out, mixed, [], scratch)
        return sums._replace(ss_delta=sums.ss_anchor, ss_anchor=0.0)


def _weighted(kernel: Any, operands: Operands, scratch: Any, n: int, normalize: bool) -> Any:
    """sum_i w_i * (a_i - b_i) in float32, in order: task arithmetic's weighted deltas, each product
    and sum rounded (mergekit multiplies, then sums); linear's weighted models (no b), each product
    and sum rounded once (mergekit's addcmul_, a fused multiply-add). Divided by sum_i w_i when
    `normalize`, as mergekit divides (a sum near 0 divides by 1)."""
    buf = scratch.staging.get(_TEMP)
    if buf is None or len(buf) < 4 * n:
        buf = scratch.staging[_TEMP] = bytearray(4 * n)  # reused: fresh pages are slow to touch
    mixed = kernel.view(memoryview(buf)[:4 * n], "F32")
    if any(v.b is not None for v in operands.vectors):
        kernel.weighted_sum(mixed, None, [(v.scale, v.a, v.b) for v in operands.vectors], scratch)
    else:
        kernel.fused_sum(mixed, [(v.scale, v.a) for v in operands.vectors], scratch)
    if normalize:
        divisor = np.float32(0)
        for v in operands.vectors:
            divisor = np.float32(divisor + np.float32(v.scale))
        if abs(divisor) >= 1e-8:
            mixed /= float(divisor)  # a float32 division for numpy arrays and torch tensors alike
    return mixed
