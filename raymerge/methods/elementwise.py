"""mergekit's elementwise methods without statistics, in its operations' order, each rounded to the
compute dtype as mergekit's torch operations on tensors of that dtype are (mergekit 0.1.5,
`nearswap.py`, `passthrough.py`):

    nearswap:     w = clamp(t * (1 / max(|base - other|, 1e-6)), 0, 1)
                  out = w * other + (1 - w) * base
    passthrough:  out = scale * model  (the model as it is without a scale)

torch computes `t / x` as `x.reciprocal() * t`: two roundings, kept here. Each step is a kernel
primitive on float32 chunks, rounded to the compute dtype where one is set (`Operands.rounded`);
NaNs get the kernels' one rule (`steps.replay_nans`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from raymerge.methods.base import SCALE, Method, Operands, mergekit_kind
from raymerge.methods.slerp import T
from raymerge.methods.steps import each_chunk, step as _step

_FLOOR = np.float32(1e-6)  # mergekit's nearswap: |base - other| is at least this


class Nearswap(Method):
    """The other model's value where it lies within about t of the base's, the base's far from it."""

    name = "nearswap"
    parameters = (T,)
    recipes = (mergekit_kind("nearswap", single=True),)

    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        t = np.float32(operands.vectors[0].param("t", T.default)) if operands.vectors else np.float32(0)

        def rule(k: Any, base: Any, other: Any, work: Any) -> Any:
            rnd = operands.rounded
            rnd(k, _step(k.subtract, base, other, work))
            k.absolute(work, work)
            rnd(k, _step(k.maximum, work, _FLOOR, work))  # clamp(min=1e-6)
            k.reciprocal(work, work)
            rnd(k, work)
            rnd(k, _step(k.multiply, work, t, work))  # t / x
            k.maximum(work, np.float32(0), work)
            k.minimum(work, np.float32(1), work)  # the weight w: clamp(0, 1)
            rnd(k, _step(k.multiply, work, other, other))  # w * other
            k.multiply(work, np.float32(-1), work)
            rnd(k, _step(k.add, work, np.float32(1), work))  # 1 - w (1 + -w: the same bits)
            rnd(k, _step(k.multiply, work, base, base))  # (1 - w) * base
            return _step(k.add, other, base, base)

        return each_chunk(kernel, out, operands, scratch, rule, 2)


class Passthrough(Method):
    """One model, as it is or times its scale (mergekit's passthrough; its frankenmerges are slices)."""

    name = "passthrough"
    parameters = (dataclasses.replace(SCALE, mergekit="scale", required=False),)
    recipes = (mergekit_kind("passthrough", anchor=None, minus=None, single=True),)

    def apply(self, kernel: Any, out: Any, operands: Operands, scratch: Any) -> Any:
        scale = np.float32(operands.vectors[0].scale) if operands.vectors else np.float32(1)

        def rule(k: Any, model: Any, work: Any) -> Any:
            if scale != 1:  # mergekit multiplies only by a scale given
                operands.rounded(k, _step(k.multiply, model, scale, model))
            return model

        return each_chunk(kernel, out, operands, scratch, rule, 1)
