"""A run, phase by phase: resolve -> plan -> execute -> commit, with the guards around them.

The order is what keeps inputs and older outputs safe:
  1. resolve and plan (headers only), and refuse an output that is, holds or lies in an input; read
     and check the aux files now, so that nothing a folder holds fails or blocks the run later;
  2. take the output's lease: from here on no other run writes there;
  3. read what the output holds (a journal, an older checkpoint) and decide: start fresh, resume,
     replace, or refuse; check the disk has room;
  4. start the workers, each checking its node sees local paths as the driver does;
  5. only now remove an unfinished run's staging (--overwrite) and stage the new shards;
  6. execute, refuse to commit non-finite output made from finite inputs, commit (an older
     checkpoint's files are replaced there, at the end), release the lease.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import posixpath
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from raymerge.commit.aux import aux_contents
from raymerge.commit.card import card_files
from raymerge.commit.committer import commit
from raymerge.commit.guard import OldCheckpoint, check_not_input, check_space, old_checkpoint
from raymerge.commit.manifest import output_files
from raymerge.commit.stats import nonfinite_totals
from raymerge.config import Recipe, RunOptions
from raymerge.errors import (CHANGED, DENIED, FULL, MISSING, ExecutionError, InputError, NonFiniteError, OutputError,
                             RaymergeError, StorageError)
from raymerge.execution.journal import Journal, JournalHead, JournalState, StatsRecord
from raymerge.execution.lease import Lease
from raymerge.execution.nodes import NodeView, driver_view, local_inputs
from raymerge.execution.passes import Facts, covers
from raymerge.execution.resume import Resumed, check_resumable
from raymerge.execution.session import ray_session
from raymerge.methods import METHODS
from raymerge.methods.steps import warm_torch
from raymerge.planning.build import input_roles, make_plan
from raymerge.planning.passes import pass_items, statistics_passes
from raymerge.planning.plan import Plan
from raymerge.records import ItemRecord
from raymerge.storage import urls
from raymerge.storage.writers import STAGING, Output, clear_staging, open_output

log = logging.getLogger("raymerge")
progress_log = logging.getLogger("raymerge.progress")


@dataclass(frozen=True)
class Outcome:
    """What a run did, for the faces to report."""

    plan: Plan
    out: str
    done: dict[int, ItemRecord]
    results: list  # this run's ItemResults (timings, memory)
    done_before: int
    retried: int
    seconds: float
    execute_seconds: float
    steady_gbps: float
    nonfinite: dict[str, tuple[int, int]]
    pass_seconds: dict[str, float]  # each statistics pass this run ran
    stats_results: list  # their StatsResults (memory)


def run(recipe: Recipe, run_options: RunOptions) -> Outcome:
    """Resolve -> plan -> execute -> commit; with `resume`, continue the unfinished run at `out`.
    The order of the steps is what keeps inputs and older outputs safe (see above)."""
    if not recipe.out:
        raise InputError(f"{recipe.kind} needs --out: where the checkpoint goes (a local path or s3://)")
    started = time.perf_counter()
    the_plan = make_plan(recipe, run_options)
    check_not_input(recipe.out, [*input_roles(recipe), *(f.url for f in the_plan.files),
                                 *(a.source for a in the_plan.aux_files)])
    aux = aux_contents(the_plan, run_options.storage_options)  # read and checked now: never after the work
    aux.update(the_plan.tokenizer)
    if the_plan.card:
        aux.update(card_files(recipe, the_plan, input_roles(recipe)))
    output = open_output(recipe.out, run_options.storage_options)
    output.protect(local_inputs(the_plan))
    lease = Lease.acquire(output, takeover=run_options.resume or run_options.overwrite,
                          advice=lambda: _how_to_go_on(output))
    try:
        r = _Run(recipe, run_options, the_plan, output, lease, aux)
        start = r.decide()
        with ray_session(run_options.address), r.probe() as view, r.workers(view) as pool:
            handles, journal = r.stage(start)  # workers are up and see what they must: only now is anything removed
            with r.keeping(journal):
                r.execute(pool, handles, journal)
                r.commit(handles, start.replaces)
        return r.outcome(started)
    finally:
        lease.release()
        output.close()


@dataclass
class _Start:
    """How this run begins: fresh (maybe clearing an unfinished run's staging first) or resumed."""

    replaces: tuple[str, ...]
    resumed: Resumed | None = None
    clear: JournalState | None = None  # an unfinished run whose staging a fresh start removes


class _Run:
    def __init__(self, recipe: Recipe, options: RunOptions, plan: Plan, output: Output, lease: Lease,
                 aux: dict[str, bytes]) -> None:
        self.recipe, self.options, self.plan, self.output, self.lease = recipe, options, plan, output, lease
        self.aux = aux  # the auxiliary files' bytes, read at plan time
        self.done: dict[int, ItemRecord] = {}
        self.facts = Facts(plan)  # what the statistics passes found
        self.stats_done: set[tuple[str, int]] = set()  # (pass, item) of the statistics passes
        self.results: list = []  # this run's ItemResults
        self.stats_results: list = []  # this run's StatsResults
        self.pass_seconds: dict[str, float] = {}
        self.done_before = self.retried = 0
        self.progress: Any = None

    def decide(self) -> _Start:
        """Fresh, resumed, replacing or refused (`_decide`), and room for it on the output's disk."""
        start = self._decide(Journal.load(self.output))
        check_space(self.output, self._bytes_to_do(), bool(start.replaces))
        return start

    @contextlib.contextmanager
    def workers(self, view: NodeView) -> Iterator[Any]:
        """The worker pool, every worker up and checked; killed when the run ends."""
        from raymerge.execution.dispatch import PoolOptions, WorkerPool

        if any(METHODS[t.method].needs_torch(t) for t in self.plan.tensors):
            warm_torch()  # the process the methods' reduce computes in: torch imported while the workers start
        o = self.options
        env = urls.worker_env([f.url for f in self.plan.files], self.output.url)
        pool = WorkerPool(self.plan, self.output.url, o.storage_options, env, PoolOptions.of(o), view)
        try:
            pool.start()
            yield pool
        finally:
            pool.kill()

    @contextlib.contextmanager
    def keeping(self, journal: Journal) -> Iterator[None]:
        """A failure keeps what is done (the journal is flushed) and says how to go on."""
        try:
            yield
        except BaseException as e:
            journal.flush()
            raise self._failed(e)

    def outcome(self, started: float) -> Outcome:
        ran = self.done_before < len(self.plan.items)
        return Outcome(self.plan, self.output.url, self.done, self.results, self.done_before, self.retried,
                       time.perf_counter() - started, self.progress.elapsed if ran else 0.0,
                       self.progress.steady_rate() / 1e9 if ran else 0.0, nonfinite_totals(self.plan, self.done),
                       self.pass_seconds, self.stats_results)

    def _bytes_done(self) -> int:
        return sum(self.plan.items[i].nbytes for i in self.done)

    def _bytes_to_do(self) -> int:
        return self.plan.output_bytes - self._bytes_done()

    def _decide(self, state: JournalState | None) -> _Start:
        """Fresh, resumed, replacing or refused, from what the output holds and the options."""
        o, shown = self.options, urls.redact(self.output.url)
        old = old_checkpoint(self.output, self.plan.card)
        if state is not None and state.head is None:
            if o.overwrite:
                return _Start(_replaced(old, state), clear=state)
            raise OutputError(f"--out {shown}: holds an unfinished run whose resume journal is damaged "
                              f"({state.problem}); rerun with --overwrite to start over")
        if state is not None:
            if o.resume:
                resumed = check_resumable(self.output, self.plan, state)
                self.done = dict(resumed.done)
                for record in state.stats:  # finished statistics are not computed again
                    self.facts.add(record.pass_name, list(record.rows))
                    if covers(self.plan, record.pass_name, record.item, record.rows):  # else done again
                        self.stats_done.add((record.pass_name, record.item))
                return _Start(resumed.replaces, resumed=resumed)
            if o.overwrite:
                return _Start(_replaced(old, state), clear=state)
            raise OutputError(f"--out {shown}: holds an unfinished run ({len(state.done)} items done); pass "
                              "--resume to continue it, or --overwrite to start over")
        if o.resume:
            log.warning("resume: no unfinished run at %s; starting a fresh one", shown)
        if old.present and not o.overwrite:
            if set(old.present) <= set(self.plan.card):  # a user's README.md, say: never written over unasked
                raise OutputError(f"--out {shown}: already holds {', '.join(old.present)}, which the model card "
                                  "would replace; choose another location, pass --no-card to leave the card out, "
                                  "or --overwrite to replace them")
            raise OutputError(f"--out {shown}: already holds a checkpoint ({', '.join(old.present[:3])}); "
                              "choose another location or pass --overwrite")
        if o.overwrite and old.strays:
            written = set(output_files(self.plan))
            kept = [n for n in old.strays if n not in written]
            replaced = [n for n in old.strays if n in written]
            if kept:
                log.warning("--overwrite: %s at %s: no manifest or index names these files, so they stay",
                            ", ".join(kept[:5]), shown)
            if replaced:
                log.warning("--overwrite: %s at %s: the new checkpoint writes files of these names, replacing "
                            "them at commit", ", ".join(replaced[:5]), shown)
        return _Start(old.removable if o.overwrite else ())

    @contextlib.contextmanager
    def probe(self) -> Iterator[NodeView]:
        """The driver's view of local paths, with a probe file in a local output's staging folder
        that every worker must read back."""
        if urls.protocol(self.output.url) != "file":
            yield driver_view(self.plan, None, None, "")
            return
        token = uuid.uuid4().hex
        name = f"probe-{token[:12]}"
        self.output.staging.put(name, token.encode())
        try:
            yield driver_view(self.plan, self.output.url, posixpath.join(self.output.url, STAGING, name), token)
        finally:
            with contextlib.suppress(RaymergeError):  # a probe left behind never hides the run's own error
                self.output.staging.delete([name])

    def stage(self, start: _Start) -> tuple[list[str], Journal]:
        """The staged targets and the journal: the interrupted run's, or new ones."""
        if start.resumed is not None:
            return start.resumed.handles, Journal(self.output, next_batch=start.resumed.next_batch)
        if start.clear is not None:  # --overwrite of an unfinished run: its staging goes, only now
            head = start.clear.head
            self.output.abort(list(head.shards) if head else [], list(head.handles) if head else None)
            clear_staging(self.output)
        handles = self.output.prepare([(s.name, s.size) for s in self.plan.shards])
        head = JournalHead.of(self.plan, handles, start.replaces, self.lease.holder.run_id,
                              self.output.identities(handles))
        return handles, Journal.begin(self.output, head)

    def execute(self, pool, handles: list[str], journal: Journal) -> None:
        """The statistics passes, then the elementwise one: every item not done yet, on the pool;
        each result journaled as it comes."""
        from raymerge.execution.kept import KeptValues
        from raymerge.execution.progress import Progress

        kept = KeptValues(self.plan)
        for name in statistics_passes(self.plan):
            self._statistics(pool, name, journal, kept)
        self.done_before = len(self.done)
        self.progress = Progress(self.plan.output_bytes, len(self.plan.items), done_bytes=self._bytes_done(),
                                 done_items=self.done_before)
        todo = [i.id for i in self.plan.items if i.id not in self.done]

        def finished(result) -> None:
            kept.written(result.item)
            self.done[result.item] = result.record
            self.results.append(result)
            journal.record(result.record)
            self.progress.add(self.plan.items[result.item].nbytes)

        _import_in_background("pyarrow.parquet")  # the commit needs it; the driver idles meanwhile
        if todo:
            self.progress.start(pool.size, pool.busy)
            progress_log.info("execute: %d workers, %d items to do", pool.size, len(todo))
            shard = [i.shard for i in self.plan.items]
            self.retried += pool.drive(todo, lambda actor, i: kept.run(actor, i, handles[shard[i]],
                                                                       self.facts.for_item(i)), finished, kept.lost)
            self.progress.stop()
        journal.flush(strict=True)

    def _statistics(self, pool, name: str, journal: Journal, kept) -> None:
        """One statistics pass: its items not done yet; the facts reduced as tensors complete."""
        kept.skipped(name, self.facts.settle(name))
        todo = [i for i in pass_items(self.plan, name)
                if (name, i) not in self.stats_done and self.facts.wanted(name, i)]
        if todo:
            started = time.perf_counter()
            progress_log.info("%s: %d workers, %d items to do", name, pool.size, len(todo))

            def finished(result) -> None:  # a StatsResult
                kept.finished(result.item, result.kept, result.spent)
                self.stats_results.append(result)
                self.facts.add(name, result.rows)
                self.stats_done.add((name, result.item))
                journal.record_stats(StatsRecord(name, result.item, tuple(result.rows)))

            self.retried += pool.drive(todo, lambda actor, i: kept.stats(actor, i, name, self.facts.for_item(i)),
                                       finished, kept.lost)
            self.pass_seconds[name] = time.perf_counter() - started
            progress_log.info("%s: done in %.1fs", name, self.pass_seconds[name])
        if not self.facts.complete(name):
            raise ExecutionError(f"{name}: some tensors' statistics are missing after the pass; rerun with --resume")

    def commit(self, handles: list[str], replaces: tuple[str, ...]) -> None:
        """Refuse non-finite output from finite inputs, and a lease taken over; else commit."""
        self._check_finite()
        self.lease.check()  # taken over meanwhile: never commit over another run
        commit(self.plan, self.output, handles, self.done, kind=self.recipe.how.manifest_kind,
               recipe=_redacted(self.recipe.to_mapping()), layout=self._layout(), facts=self.facts.named(),
               aux=self.aux, replaces=replaces)

    def _layout(self) -> dict[str, int]:
        """What verify needs, besides the recipe, to plan the same layout again."""
        return {"shard_size": self.options.shard_size, "item_size": self.options.item_size}

    def _check_finite(self) -> None:
        """Refuse to commit inf/NaN that finite inputs produced (an overflowing dtype or scale)."""
        totals = nonfinite_totals(self.plan, self.done)
        inherited = {n: c for n, (c, new) in totals.items() if c > new}
        if inherited:
            log.warning("execute: %d tensors hold inf/NaN taken from inputs that hold them (%s)", len(inherited),
                        ", ".join(f"{n}: {c}" for n, c in list(inherited.items())[:3]))
        made = {n: new for n, (_, new) in totals.items() if new}
        if made and not self.options.allow_nonfinite:
            names = ", ".join(f"{n} ({c} elements)" for n, c in list(made.items())[:5])
            more = f" and {len(made) - 5} more" if len(made) > 5 else ""
            dtype = self.recipe.dtype or "the output dtype"
            raise NonFiniteError(
                f"execute: finite inputs gave inf or NaN outputs in {len(made)} tensors: {names}{more}; "
                f"{dtype} cannot hold the results, or --scale is too large. Nothing was committed: run the same "
                "command with --resume --allow-nonfinite to commit it as it is, or change --dtype or --scale "
                "and use --overwrite")

    def _failed(self, e: BaseException) -> BaseException:
        """The error of a failed run, telling how to go on only where that can work."""
        done, total = len(self.done), len(self.plan.items)
        stats = f" (and {len(self.stats_done)} items of statistics passes)" if self.stats_done else ""
        hint = (f"{done} of {total} items{stats} are done and kept: run the same command with --resume to continue, "
                "or with --overwrite to start over")
        if isinstance(e, KeyboardInterrupt):
            progress_log.warning("interrupted; %s", hint)
            return e
        if isinstance(e, StorageError) and e.reason in CANNOT_RESUME and "--overwrite" not in str(e):
            e.args = (f"{e}; --resume cannot get past this: {CANNOT_RESUME[e.reason]}",)
        if not isinstance(e, RaymergeError) or not e.resumable:
            return e
        if isinstance(e, StorageError) and e.reason == FULL:
            free, need = self.output.free_bytes(), self._bytes_to_do()
            if free is not None and free < need:
                hint = (f"{done} of {total} items are done and kept: free at least {(need - free) / 1e9:.2f} GB "
                        f"more on the disk of {urls.redact(self.output.url)}, then run the same command with --resume")
        e.args = (f"{e}; {hint}",)
        return e


def _replaced(old: OldCheckpoint, state: JournalState) -> tuple[str, ...]:
    """What --overwrite removes at commit when it starts over from an unfinished run: the older
    checkpoint's files, and what that run was to replace or had already named (a commit cut short)."""
    names = set(old.removable)
    if state.head is not None:
        names |= set(state.head.replaces) | set(state.head.shards)
    return tuple(sorted(names))


CANNOT_RESUME = {MISSING: "fix the path or put the file back, then start over with --overwrite",
                 DENIED: "fix the permissions or credentials, then start over with --overwrite",
                 CHANGED: "an input changed during the run; start over with --overwrite"}


def _how_to_go_on(output: Output) -> str:
    """What to pass to take over an unfinished run whose driver is gone (read-only)."""
    state = Journal.load(output)
    if state is not None and state.head is None:
        return f"its resume journal is damaged ({state.problem}): pass --overwrite to start over"
    done = f" ({len(state.done)} items done)" if state is not None else ""
    return f"pass --resume to continue its work{done}, or --overwrite to start over"


def _import_in_background(module: str) -> None:
    threading.Thread(target=importlib.import_module, args=(module,), daemon=True).start()


def _redacted(mapping: dict[str, Any]) -> dict[str, Any]:
    def one(v: Any) -> Any:
        if isinstance(v, str):
            return urls.redact(v)
        if isinstance(v, list):
            return [one(x) for x in v]
        return v
    return {k: one(v) for k, v in mapping.items()}
