"""A plan's passes, and the facts its statistics passes find (docs/ARCHITECTURE.md: passes).

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

import math
from typing import Any

from raymerge.errors import InputError, OutputError
from raymerge.methods import ELEMENTWISE, METHODS
from raymerge.planning.passes import statistics_passes, tensor_passes
from raymerge.planning.plan import HEADER, Plan, TensorPlan
from raymerge.untrusted import shown

Row = tuple[int, int, Any]  # (tensor, the piece's first element, the method's result for the piece)

def covers(plan: Plan, name: str, item_id: int, rows: list[Row] | tuple[Row, ...]) -> bool:
    """Whether `rows` (an item's results read back from a journal) hold a result for every piece of
    the item that pass `name` needs: only then is the item done for that pass."""
    if not 0 <= item_id < len(plan.items):
        return False
    needed = {(p.tensor, p.begin) for p in plan.items[item_id].pieces
              if p.tensor != HEADER and name in tensor_passes(plan.tensors[p.tensor])}
    return needed <= {(row[0], row[1]) for row in rows}


class Facts:
    """Per-tensor facts of the statistics passes, as their results come in."""

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self.by_tensor: dict[int, Any] = {}
        self._open: dict[tuple[str, int], dict[int, Any]] = {}  # (pass, tensor) -> piece begin -> result
        self._pieces: dict[tuple[str, int], frozenset[int]] = {}  # the first elements of a tensor's pieces
        self._done: set[tuple[str, int]] = set()  # reduced
        for name in statistics_passes(plan):
            for t, begins in _piece_begins(plan, name).items():
                self._pieces[(name, t)] = frozenset(begins)

    def add(self, name: str, rows: list[Row]) -> None:
        """One item's results of pass `name`; a tensor whose pieces are all in is reduced now.
        A row that is no piece of the plan's (read from a damaged journal) is an OutputError."""
        for tensor, begin, result in rows:
            key = (name, tensor)
            if key in self._done:
                continue  # a piece recorded twice (an item run again after its worker died)
            if begin not in self._pieces.get(key, ()):
                raise OutputError(f"{name}: a result recorded for tensor {shown(tensor)} at element {shown(begin)} "
                                  "is no piece of this plan's; the resume journal is damaged: rerun with "
                                  "--overwrite to start over")
            got = self._open.setdefault(key, {})
            got[begin] = result
            if len(got) == len(self._pieces[key]):
                self._reduce(name, tensor)

    def _reduce(self, name: str, tensor: int) -> None:
        t = self._plan.tensors[tensor]
        results = sorted(self._open.pop((name, tensor)).items())
        # What the journal kept is data: any failure to reduce it, or facts unlike those the
        # method records, mean it was damaged.
        try:
            facts = METHODS[t.method].reduce(name, t, results, self.by_tensor.get(tensor))
            problem = facts_problem(t, facts, _passes_to(t, name))
        except (ArithmeticError, AttributeError, LookupError, TypeError, ValueError) as e:
            problem = f"{type(e).__name__}: {shown(str(e), 200)}"
        if problem:
            raise OutputError(f"{name}: the results recorded for {t.name} do not add up ({problem}); the resume "
                              "journal is damaged: rerun with --overwrite to start over")
        self.by_tensor[tensor] = facts
        self._done.add((name, tensor))

    def settle(self, name: str) -> list[int]:
        """Before pass `name` runs: a tensor whose facts say it needs the pass no more (an iterative
        method's, converged: Method.needs) is done with it, and its pieces are skipped. Returns
        those tensors."""
        skipped = []
        for key in [k for k in self._pieces if k[0] == name and k not in self._done]:
            t = self._plan.tensors[key[1]]
            if not METHODS[t.method].needs(name, self.by_tensor.get(key[1])):
                self._done.add(key)
                self._open.pop(key, None)
                skipped.append(key[1])
        return skipped

    def wanted(self, name: str, item_id: int) -> bool:
        """Whether the item holds a piece of a tensor still open in pass `name`."""
        return any((name, p.tensor) in self._pieces and (name, p.tensor) not in self._done
                   for p in self._plan.items[item_id].pieces)

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
    """A manifest's facts (by tensor name) for the plan's tensors that have statistics passes (by
    index). InputError where a tensor's facts are missing or unlike what its passes record: a
    worker given them would fail, or compute other bytes."""
    named = named if isinstance(named, dict) else {}
    out = {}
    for i, t in enumerate(plan.tensors):
        passes = _passes_to(t)
        if not passes or not math.prod(t.shape):  # no facts, or no piece to read them
            continue
        facts = named.get(t.name)
        problem = "none recorded" if facts is None else facts_problem(t, facts, passes)
        if problem:
            raise InputError(f"the manifest lacks the statistics facts of {t.name} that recomputing {t.method} "
                             f"needs ({problem}); this manifest was damaged or written by hand")
        out[i] = facts
    return out


def facts_problem(t: TensorPlan, facts: Any, passes: list[str]) -> str | None:
    """Why `facts` are not what tensor t's statistics `passes` record, as its method says."""
    return METHODS[t.method].facts_problem(t, facts, passes)


def _passes_to(t: TensorPlan, name: str | None = None) -> list[str]:
    """Tensor t's statistics passes, in the order they run: all, or up to `name` (included)."""
    passes = [p for p in tensor_passes(t) if p != ELEMENTWISE]
    return passes[:passes.index(name) + 1] if name in passes else passes


def _piece_begins(plan: Plan, name: str) -> dict[int, list[int]]:
    needs = [name in tensor_passes(t) for t in plan.tensors]
    begins: dict[int, list[int]] = {}
    for item in plan.items:
        for p in item.pieces:
            if p.tensor != HEADER and needs[p.tensor]:
                begins.setdefault(p.tensor, []).append(p.begin)
    return begins
