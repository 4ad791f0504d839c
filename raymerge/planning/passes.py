"""Which passes a plan runs (docs/ARCHITECTURE.md: passes): each tensor with terms needs the
passes its method names for it, a plain copy only the elementwise one; a statistics pass runs the
items that hold a piece of a tensor needing it. Pure queries over a plan."""

from __future__ import annotations

from raymerge.methods import ELEMENTWISE, METHODS, PASS_ORDER, pass_named
from raymerge.planning.plan import HEADER, Plan, TensorPlan


def tensor_passes(t: TensorPlan) -> tuple[str, ...]:
    """The passes tensor t needs, as its method says; a pass no method declares is a bug, refused."""
    if not t.terms:
        return (ELEMENTWISE,)
    passes = METHODS[t.method].passes_for(t)
    for name in passes:
        if name != ELEMENTWISE:
            pass_named(name)
    return passes


def statistics_passes(plan: Plan) -> list[str]:
    """The plan's statistics passes, in the order they run."""
    wanted = {p for t in plan.tensors for p in tensor_passes(t)}
    return [p for p in PASS_ORDER if p in wanted and p != ELEMENTWISE]


def pass_items(plan: Plan, name: str) -> list[int]:
    """The items holding a piece of a tensor that needs pass `name`."""
    needs = [name in tensor_passes(t) for t in plan.tensors]
    return [i.id for i in plan.items if any(p.tensor != HEADER and needs[p.tensor] for p in i.pieces)]


def pass_read_bytes(plan: Plan, name: str) -> int:
    """Bytes of input the workers read in a statistics pass: every needing tensor's vector sources,
    each once (the anchor is not read)."""
    total = 0
    for t in plan.tensors:
        if name in tensor_passes(t):
            total += sum(s.nbytes for s in {x for term in t.terms for x in (term.a, term.b)} if s is not None)
    return total
