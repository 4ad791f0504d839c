"""What an item's passes keep, between them: each pass's object holds only what it made
(worker.merged reads them in order, a later value of a piece's name in place of an earlier one),
and the driver (kept.KeptValues) hands on every object holding a value no later pass kept again,
freeing the rest."""

from __future__ import annotations

import os

import numpy as np

from raymerge.execution.kept import KeptValues
from raymerge.execution.worker import merged

A, B = (0, 0), (1, 0)  # two pieces: (tensor, first element)


def test_a_later_objects_value_of_a_name_replaces_an_earlier_ones_per_piece():
    first = {A: {"mean": np.zeros(2), "at": "u1"}, B: {"mean": np.ones(2), "at": "u1"}}
    second = {A: {"tangent": np.full(2, 2.0), "tangent-of": 2}}
    third = {A: {"mean": np.full(2, 3.0), "at": "u2"}}
    got = merged((first, None, second, third), None)
    assert got[A]["at"] == "u2" and got[A]["mean"][0] == 3 and got[A]["tangent-of"] == 2
    assert got[B]["at"] == "u1"  # the other piece: the first object's
    # `live`: only what the driver still hands on from each object
    got = merged((first, second), [[(*A, "at"), (*B, "mean")], [(*A, "tangent"), (*A, "tangent-of")]])
    assert got[A] == {"at": "u1", "tangent": second[A]["tangent"], "tangent-of": 2}
    assert list(got[B]) == ["mean"]


def _kept() -> KeptValues:
    kept = KeptValues.__new__(KeptValues)  # no Ray here: the bookkeeping alone
    kept.on, kept._refs, kept._next = True, {}, {}
    return kept


def _pass(kept: KeptValues, ref: str, *names: tuple, spent: tuple = ()) -> None:
    kept._next[7] = ref
    kept.finished(7, names, spent)


def test_the_driver_frees_an_object_once_later_passes_kept_everything_it_holds():
    kept = _kept()
    _pass(kept, "mean-pass", (*A, "at"), (*A, "mean"), (*B, "at"), (*B, "mean"))
    _pass(kept, "dots-pass")  # kept nothing: its (empty) object is dropped, the means stay
    _pass(kept, "tangent-pass", (*A, "tangent"))
    assert kept._given(7) == (["mean-pass", "tangent-pass"],
                              {"live": [[(*A, "at"), (*A, "mean"), (*B, "at"), (*B, "mean")], [(*A, "tangent")]]})
    _pass(kept, "unit-pass", (*A, "at"), (*A, "mean"))  # a new mean of piece A alone: B's stays live
    assert kept._given(7) == (["mean-pass", "tangent-pass", "unit-pass"],
                              {"live": [[(*B, "at"), (*B, "mean")], [(*A, "tangent")], [(*A, "at"), (*A, "mean")]]})
    _pass(kept, "unit-b", (*B, "at"), (*B, "mean"), (*A, "tangent"))  # the first two objects: all replaced
    assert kept._given(7)[0] == ["unit-pass", "unit-b"]
    kept.written(7)
    assert kept._given(7) == ([], {})


def test_a_value_its_method_spends_is_freed_after_the_pass_that_read_it_last():
    """karcher's unit pass reads the tangent last (Method.spends): the tangent pass's object goes
    with it, before the next tangent pass replaces it."""
    kept = _kept()
    _pass(kept, "mean-pass", (*A, "at"), (*A, "mean"))
    _pass(kept, "tangent-pass", (*A, "tangent"), (*A, "tangent-of"))
    _pass(kept, "unit-pass", (*A, "at"), (*A, "mean"), spent=((*A, "tangent"), (*A, "tangent-of")))
    assert kept._given(7) == (["unit-pass"], {"live": [[(*A, "at"), (*A, "mean")]]})
    _pass(kept, "dots-pass", spent=((*A, "at"), (*A, "mean")))  # kept nothing, spent everything
    assert kept._given(7) == ([], {}) and 7 not in kept._refs


def test_a_pass_skipped_for_converged_tensors_frees_what_it_would_have_read_last():
    """Tensors whose facts say they need a pass no more (karcher's, converged) skip it: what it
    would have spent of their pieces goes at once, and an object holding nothing else with it;
    no later pass of the item would run to carry them (an item whose every piece converged)."""
    from types import SimpleNamespace

    kept = _kept()
    kept._plan = SimpleNamespace(tensors=[SimpleNamespace(method="karcher")] * 2)
    _pass(kept, "mean-pass", (*A, "at"), (*A, "mean"), (*B, "at"), (*B, "mean"))
    _pass(kept, "tangent-pass", (*A, "tangent"), (*A, "tangent-of"), (*B, "tangent"), (*B, "tangent-of"))
    kept.skipped("karcher-dots-2", [0, 1])  # spends nothing
    kept.skipped("karcher-unit-1", [0])  # A converged: B's tangent stays
    assert kept._given(7) == (["mean-pass", "tangent-pass"],
                              {"live": [[(*A, "at"), (*A, "mean"), (*B, "at"), (*B, "mean")],
                                        [(*B, "tangent"), (*B, "tangent-of")]]})
    kept.skipped("karcher-unit-1", [1])
    assert kept._given(7)[0] == ["mean-pass"]


def test_karcher_spends_the_tangent_in_its_unit_passes_alone():
    from raymerge.methods.karcher import Karcher, iteration_pass

    assert Karcher().spends(iteration_pass(3, "unit")) == ("tangent", "tangent-of")
    assert not any(Karcher().spends(p) for p in ("karcher-norms", "karcher-mean", iteration_pass(3, "dots"),
                                                  iteration_pass(3, "tangent")))


def test_a_converged_tensors_values_move_into_the_next_object_its_item_keeps(tmp_path):
    """karcher tensors that converge (the norm weights here: the same in both models) skip the
    passes after; what they still hold moves into the next object their item's passes keep (less
    the tangent, which the skipped unit pass would have read last), so no earlier object stays
    alive for them: an item holds at most a mean's object and a tangent's, and its output is the
    bits computed again from the inputs."""
    from safetensors.torch import load_file, save_file

    from raymerge.config.files import load_recipe_file
    from raymerge.execution.passes import Facts
    from raymerge.execution.worker import MergeWorker
    from raymerge.planning.build import make_plan
    from raymerge.planning.passes import pass_items, statistics_passes
    from tests.conftest import make_llama_trio
    from tests.helpers import mergekit_file

    folders = make_llama_trio(str(tmp_path), roles=("base", "chat"), max_shard_size="10MB", seed=5)
    base, chat = (os.path.join(folders[r], "model.safetensors") for r in ("base", "chat"))
    same = {k: v for k, v in load_file(base).items() if k.endswith("norm.weight")}
    save_file({**load_file(chat), **same}, chat, metadata={"format": "pt"})
    path = mergekit_file(tmp_path, f"merge_method: karcher\nmodels:\n  - model: {folders['base']}\n"
                                   f"  - model: {folders['chat']}\nparameters: {{max_iter: 3}}\ndtype: bfloat16\n")
    plan = make_plan(*load_recipe_file(path, {"out": str(tmp_path / "out")}))
    worker, facts, kept, objects = MergeWorker(plan, None, {}, {}), Facts(plan), _kept(), {}
    kept._plan = plan
    for name in statistics_passes(plan):
        kept.skipped(name, facts.settle(name))
        for i in pass_items(plan, name):
            if facts.wanted(name, i):
                refs, live = kept._given(i)
                result, objects[(name, i)] = worker.stats_kept(i, name, facts.for_item(i),
                                                               *(objects[r] for r in refs), **live)
                kept._next[i] = (name, i)
                kept.finished(i, result.kept, result.spent)
                facts.add(name, result.rows)
                assert len(kept._given(i)[0]) <= 2, (name, kept._given(i))
    done = {plan.tensors[t].name: f[0].get("done") for t, f in facts.by_tensor.items()}
    assert {d for n, d in done.items() if n.endswith("norm.weight")} == {1}
    assert {d for n, d in done.items() if not n.endswith("norm.weight")} == {None}  # three iterations
    # a pass of another method (a plan mixing methods): its values move whole, none spent
    piece = next(p for p in plan.items[0].pieces if p.tensor >= 0)
    into: dict = {}
    values = {"mean": np.zeros(2), "tangent": np.ones(2), "tangent-of": 1}
    assert worker._carry("della-l1", [piece], {(piece.tensor, piece.begin): values}, into) == []
    assert into == {(piece.tensor, piece.begin): values}
    assert worker._carry("karcher-unit-2", [piece], {(piece.tensor, piece.begin): values}, into) == \
        [(piece.tensor, piece.begin, "tangent"), (piece.tensor, piece.begin, "tangent-of")]
    for item in plan.items:
        refs, live = kept._given(item.id)
        out, _, _ = worker.produce(item.id, None, facts.for_item(item.id),
                                   merged(tuple(objects[r] for r in refs), live.get("live")))
        got = bytes(out)
        assert got == bytes(worker.produce(item.id, None, facts.for_item(item.id))[0])
