"""The methods seam: recipe kinds name registered methods, the planner records a tensor's method
by name, and the worker computes each piece through that method with named operands."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from raymerge.api import describe
from raymerge.config import build_recipe
from raymerge.execution.worker import MergeWorker
from raymerge.methods import METHODS, RECIPES, Method, Operands, Vector
from raymerge.ops.kernel import kernel_for
from raymerge.planning.build import make_plan
from tests.helpers import chat_vector_reference, load_folder


def test_every_recipe_kind_names_a_registered_method():
    assert list(RECIPES)[:8] == ["merge", "extract", "apply", "task_arithmetic", "linear", "ties", "dare_linear",
                                 "dare_ties"]
    assert {"slerp"} <= set(RECIPES)
    assert [k for k, how in RECIPES.items() if how.command] == ["merge", "extract", "apply"]  # commands too
    for how in RECIPES.values():
        assert how.method in METHODS
        assert how in METHODS[how.method].recipes


def test_sum_applies_the_vectors_in_order_with_one_rounding():
    k = kernel_for("cpu", {"F32"})
    rng = np.random.default_rng(0)
    anchor, a1, b1, a2 = (rng.standard_normal(1000).astype(np.float32) for _ in range(4))
    out = np.empty(1000, np.float32)
    METHODS["sum"].apply(k, out, Operands(anchor, (Vector(0.5, a1, b1), Vector(2.0, a2[:300], None))), k.scratch())
    want = torch.from_numpy(anchor.copy())
    want += np.float32(0.5) * (torch.from_numpy(a1) - torch.from_numpy(b1))
    want[:300] += np.float32(2.0) * torch.from_numpy(a2[:300])  # a vector shorter than the piece: its first rows
    assert np.array_equal(out.view(np.uint32), want.numpy().view(np.uint32))


def test_operand_rows_slice_every_operand_alike():
    ops = Operands(np.arange(10), (Vector(1.0, np.arange(10, 20), None), Vector(2.0, np.arange(20, 25), np.arange(5))))
    sub = ops.rows(3, 7)
    assert list(sub.anchor) == [3, 4, 5, 6]
    assert list(sub.vectors[0].a) == [13, 14, 15, 16] and sub.vectors[0].b is None
    assert list(sub.vectors[1].a) == [23, 24] and list(sub.vectors[1].b) == [3, 4]  # a prefix vector stays a prefix


class _Negate(Method):
    """A stand-in method: the negated anchor. Registered by name, as a real method would be."""

    name = "negate"

    def apply(self, kernel, out, operands, scratch):
        return kernel.weighted_sum(out, None, [(-1.0, operands.anchor, None)], scratch)


def test_the_worker_computes_each_tensor_with_the_method_its_plan_names(llama_trio, monkeypatch):
    recipe, options = build_recipe("merge", dict(base=llama_trio["base"], chat=llama_trio["chat"],
                                                 cp=llama_trio["cp"], scale=0.5, item_size="64KiB"))
    plan = make_plan(recipe, options)
    assert {t.method for t in plan.tensors} == {"sum"}
    shown = describe(plan)  # what `raymerge plan --json` prints
    assert shown["methods"] == {"sum": {"passes": ["elementwise"], "parameters": ["scale"], "given": {}}}
    assert {t["method"] for t in shown["tensors"]} == {"sum"}
    monkeypatch.setitem(METHODS, "negate", _Negate())
    negated = dataclasses.replace(plan, tensors=tuple(dataclasses.replace(t, method="negate") if i % 2 else t
                                                      for i, t in enumerate(plan.tensors)))
    worker = MergeWorker(negated, None, {}, {})
    produced = bytearray(sum(s.size for s in plan.shards))
    shard_starts = np.cumsum([0] + [s.size for s in plan.shards])
    for item in plan.items:
        out, _, _ = worker.produce(item.id)
        lo = shard_starts[item.shard] + item.start
        produced[lo:lo + item.nbytes] = out
    base, chat, cp = (load_folder(llama_trio[r]) for r in ("base", "chat", "cp"))
    want = chat_vector_reference(base, chat, cp, 0.5)
    for i, t in enumerate(plan.tensors):
        lo = shard_starts[t.shard] + t.start
        got = torch.frombuffer(bytearray(produced[lo:lo + t.nbytes]), dtype=torch.bfloat16).reshape(t.shape)
        expected = (0 + -1.0 * cp[t.name].float()).to(cp[t.name].dtype) if i % 2 else want[t.name]
        assert torch.equal(got.view(torch.int16), expected.contiguous().view(torch.int16)), t.name


def test_a_source_that_several_operands_share_is_read_once(llama_trio):
    """A mergekit recipe's base is its anchor and every vector's b: each item reads it once."""
    recipe, options = build_recipe("task_arithmetic", dict(base=llama_trio["base"], model=[llama_trio["cp"], llama_trio["chat"]],
                                                           scale=[1.0, 0.5], item_size="64KiB"))
    plan = make_plan(recipe, options)
    worker = MergeWorker(plan, None, {}, {})
    read = sum(worker.produce(item.id)[1] for item in plan.items)
    worker.close()
    assert read == plan.read_bytes == 3 * plan.tensor_bytes  # base, cp and chat once each (all bf16, like the output)


def test_linear_counts_its_whole_weighted_sum_as_the_change_made():
    """linear has no anchor: its output is its change from zero, and the stats say so (not 0)."""
    k = kernel_for("cpu", {"F32"})
    rng = np.random.default_rng(1)
    m1, m2 = (rng.standard_normal(500).astype(np.float32) for _ in range(2))
    out = np.empty(500, np.float32)
    sums = METHODS["linear"].apply(k, out, Operands(None, (Vector(0.25, m1, None), Vector(0.75, m2, None))),
                                   k.scratch())
    assert sums.ss_anchor == 0.0
    assert np.isclose(sums.ss_delta, float(np.sum(out.astype(np.float64) ** 2)), rtol=1e-5) and sums.ss_delta > 0
