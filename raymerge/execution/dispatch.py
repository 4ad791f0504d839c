"""Run a plan's items on a pool of Ray actors, a bounded number in flight per actor.

The driver sends item ids, never tensor data: workers read their inputs from storage and write
their bytes to the output themselves. Results arrive in completion order (`ray.wait`). Items are
idempotent, so an item whose actor died is simply run again, by Ray's task retries on the
replacement actor or by another one.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from raymerge.errors import ExecutionError, RaymergeError
from raymerge.execution.progress import Progress
from raymerge.execution.worker import ItemResult, MergeWorker
from raymerge.plan import Plan
from raymerge.storage import urls

log = logging.getLogger("raymerge.progress")


@dataclass(frozen=True, slots=True)
class PoolOptions:
    workers: int | None = None  # None: as many as the cluster's CPUs allow
    cpus_per_worker: float = 1.0
    in_flight: int = 2  # items per worker at once: one reading while another computes or writes
    start_timeout: float = 120.0
    max_attempts: int = 3


def worker_count(options: PoolOptions) -> int:
    if options.workers:
        return options.workers
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1, int(cpus // options.cpus_per_worker))


def execute(plan: Plan, out_url: str, handles: list[str], storage_options: dict[str, Any],
            options: PoolOptions, progress: Progress, todo: list[int] | None = None) -> dict[int, ItemResult]:
    """Run items `todo` (default: all) and return their results by item id."""
    n = worker_count(options)
    actor_cls = ray.remote(num_cpus=options.cpus_per_worker, max_concurrency=options.in_flight)(MergeWorker)
    plan_ref = ray.put(plan)
    env = urls.aws_env()
    threads = max(1, int(options.cpus_per_worker))

    def start_worker():
        return actor_cls.remote(plan_ref, out_url, handles, storage_options, env, threads)

    actors = [start_worker() for _ in range(n)]
    try:
        _await_ready(actors, options)
        log.info("execute: %d workers, %d items, %.2f GB to write", n, len(plan.items), plan.output_bytes / 1e9)
        progress.start()
        todo = list(range(len(plan.items))) if todo is None else todo
        return _drive(actors, start_worker, todo, plan, options, progress)
    finally:
        for a in actors:
            ray.kill(a)


def _await_ready(actors: list, options: PoolOptions) -> None:
    try:
        ray.get([a.ready.remote() for a in actors], timeout=options.start_timeout)
    except GetTimeoutError as e:
        free = ray.available_resources().get("CPU", 0.0)
        raise ExecutionError(
            f"execute: {len(actors)} workers did not start within {options.start_timeout:.0f}s "
            f"({free:g} CPUs free in the cluster, {options.cpus_per_worker:g} asked per worker); "
            "lower --workers or --cpus-per-worker, or add nodes") from e


def _drive(actors: list, start_worker, todo: list[int], plan: Plan, options: PoolOptions,
           progress: Progress) -> dict[int, ItemResult]:
    """Keep every worker `in_flight` items busy until all are done. A worker that dies is replaced
    (its items go back to the queue), up to as many replacements as there were workers."""
    queue = collections.deque(todo)
    attempts: collections.Counter[int] = collections.Counter()
    load = [0] * len(actors)
    generation = [0] * len(actors)  # bumped when slot i gets a new actor
    replacements = len(actors)
    pending: dict[Any, tuple[int, int, int]] = {}  # ref -> (slot, generation, item id)
    results: dict[int, ItemResult] = {}
    while queue or pending:
        for i, actor in enumerate(actors):
            while load[i] < options.in_flight and queue:
                item_id = queue.popleft()
                pending[actor.run.remote(item_id)] = (i, generation[i], item_id)
                load[i] += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i, gen, item_id = pending.pop(ref)
            if gen == generation[i]:
                load[i] -= 1
            try:
                result = ray.get(ref)
            except RayTaskError as e:
                if isinstance(e.cause, RaymergeError):
                    raise e.cause from None
                raise ExecutionError(f"execute: item {item_id} failed on a worker: {e.cause!r}") from e
            except RayActorError as e:
                attempts[item_id] += 1
                if attempts[item_id] >= options.max_attempts or (gen == generation[i] and replacements == 0):
                    raise ExecutionError(f"execute: item {item_id} lost its worker {attempts[item_id]} times; "
                                         "see the Ray logs for why workers died (out of memory is the usual "
                                         "cause: lower --item-size or --in-flight)") from e
                queue.appendleft(item_id)
                if gen == generation[i]:
                    log.warning("execute: a worker died; starting a new one and running its items again")
                    ray.kill(actors[i])
                    actors[i] = start_worker()
                    generation[i] += 1
                    load[i] = 0
                    replacements -= 1
                continue
            results[item_id] = result
            progress.add(plan.items[item_id].nbytes)
    return results
