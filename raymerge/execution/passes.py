"""A plan's passes, and the facts its statistics passes find (DESIGN.md: passes).

Every tensor with terms needs the passes its method names for it (`Method.passes_for`); a plain
copy needs only the elementwise one. A statistics pass runs the plan's items that hold a piece of
a tensor needing it; each returns a small result per piece, and once every piece of a tensor is
in, the tensor's method reduces them into the tensor's facts (a threshold, a norm's factor),
which the next passes' items receive with their item ids. Results arrive in any order: the
reduction sorts them by the piece's first element, so facts do not depend on the workers.

`Facts` is the driver's side: it takes results as they come (and, on resume, those the journal
kept), reduces each tensor as soon as it is complete, and holds no more than the results of the
tensors still open.
"""

from __future__ import annotations

from typing import Any

from raymerge.errors import OutputError
from raymerge.methods import ELEMENTWISE, METHODS, PASS_ORDER
from raymerge.planning.plan import HEADER, Plan, TensorPlan

Row = tuple[int, int, Any]  # (tensor, the piece's first element, the method's result for the piece)


def tensor_passes(t: TensorPlan) -> tuple[str, ...]:
    return METHODS[t.method].passes_for(t) if t.terms else (ELEMENTWISE,)


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


class Facts:
    """Per-tensor facts of the statistics passes, as their results come in."""

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self.by_tensor: dict[int, Any] = {}
        self._open: dict[tuple[str, int], dict[int, Any]] = {}  # (pass, tensor) -> piece begin -> result
        self._pieces: dict[tuple[str, int], int] = {}  # how many pieces a tensor has in a pass
        self._done: set[tuple[str, int]] = set()  # reduced
        for name in statistics_passes(plan):
            for t, count in _piece_counts(plan, name).items():
                self._pieces[(name, t)] = count

    def add(self, name: str, rows: list[Row]) -> None:
        """One item's results of pass `name`; a tensor whose pieces are all in is reduced now."""
        for tensor, begin, result in rows:
            key = (name, tensor)
            if key not in self._pieces or key in self._done:
                continue  # a piece recorded twice (an item run again after its worker died)
            got = self._open.setdefault(key, {})
            got[begin] = result
            if len(got) == self._pieces[key]:
                self._reduce(name, tensor)

    def _reduce(self, name: str, tensor: int) -> None:
        t = self._plan.tensors[tensor]
        results = sorted(self._open.pop((name, tensor)).items())
        try:
            self.by_tensor[tensor] = METHODS[t.method].reduce(name, t, results, self.by_tensor.get(tensor))
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise OutputError(f"{name}: the results recorded for {t.name} do not add up ({e}); the resume journal "
                              "is damaged: rerun with --overwrite to start over") from e
        self._done.add((name, tensor))

    def complete(self, name: str) -> bool:
        return all((name, t) in self._done for (n, t) in self._pieces if n == name)

    def for_item(self, item_id: int) -> dict[int, Any]:
        """The facts the item's pieces need, by tensor."""
        item = self._plan.items[item_id]
        return {p.tensor: self.by_tensor[p.tensor] for p in item.pieces if p.tensor in self.by_tensor}

    def named(self) -> dict[str, Any]:
        """Every tensor's facts by tensor name: what the manifest records for verify."""
        return {self._plan.tensors[t].name: f for t, f in sorted(self.by_tensor.items())}


def facts_by_index(plan: Plan, named: dict[str, Any] | None) -> dict[int, Any]:
    """A manifest's facts (by tensor name) for the plan's tensors (by index)."""
    index = {t.name: i for i, t in enumerate(plan.tensors)}
    return {index[n]: f for n, f in (named or {}).items() if n in index}


def _piece_counts(plan: Plan, name: str) -> dict[int, int]:
    needs = [name in tensor_passes(t) for t in plan.tensors]
    counts: dict[int, int] = {}
    for item in plan.items:
        for p in item.pieces:
            if p.tensor != HEADER and needs[p.tensor]:
                counts[p.tensor] = counts.get(p.tensor, 0) + 1
    return counts
