"""Values kept between passes, the driver's side (docs/ARCHITECTURE.md: values kept between passes).

A method may keep per-element values of a piece from one statistics pass to the next (karcher's
mean, so that iteration k does not compute iterations 1 .. k-1 again). The worker returns them as a
second object that the driver never fetches: Ray's object store holds it on the worker's node. The
object holds only the values that pass made; the driver holds, per item, the references to every
object holding a value no later pass replaced (a piece's value of a name: the StatsResult lists
what a pass kept), hands them all to the item's next pass and to its elementwise pass, and drops
each once later passes replaced all it holds or read it for the last time (`Method.spends`), and
all once the item is written. So a value kept
once (karcher's tangent) is not copied into the object store again by each pass that only reads
it. Kept values only save time: where none arrive (the budget below exceeded, an object lost with
its node, a resumed run, `raymerge verify`, a value no BF16 holds: steps.keep) the worker computes
them again, to the same bits.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import RayError

from raymerge.methods import METHODS
from raymerge.planning.plan import Plan
from raymerge.safetensors.dtypes import ITEMSIZE

if TYPE_CHECKING:
    from raymerge.execution.worker import KeptName

log = logging.getLogger("raymerge")

BUDGET_SHARE = 0.5  # of the cluster's object store the values of one pass may take (the rest: its next)


def kept_bytes(plan: Plan) -> int:
    """The most bytes the plan's methods keep after one pass (Method.keeps: per element)."""
    return sum(t.nbytes // ITEMSIZE[t.dtype] * METHODS[t.method].keeps(t) for t in plan.tensors if t.terms)


class KeptValues:
    """Per item, the references to what its passes kept that a later pass may still read, with the
    values (worker.KeptName) each still holds; the calls that hand them on."""

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        need = kept_bytes(plan)
        store = ray.cluster_resources().get("object_store_memory", 0)
        self.on = 0 < need <= BUDGET_SHARE * store
        if need and not self.on:
            log.info("execute: the values passes keep (%.2f GiB) exceed %.0f%% of the object store (%.2f GiB): "
                     "each pass computes them again", need / 2**30, 100 * BUDGET_SHARE, store / 2**30)
        # item -> [(reference, the values in it no later pass of the item kept again)], oldest first
        self._refs: dict[int, list[tuple[Any, frozenset[KeptName]]]] = {}
        self._next: dict[int, Any] = {}  # item -> what its running pass will keep

    def _given(self, item: int) -> tuple[list[Any], dict[str, Any]]:
        """The references an item's next pass gets, and the `live` values of each (worker.merged)."""
        chain = self._refs.get(item, [])
        return [ref for ref, _ in chain], {"live": [sorted(names) for _, names in chain]} if chain else {}

    def stats(self, actor: Any, item: int, name: str, facts: dict) -> Any:
        """Statistics pass `name` of an item on actor; the reference to its StatsResult."""
        if not self.on:
            return actor.stats.remote(item, name, facts)
        refs, live = self._given(item)
        result, self._next[item] = actor.stats_kept.options(num_returns=2).remote(item, name, facts, *refs, **live)
        return result

    def run(self, actor: Any, item: int, handle: str, facts: dict) -> Any:
        """The item's elementwise pass on actor, with what its statistics passes kept."""
        refs, live = self._given(item)
        return actor.run.remote(item, handle, facts, *refs, **live)

    def finished(self, item: int, names: tuple[KeptName, ...] = (), spent: tuple[KeptName, ...] = ()) -> None:
        """The item's pass is done, having kept `names` (none: its object is dropped): those are
        what the next passes read of them; the earlier values it `spent` (Method.spends) are read no
        more. An earlier object that holds nothing still read is freed."""
        ref = self._next.pop(item, None)
        gone = set(names) | set(spent)
        chain = self._without(item, gone.__contains__)
        if ref is not None and names:
            chain.append((ref, frozenset(names)))
        self._set(item, chain)

    def skipped(self, name: str, tensors: list[int]) -> None:
        """Pass `name` will not run for `tensors` (their facts say they need it no more: a karcher
        tensor that converged): what it would have read last of their pieces (Method.spends) is read
        no more. An item all of whose pieces skip it runs no pass that could take in their values
        (worker.MergeWorker._carry), so its object holding only those is freed here."""
        spends = {t: set(METHODS[self._plan.tensors[t].method].spends(name)) for t in tensors}
        spends = {t: names for t, names in spends.items() if names}
        if spends:
            for item in list(self._refs):
                self._set(item, self._without(item, lambda n: n[2] in spends.get(n[0], ())))

    def _without(self, item: int, gone: Callable[[KeptName], bool]) -> list[tuple[Any, frozenset[KeptName]]]:
        """The item's chain less the values `gone` says are read no more, and less the objects
        left holding none."""
        chain = [(r, frozenset(n for n in live if not gone(n))) for r, live in self._refs.get(item, [])]
        return [(r, live) for r, live in chain if live]

    def _set(self, item: int, chain: list[tuple[Any, frozenset[KeptName]]]) -> None:
        if chain:
            self._refs[item] = chain
        else:
            self._refs.pop(item, None)

    def written(self, item: int) -> None:
        """The item's output is written: what its passes kept is freed."""
        self._refs.pop(item, None)

    def lost(self, item: int) -> None:
        """What the item's passes kept was lost (its node died): the next try computes it again."""
        self._refs.pop(item, None)
        failed = self._next.pop(item, None)
        if failed is not None:  # the failed pass's own: its error read here, or Ray logs it as unhandled
            with contextlib.suppress(RayError):
                ray.get(failed, timeout=0)
