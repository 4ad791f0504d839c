"""A tensor's compute dtype (planner._compute): the file's dtype for float tensors, the inputs' shared
dtype without one, and none for integer buffers, which are copied as they are."""

from __future__ import annotations

from raymerge.planning.plan import Source, Term
from raymerge.planning.planner import INPUTS, _compute, _Rule


def rule(dtype: str, *inputs: str) -> _Rule:
    sources = [Source(0, d, 0, 8) for d in inputs]
    return _Rule("t", dtype, (4,), sources[0], tuple(Term(1.0, s, sources[0]) for s in sources[1:]))


def test_float_tensors_compute_at_the_files_dtype_or_their_inputs():
    assert _compute("BF16", rule("F32", "F32", "F32")) == "BF16"
    assert _compute("F16", rule("BF16", "BF16")) == "F16"
    assert _compute("F32", rule("BF16", "BF16")) is None  # float32: rounded once
    assert _compute(INPUTS, rule("BF16", "BF16", "BF16")) == "BF16"
    assert _compute(INPUTS, rule("F32", "BF16", "F16")) is None  # mergekit promotes BF16 with F16 to float32


def test_integer_buffers_are_never_cast():
    for compute in ("BF16", "F16", INPUTS):
        assert _compute(compute, rule("I64", "I64")) is None
