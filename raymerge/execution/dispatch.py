"""Run a plan's items on a pool of Ray actors, a bounded number in flight per actor.

The driver sends item ids (and the staged target of the item's shard), never tensor data:
workers read their inputs from storage and write their bytes to the output themselves. Results
arrive in completion order (`ray.wait`). Items are idempotent, so the items of a worker that died
(killed, out of memory, its node lost) simply go back to the queue.

Protocol (driver side):
  1. `WorkerPool(...)` starts the actors; `start()` waits until each has checked its node's view of
     local paths and reported ready. A worker that dies while starting (node preempted, out of
     memory while importing) is replaced, as a busy one is; the pool gives up only when no worker
     can start at all, after a bounded number of attempts, with the workers' own error.
  2. `drive(todo, submit, on_result, on_lost)` runs the items (`submit(actor, item_id)` calls the
     actor's `run` or `stats` and returns the reference), once per pass; a replacement worker joins
     once ready. An item whose argument object was lost (what an earlier pass kept, on a node that
     died) goes back to the queue after `on_lost(item_id)`, which drops that argument.
  3. `kill()` when done.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayError, RayTaskError

from raymerge.errors import ExecutionError, RaymergeError
from raymerge.execution.nodes import NodeView
from raymerge.execution.worker import MergeWorker
from raymerge.planning.plan import Plan

log = logging.getLogger("raymerge.progress")


@dataclass(frozen=True, slots=True)
class PoolOptions:
    workers: int | None = None  # None: as many as the cluster's CPUs (or GPUs) allow
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # > 0: the arithmetic runs on the worker's GPU
    worker_resource: str | None = None  # a custom resource the chosen nodes advertise
    in_flight: int = 2  # items per worker at once: one reading while another computes or writes
    start_timeout: float = 120.0
    max_attempts: int = 4  # times one item may lose its worker before the run gives up

    @classmethod
    def of(cls, run_options: Any) -> PoolOptions:
        """The pool's settings from a run's options (config.RunOptions), field by name: a new pool
        option is a row of config.OPTIONS, a RunOptions field and a field here."""
        return cls(**{f.name: getattr(run_options, f.name) for f in dataclasses.fields(cls)
                      if hasattr(run_options, f.name)})


def worker_count(options: PoolOptions) -> int:
    """Workers to start: --workers, or as many as the cluster's resources hold. A request the
    cluster cannot hold at all fails now, not after the start-up timeout."""
    have = ray.cluster_resources()
    need = {"CPU": options.cpus_per_worker, "GPU": options.gpus_per_worker}
    if options.worker_resource:
        need[options.worker_resource] = WORKER_RESOURCE_UNIT
    fits = min(int(have.get(k, 0) // v) for k, v in need.items() if v > 0)
    if fits == 0:
        missing = ", ".join(f"{v:g} {k}" for k, v in need.items() if v > 0 and have.get(k, 0) < v)
        raise ExecutionError(f"execute: no node of the cluster can hold one worker ({missing} asked, "
                             f"the cluster has {dict((k, have.get(k, 0)) for k in need)}); lower --cpus-per-worker "
                             "or --gpus-per-worker, or check --worker-resource and the nodes' resources")
    return options.workers or max(1, fits)


WORKER_RESOURCE_UNIT = 0.001  # of --worker-resource per worker: marks the nodes, barely limits them


class WorkerPool:
    """Slots of actors; a slot whose actor died gets a new one, used once it reports ready."""

    def __init__(self, plan: Plan, out_url: str, storage_options: dict[str, Any], env: dict[str, str],
                 options: PoolOptions, view: NodeView | None = None) -> None:
        n = worker_count(options)
        resources = {options.worker_resource: WORKER_RESOURCE_UNIT} if options.worker_resource else None
        # SPREAD: workers go to as many nodes as possible, so reads and writes use every node's network.
        actor_cls = ray.remote(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker or None,
                               resources=resources, max_concurrency=options.in_flight,
                               scheduling_strategy="SPREAD")(MergeWorker)
        plan_ref = ray.put(plan)
        threads = max(1, int(options.cpus_per_worker))
        device = "cuda" if options.gpus_per_worker > 0 else "cpu"
        self._new_actor = lambda: actor_cls.remote(plan_ref, out_url, storage_options, env, threads, device, view)
        self._options = options
        self.size = n
        self.actors = [self._new_actor() for _ in range(n)]
        self.ready = [False] * n
        self.load = [0] * n
        self.generation = [0] * n  # bumped when a slot gets a new actor
        self.replacements = 2 * n + 2  # for workers lost while starting or while busy
        self.start_errors: list[str] = []
        self.starting: dict[Any, tuple[int, int]] = {a.ready.remote(): (i, 0) for i, a in enumerate(self.actors)}

    def start(self) -> None:
        """Wait until every worker is ready or could not be replaced; at least one must be."""
        try:
            while self.starting:
                done, _ = ray.wait(list(self.starting), num_returns=1, timeout=self._options.start_timeout)
                if not done:
                    break
                self._started(done[0])
        except RaymergeError:
            self.kill()
            raise
        if not any(self.ready):
            self.kill()
            raise self._none_started()
        if self.starting:
            log.warning("execute: %d of %d workers are still starting after %.0fs; going on without them until "
                        "they are ready", len(self.starting), len(self.actors), self._options.start_timeout)

    def _none_started(self) -> ExecutionError:
        if self.start_errors:
            return ExecutionError(f"execute: no worker could start ({len(self.start_errors)} attempts); the last "
                                  f"one: {self.start_errors[-1]}; is raymerge installed on every node, and do the "
                                  "nodes have the memory? (see the Ray logs)")
        free = ray.available_resources().get("CPU", 0.0)
        return ExecutionError(
            f"execute: {len(self.actors)} workers did not start within {self._options.start_timeout:.0f}s "
            f"({free:g} CPUs free in the cluster, {self._options.cpus_per_worker:g} asked per worker); "
            "lower --workers or --cpus-per-worker, or add nodes")

    def busy(self) -> int:
        """Workers with an item in hand."""
        return sum(1 for load in self.load if load > 0)

    def replace(self, i: int) -> None:
        """Slot i's actor died: start another, which takes items once it is ready."""
        ray.kill(self.actors[i])
        self.ready[i] = False
        self.load[i] = 0
        self.generation[i] += 1
        if self.replacements > 0:
            self.replacements -= 1
            self.actors[i] = self._new_actor()
            self.starting[self.actors[i].ready.remote()] = (i, self.generation[i])

    def drive(self, todo: list[int], submit: Callable[[Any, int], Any], on_result: Callable[[Any], None],
              on_lost: Callable[[int], None] | None = None) -> int:
        """Run items `todo`, calling `on_result` as each finishes (in the driver, in completion order).
        Returns how many items were run again because their worker died or an argument was lost."""
        queue = collections.deque(todo)
        attempts: collections.Counter[int] = collections.Counter()
        pending: dict[Any, tuple[int, int, int]] = {}  # ref -> (slot, generation, item id)
        while queue or pending:
            for i, actor in enumerate(self.actors):
                while self.ready[i] and self.load[i] < self._options.in_flight and queue:
                    item_id = queue.popleft()
                    ref = submit(actor, item_id)
                    pending[ref] = (i, self.generation[i], item_id)
                    self.load[i] += 1
            if not pending and not self.starting:
                raise ExecutionError("execute: every worker died and none could be started; see the Ray logs "
                                     "(out of memory is the usual cause: lower --item-size or --in-flight)")
            done, _ = ray.wait(list(pending) + list(self.starting), num_returns=1,
                               timeout=None if pending else self._options.start_timeout)
            if not done:
                raise ExecutionError(f"execute: no worker could be started in {self._options.start_timeout:.0f}s "
                                     "after the others died; the cluster lacks the CPUs (a node was lost?)")
            for ref in done:
                if ref in self.starting:
                    self._started(ref)
                else:
                    self._finished(ref, pending.pop(ref), queue, attempts, on_result, on_lost)
        return sum(attempts.values())

    def _started(self, ref) -> None:
        i, gen = self.starting.pop(ref)
        try:
            ray.get(ref)
        except RayTaskError as e:  # ready() raised: the node's view of local paths is wrong
            if isinstance(e.cause, RaymergeError):
                raise e.cause from None
            self._start_failed(i, gen, f"{type(e.cause).__name__}: {e.cause}")
            return
        except RayActorError as e:  # died while starting: killed, out of memory, its constructor raised
            self._start_failed(i, gen, start_error(e))
            return
        if gen == self.generation[i]:
            self.ready[i] = True
            if gen:
                log.info("execute: a replacement worker is ready")

    def _start_failed(self, i: int, gen: int, why: str) -> None:
        self.start_errors.append(why)
        if gen == self.generation[i]:
            log.warning("execute: a worker died while starting (%s); starting another", why)
            self.replace(i)

    def _finished(self, ref, where: tuple[int, int, int], queue, attempts, on_result, on_lost) -> None:
        i, gen, item_id = where
        if gen == self.generation[i]:
            self.load[i] -= 1
        try:
            result = ray.get(ref)
        except (ObjectLostError, RayTaskError) as e:
            lost = e if isinstance(e, ObjectLostError) else e.cause
            if on_lost is None or not isinstance(lost, ObjectLostError) or attempts[item_id] >= self._options.max_attempts:
                _raise_failure(item_id, e)
            attempts[item_id] += 1
            log.warning("execute: item %d lost what an earlier pass kept (%s); it runs again, computing it anew",
                        item_id, type(lost).__name__)
            on_lost(item_id)
            queue.appendleft(item_id)
            return
        except RayActorError as e:
            attempts[item_id] += 1
            if attempts[item_id] >= self._options.max_attempts:
                raise ExecutionError(f"execute: item {item_id} lost its worker {attempts[item_id]} times; see the "
                                     "Ray logs for why workers died (out of memory is the usual cause: lower "
                                     "--item-size or --in-flight)") from e
            queue.appendleft(item_id)
            if gen == self.generation[i]:
                log.warning("execute: a worker died (%s); its items go to the others and a new one starts",
                            type(e).__name__)
                self.replace(i)
            return
        except RayError as e:  # Ray's own failures, with their reason
            _raise_failure(item_id, e)
        on_result(result)

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a)


def _raise_failure(item_id: int, e: RayError) -> NoReturn:
    """Raise the run's error for an item that failed: a worker's own (a RaymergeError raised in
    it), or the exception it raised, or Ray's failure with its reason."""
    if isinstance(e, RayTaskError):
        if isinstance(e.cause, RaymergeError):
            raise e.cause from None
        raise ExecutionError(f"execute: item {item_id} failed on a worker: {e.cause!r}") from e
    raise ExecutionError(f"execute: item {item_id} failed in Ray: {e}") from e


def start_error(e: RayActorError) -> str:
    """One line saying why an actor died while starting: its constructor's exception, or how its
    process ended, from what Ray reports."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", getattr(e, "error_msg", "") or str(e))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not set(line.strip()) <= set("^~")]
    if getattr(e, "actor_init_failed", False) and lines:
        return lines[-1][:300]  # the exception line of the constructor's traceback
    detail = re.search(r"Worker exit detail: ([^.]*\.)", text)
    return (detail.group(1) if detail else lines[0] if lines else type(e).__name__)[:300]
