"""A plan's statistics passes and the driver's facts: which items each pass runs, results taken in
any order (a duplicate ignored), each tensor reduced once complete, damaged results refused."""

from __future__ import annotations

import pytest

from raymerge import api
from raymerge.errors import InputError, OutputError
from raymerge.execution.passes import Facts, facts_by_index
from raymerge.planning.passes import pass_items, pass_read_bytes, statistics_passes, tensor_passes
from raymerge.methods import METHODS
from raymerge.execution.worker import MergeWorker
from raymerge.synth import LlamaShape, make_trio


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return make_trio(str(tmp_path_factory.mktemp("passes")), LlamaShape(hidden=32, layers=1, vocab=64, intermediate=48))


def _plan(trio, **values):
    return api.plan(trio["base"], trio["chat"], trio["cp"], item_size="4KiB", **values)


def test_each_method_names_the_passes_its_tensors_need(trio):
    assert statistics_passes(_plan(trio)) == []
    assert statistics_passes(_plan(trio, method="ties", density=[1.0])) == []  # keeps all: nothing to find
    ties = _plan(trio, method="ties", density=[0.5])
    assert statistics_passes(ties) == ["magnitude-high", "magnitude-low"]
    assert statistics_passes(_plan(trio, method="ties", density=[0.5], rescale=True)) == [
        "magnitude-high", "magnitude-low", "l1-norm"]
    assert statistics_passes(_plan(trio, method="dare_ties", density=[0.5])) == ["l1-norm"]
    assert statistics_passes(_plan(trio, method="dare_ties", density=[0.5], rescale=False)) == []
    assert pass_items(ties, "magnitude-high") == [i.id for i in ties.items]  # every tensor is a float with terms
    # A statistics pass reads the vector's inputs (chat and base), not the anchor (cp).
    assert pass_read_bytes(ties, "magnitude-high") == 2 * sum(t.nbytes for t in ties.tensors)
    assert all(tensor_passes(t)[-1] == "elementwise" for t in ties.tensors)


def test_facts_reduce_each_tensor_once_whatever_the_order_of_results(trio):
    plan = _plan(trio, method="ties", density=[0.3])
    worker = MergeWorker(plan, None, {}, {})
    facts = Facts(plan)
    for name in statistics_passes(plan):
        results = [worker.stats(i, name, facts.for_item(i)) for i in pass_items(plan, name)]
        assert not facts.complete(name)
        for r in reversed(results):
            facts.add(name, r.rows)
        facts.add(name, results[0].rows)  # an item run twice (its worker died after finishing it)
        assert facts.complete(name)
    worker.close()
    named = facts.named()
    assert sorted(named) == sorted(t.name for t in plan.tensors)
    for t in plan.tensors:
        f = named[t.name][0]
        assert f["k"] == max(1, int(0.3 * t.nbytes // 2)) and f["above"] < f["k"] and 0 < f["keep"] <= f["k"]


def _one_piece_tensor(plan) -> int:
    pieces = [sum(p.tensor == i for it in plan.items for p in it.pieces) for i in range(len(plan.tensors))]
    return pieces.index(1)  # a tensor of one piece: its one result completes it


def test_results_that_do_not_add_up_are_a_damaged_journal(trio):
    plan = _plan(trio, method="ties", density=[0.3])
    facts = Facts(plan)
    t = _one_piece_tensor(plan)
    with pytest.raises(OutputError, match="do not add up.*--overwrite"):
        facts.add("magnitude-high", [(t, 0, [["not", "a"], ["histogram"]])])


@pytest.mark.parametrize("row", [(10**6, 0, None), (0, 2**61, None), (-1, 0, None)])
def test_a_result_that_is_no_piece_of_the_plan_is_a_damaged_journal(trio, row):
    # Replayed from a journal: an index the plan does not have is refused, never skipped or used.
    facts = Facts(_plan(trio, method="ties", density=[0.3]))
    with pytest.raises(OutputError, match=r"magnitude-high: a result recorded for tensor -?\d+ at element \d+ is "
                                          r"no piece of this plan's; the resume journal is damaged: rerun with "
                                          "--overwrite"):
        facts.add("magnitude-high", [row])


@pytest.mark.parametrize("result", [
    [[[2**40], [10**9]]],  # a bin past 16 bits: the threshold would overflow the workers' uint32
    [[[1], ["many"]]],  # a count that is no number
    [[[1], [0]]],  # fewer elements than k
])
def test_results_that_reduce_to_no_facts_in_range_are_a_damaged_journal(trio, result):
    plan = _plan(trio, method="ties", density=[0.3])
    facts = Facts(plan)
    t = _one_piece_tensor(plan)
    with pytest.raises(OutputError, match=f"magnitude-high: the results recorded for {plan.tensors[t].name} do "
                                          r"not add up \(.*\); the resume journal is damaged"):
        facts.add("magnitude-high", [(t, 0, result)])


def test_a_pass_no_method_declares_is_refused_not_skipped(trio, monkeypatch):
    plan = _plan(trio, method="ties", density=[0.5])
    monkeypatch.setattr(type(METHODS["ties"]), "passes_for", lambda self, t: ("magnitude-hihg", "elementwise"))
    with pytest.raises(KeyError, match="statistics pass 'magnitude-hihg' is declared by no method"):
        tensor_passes(plan.tensors[0])


def test_facts_by_index_refuses_a_rescale_factor_past_32_bits(trio):
    plan = _plan(trio, method="dare_ties", density=[0.5])
    t = plan.tensors[0]
    assert facts_by_index(plan, {x.name: [{"factor": 1065353216}] for x in plan.tensors})[0] == [{"factor": 1065353216}]
    assert facts_by_index(plan, {x.name: [{}] for x in plan.tensors})[0] == [{}]  # tiny norms: no factor
    with pytest.raises(InputError, match=f"lacks the statistics facts of {t.name} that recomputing dare_ties needs "
                                         r"\(vector 1's 'factor' is 4294967296, out of range\)"):
        facts_by_index(plan, {x.name: [{"factor": 2**32}] for x in plan.tensors})


def test_apply_with_ties_over_stored_vectors_matches_the_whole_tensor_reference(trio, tmp_path):
    # The worker's passes by hand (no Ray): statistics items in reverse order, then every item's bytes.
    import torch
    from safetensors.torch import load, save_file

    from tests.helpers import assert_bit_identical, load_folder
    from tests.methods.test_sparse_methods import sparse_reference

    base, chat, cp = (load_folder(trio[r]) for r in ("base", "chat", "cp"))
    vectors = []
    for k, noise in ((0, 1.0), (1, -0.5)):  # two stored float32 vectors, the second of the opposite sign
        folder = tmp_path / f"vec{k}"
        folder.mkdir()
        save_file({n: (chat[n].float() - base[n].float()) * noise + 1e-3 * torch.randn(base[n].shape)
                   for n in base}, str(folder / "model.safetensors"), metadata={"format": "pt"})
        vectors.append(str(folder))
    plan = api.plan(kind="apply", cp=trio["cp"], vector=vectors, scale=[0.6, 0.8], method="ties",
                    density=[0.25, 0.5], item_size="4KiB")
    worker = MergeWorker(plan, None, {}, {})
    facts = Facts(plan)
    for name in statistics_passes(plan):
        for i in reversed(pass_items(plan, name)):
            facts.add(name, worker.stats(i, name, facts.for_item(i)).rows)
    shard = bytearray(plan.shards[0].size)
    for item in plan.items:
        shard[item.start:item.end] = worker.produce(item.id, facts=facts.for_item(item.id))[0]
    worker.close()
    got = load(bytes(shard))
    stored = [load_folder(v) for v in vectors]
    want = {n: sparse_reference(n, cp[n], [(0.6, stored[0][n], None, 0.25), (0.8, stored[1][n], None, 0.5)], "ties")
            for n in cp}
    assert len(plan.shards) == 1  # the whole output is the shard assembled above
    assert_bit_identical(got, want)
