"""The Python face: resolve -> plan -> execute -> commit, with the CLI's options.

    import raymerge
    result = raymerge.merge(base="s3://m/base", chat="s3://m/chat", cp="s3://m/cp", out="s3://m/out", scale=0.5)
    raymerge.extract(base="s3://m/base", chat="s3://m/chat", out="s3://m/vec")
    raymerge.apply(cp="s3://m/cp", vector=["s3://m/vec", "s3://m/vec2"], scale=[0.5, 0.5], out="s3://m/out2")
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from raymerge import __version__
from raymerge.commit.committer import commit
from raymerge.commit.manifest import MANIFEST_NAME, build_manifest
from raymerge.commit.stats import STATS_NAME, tensor_stats
from raymerge.config import Recipe, RunOptions, build_recipe
from raymerge.errors import InputError, OutputError, RaymergeError
from raymerge.execution.journal import Journal, JournalState
from raymerge.execution.worker import ItemResult
from raymerge.plan import Plan
from raymerge.planning.inputs import AUX_FILES, resolve
from raymerge.planning.planner import S3_MAX_PARTS, S3_MIN_PART, PlanOptions, RecipeSpec, TermSpec, build_plan
from raymerge.safetensors.index import INDEX_NAME
from raymerge.storage import urls
from raymerge.storage.checksum import crc32
from raymerge.storage.writers import FINAL, GONE, Output, open_output

log = logging.getLogger("raymerge")
progress_log = logging.getLogger("raymerge.progress")


@dataclass(frozen=True)
class MergeResult:
    """What a run produced (merge, extract and apply alike)."""

    out: str
    kind: str
    plan_hash: str
    shards: list[str]
    output_bytes: int
    read_bytes: int
    seconds: float  # the whole run, Ray start-up included
    execute_seconds: float  # the execute phase alone
    peak_rss: dict[str, int]  # worker -> bytes
    items: int = 0
    items_done_before: int = 0  # by the interrupted run that --resume continued
    items_retried: int = 0  # items run again because their worker died
    worker_seconds: dict[str, float] | None = None  # read, compute, write, checksum (summed over workers)
    steady_gbps: float = 0.0  # output GB/s between 10% and 90% of the execute phase's bytes

    def report(self) -> dict:
        """The run report, as `--report FILE.json` saves it."""
        return {"kind": self.kind, "out": urls.redact(self.out), "plan_hash": self.plan_hash, "shards": self.shards,
                "bytes_written": self.output_bytes, "bytes_read": self.read_bytes, "wall_seconds": self.seconds,
                "execute_seconds": self.execute_seconds, "gbps": self.gbps, "steady_gbps": self.steady_gbps,
                "items": self.items,
                "items_done_before": self.items_done_before, "items_retried": self.items_retried,
                "peak_rss_per_worker": self.peak_rss, "worker_seconds": self.worker_seconds}

    @property
    def gbps(self) -> float:
        """Output GB/s over the execute phase."""
        return self.output_bytes / self.execute_seconds / 1e9 if self.execute_seconds else 0.0


def merge(base: str, chat: str | list[str], cp: str, out: str, *, scale: float | list[float] | None = None,
          vocab: str = "overlap", skip: list[str] | None = None, special_tokens: str | None = None,
          chat_template: bool = True, dtype: str | None = None, **options: Any) -> MergeResult:
    """`out = cp + sum_i scale_i * (chat_i - base)` in float32, rounded once to the output dtype.

    `chat` and `scale` may be lists (one scale per chat model, in order); `options` are the run
    options of the CLI (shard_size, item_size, workers, address, storage_options, overwrite, ...).
    """
    return run(*build_recipe("merge", dict(base=base, chat=chat, cp=cp, out=out, scale=scale, vocab=vocab,
                                           skip=skip, special_tokens=special_tokens,
                                           chat_template=chat_template, dtype=dtype, **options)))


def extract(base: str, chat: str, out: str, *, dtype: str = "float32", **options: Any) -> MergeResult:
    """Store the chat vector `chat - base` as a checkpoint (float32 by default, so that applying
    it gives exactly the bits of a direct merge)."""
    return run(*build_recipe("extract", dict(base=base, chat=chat, out=out, dtype=dtype, **options)))


def apply(cp: str, vector: str | list[str], out: str, *, scale: float | list[float] | None = None,
          vocab: str = "overlap", skip: list[str] | None = None, chat_template: bool = True,
          dtype: str | None = None, **options: Any) -> MergeResult:
    """`out = cp + sum_i scale_i * vector_i` for stored vectors, one scale per vector, in order."""
    return run(*build_recipe("apply", dict(cp=cp, vector=vector, out=out, scale=scale, vocab=vocab, skip=skip,
                                           chat_template=chat_template, dtype=dtype, **options)))


def plan(base: str | None = None, chat: str | list[str] | None = None, cp: str | None = None, *,
         kind: str = "merge", out: str | None = None, **values: Any) -> Plan:
    """The plan of a run, made from the inputs' headers alone: no tensor data moves, nothing is written."""
    recipe, run_options = build_recipe(kind, dict(base=base, chat=chat, cp=cp, out=out, **values))
    return make_plan(recipe, run_options)


def make_plan(recipe: Recipe, run_options: RunOptions) -> Plan:
    spec = resolve_recipe(recipe, run_options.storage_options)
    s3 = recipe.out is not None and urls.protocol(recipe.out) == "s3"
    options = PlanOptions(shard_size=run_options.shard_size, item_size=run_options.item_size, dtype=recipe.dtype,
                          min_part=S3_MIN_PART if s3 else 0, max_parts=S3_MAX_PARTS if s3 else 0)
    started = time.perf_counter()
    result = build_plan(spec, options)
    log.info("plan: %d tensors, %d shards, %d items, %.2f GB out, in %.2fs (hash %s)", len(result.tensors),
             len(result.shards), len(result.items), result.output_bytes / 1e9, time.perf_counter() - started,
             result.hash[:12])
    return result


def resolve_recipe(recipe: Recipe, storage_options: dict[str, Any]) -> RecipeSpec:
    """Phase 1: resolve every input of the recipe (concurrently; each URL once)."""
    started = time.perf_counter()
    roles: dict[str, str] = {}
    if recipe.cp:
        roles[recipe.cp] = "cp"
    if recipe.base:
        roles.setdefault(recipe.base, "base")
    for i, (url, _) in enumerate(recipe.chats):
        roles.setdefault(url, "chat" if i == 0 else f"chat[{i + 1}]")
    for i, (url, _) in enumerate(recipe.vectors):
        roles.setdefault(url, "vector" if i == 0 else f"vector[{i + 1}]")
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = dict(zip(roles, pool.map(lambda u: resolve(roles[u], u, storage_options), roles)))
    log.info("resolve: %d inputs, %d shards, in %.2fs", len(found), sum(len(c.files) for c in found.values()),
             time.perf_counter() - started)
    cp = found.get(recipe.cp) if recipe.cp else None
    base = found.get(recipe.base) if recipe.base else None
    first_chat = found[recipe.chats[0][0]] if recipe.chats else None
    if recipe.kind == "apply":
        terms = tuple(TermSpec(s, found[u], None) for u, s in recipe.vectors)
        template = found[recipe.vectors[0][0]]
    else:
        terms = tuple(TermSpec(s, found[u], base) for u, s in recipe.chats)
        template = first_chat
    if recipe.special_tokens and first_chat is None:
        raise InputError("--special-tokens takes rows from a chat model: use it with merge, not apply")
    return RecipeSpec(anchor=cp, terms=terms, vocab=recipe.vocab, skip=recipe.skip,
                      special_tokens=recipe.special_tokens, special_from=first_chat,
                      template_from=template if recipe.chat_template and recipe.kind != "extract" else None,
                      aux_from=first_chat if recipe.kind == "extract" else cp)


def run(recipe: Recipe, run_options: RunOptions) -> MergeResult:
    """Resolve -> plan -> execute -> commit; with `resume`, continue the unfinished run at `out`."""
    from raymerge.execution.dispatch import execute, worker_count
    from raymerge.execution.progress import Progress

    if not recipe.out:
        raise InputError(f"{recipe.kind} needs --out: where the checkpoint goes (a local path or s3://)")
    started = time.perf_counter()
    the_plan = make_plan(recipe, run_options)
    output = open_output(recipe.out, run_options.storage_options)
    state = Journal.load(output)
    _check_output(output, the_plan, run_options, unfinished=state is not None)
    previous = _previous_run(output, the_plan, run_options, state)
    with ray_session(run_options.address):
        worker_count(_pool(run_options))  # a cluster that cannot hold one worker fails before anything is written
        if previous is not None:
            handles, results, next_batch = previous
            journal = Journal(output, next_batch=next_batch)
        else:
            handles, results = output.prepare([(s.name, s.size) for s in the_plan.shards]), {}
            journal = Journal.begin(output, the_plan, handles)
        todo = [i.id for i in the_plan.items if i.id not in results]
        progress = Progress(the_plan.output_bytes, len(the_plan.items),
                            done_bytes=sum(the_plan.items[i].nbytes for i in results), done_items=len(results))

        retried = [0]

        def finished(result: ItemResult) -> None:
            results[result.item] = result
            journal.record(result)
            progress.add(the_plan.items[result.item].nbytes)

        try:
            _import_in_background("pyarrow.parquet")  # the commit needs it; the driver idles meanwhile
            if todo:
                retried[0] = execute(the_plan, output.url, handles, run_options.storage_options,
                                     _pool(run_options), todo, progress.start, finished)
                progress.stop()
            journal.flush(strict=True)
            stats = tensor_stats(the_plan, results)
            manifest = build_manifest(the_plan, KINDS[recipe.kind], _redacted(recipe.to_mapping()), results,
                                      __version__, _layout_options(run_options))
            commit(the_plan, output, handles, results, manifest, stats, run_options.storage_options)
        except BaseException as e:
            journal.flush()
            told = _resumable(e, len(results), len(the_plan.items))
            if told is e:
                raise
            raise told from e
    seconds = time.perf_counter() - started
    peaks: dict[str, int] = {}
    for r in results.values():
        peaks[r.worker] = max(peaks.get(r.worker, 0), r.peak_rss)
    execute_seconds = progress.elapsed if todo else 0.0
    spent = dict(zip(("read", "compute", "write", "checksum"),
                     (round(sum(r.timings[k] for r in results.values() if r.timings), 3) for k in range(4))))
    log.info("execute: worker seconds: %s", spent)
    progress_log.info("done: %.2f GB written to %s; execute %.1fs (%.2f GB/s), %.1fs in all",
                      the_plan.output_bytes / 1e9, urls.redact(output.url), execute_seconds,
                      progress.rate() / 1e9, seconds)
    return MergeResult(output.url, recipe.kind, the_plan.hash, [s.name for s in the_plan.shards],
                       the_plan.output_bytes, the_plan.read_bytes, seconds, execute_seconds, peaks,
                       len(the_plan.items), len(the_plan.items) - len(todo), retried[0], spent,
                       progress.steady_rate() / 1e9 if todo else 0.0)


def _import_in_background(module: str) -> None:
    threading.Thread(target=importlib.import_module, args=(module,), daemon=True).start()


def _pool(run_options: RunOptions):
    from raymerge.execution.dispatch import PoolOptions

    return PoolOptions(workers=run_options.workers, cpus_per_worker=run_options.cpus_per_worker,
                       in_flight=run_options.in_flight, gpus_per_worker=run_options.gpus_per_worker,
                       worker_resource=run_options.worker_resource)


def _layout_options(run_options: RunOptions) -> dict[str, int]:
    """What verify needs, besides the recipe, to plan the same layout again."""
    return {"shard_size": run_options.shard_size, "item_size": run_options.item_size}


def _previous_run(output: Output, the_plan: Plan, run_options: RunOptions, state: JournalState | None):
    """(handles, results already done, next journal batch) of an unfinished run, when resuming it."""
    if state is None:
        if run_options.resume:
            log.warning("resume: no unfinished run at %s; starting a fresh one", urls.redact(output.url))
        return None
    if not run_options.resume:
        if run_options.overwrite:
            output.abort(state.head.get("shards", []), state.head.get("handles", []))
            return None
        raise OutputError(f"--out {urls.redact(output.url)}: holds an unfinished run ({len(state.results)} items "
                          "done); pass --resume to continue it, or --overwrite to start over")
    return check_resumable(output, the_plan, state)


def check_resumable(output: Output, the_plan: Plan, state: JournalState):
    """Refuse a resume whose plan or inputs changed; keep only journaled items whose bytes are there."""
    head = state.head
    if head.get("plan_hash") != the_plan.hash:
        then = {i["url"]: i["fingerprint"] for i in head.get("inputs", [])}
        changed = [urls.redact(f.url) for f in the_plan.files if then.get(urls.redact(f.url)) not in (None, f.fingerprint)]
        why = (f"input {changed[0]} changed since" if changed else "the recipe, inputs or options differ from")
        raise OutputError(f"--resume {urls.redact(output.url)}: {why} the interrupted run (plan "
                          f"{head.get('plan_hash', '?')[:12]} then, {the_plan.hash[:12]} now); rerun with "
                          "--overwrite to start over, or with the original inputs and options")
    handles = head["handles"]
    done: dict[int, ItemResult] = {}
    for s, shard in enumerate(the_plan.shards):
        parts = output.staged_parts(shard.name, handles[s], shard.size)
        if parts == GONE or parts == FINAL and not all(i in state.results for i in shard.items):
            raise OutputError(f"--resume {urls.redact(output.url)}: the staged data of {shard.name} is gone; "
                              "rerun with --overwrite to start over")
        for i in shard.items:
            r = state.results.get(i)
            item = the_plan.items[i]
            if r is None:
                continue
            if parts == FINAL:  # an interrupted commit already put the whole shard in place
                ok = True
            elif parts is None:  # local: read the bytes back, they may not have reached the disk
                ok = crc32(output.read_staged(handles[s], item.start, item.end)) == r.crc32
            else:
                ok = parts.get(item.part) == r.etag
            if ok:
                done[i] = r
    progress_log.info("resume: %d of %d items already done (%d journaled)", len(done), len(the_plan.items),
                      len(state.results))
    return handles, done, state.head["batches"]


def _resumable(e: BaseException, done: int, total: int) -> BaseException:
    """The error of a failed run, telling how to go on from where it stopped."""
    hint = (f"{done} of {total} items are done and kept: run the same command with --resume to continue, "
            "or with --overwrite to start over")
    if isinstance(e, RaymergeError):
        return type(e)(f"{e}; {hint}")
    if isinstance(e, KeyboardInterrupt):
        progress_log.warning("interrupted; %s", hint)
    return e


KINDS = {"merge": "chat vector merge", "extract": "chat vector", "apply": "chat vector apply"}


def _redacted(mapping: dict[str, Any]) -> dict[str, Any]:
    def one(v: Any) -> Any:
        if isinstance(v, str):
            return urls.redact(v)
        if isinstance(v, list):
            return [one(x) for x in v]
        return v
    return {k: one(v) for k, v in mapping.items()}


def _check_output(output: Output, the_plan: Plan, run_options: RunOptions, unfinished: bool) -> None:
    """Refuse an output that is (or holds, or lies in) an input, or that holds a checkpoint.

    Resuming an unfinished run, shards without a manifest are those of a commit cut short:
    resume finishes it."""
    for f in the_plan.files:
        folder = f.url.rsplit("/", 1)[0]
        if urls.is_inside(folder, output.url) or urls.is_inside(output.url, folder):
            raise OutputError(f"--out {urls.redact(output.url)}: overlaps the input {urls.redact(f.url)}; "
                              "inputs are never modified: choose another output location")
    listing = output.listing()
    existing = [n for n in listing if _is_checkpoint_file(n)]
    if run_options.resume and unfinished and MANIFEST_NAME not in listing:
        return
    if existing and not run_options.overwrite:
        raise OutputError(f"--out {urls.redact(output.url)}: already holds a checkpoint "
                          f"({', '.join(existing[:3])}); choose another location or pass --overwrite")
    if existing:
        # The manifest goes first, so the folder never looks complete while it is half replaced.
        output.delete(sorted(existing, key=lambda n: (n != MANIFEST_NAME, n != INDEX_NAME, n)))


def _is_checkpoint_file(name: str) -> bool:
    """What a run writes: removed by --overwrite, so nothing of an older checkpoint stays beside it."""
    return name in (MANIFEST_NAME, INDEX_NAME, STATS_NAME, *AUX_FILES) or name.endswith(".safetensors")


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use the Ray this process already joined; else join `address` or RAY_ADDRESS (inside
    `ray job submit`); else start a private local Ray for this run and stop it afterwards."""
    import ray

    if ray.is_initialized():
        yield
        return
    temp_dir = None
    address = address or os.environ.get("RAY_ADDRESS")
    local = prefer_loopback(address)
    if address:
        ray.init(address=address, logging_level=logging.WARNING, **({"_node_ip_address": "127.0.0.1"} if local else {}))
    else:
        # A short private temp dir (Ray's socket paths must stay short), loopback only, no token:
        # this cluster serves this process alone.
        temp_dir = tempfile.mkdtemp(prefix="raymerge-", dir="/tmp")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", _temp_dir=temp_dir, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def prefer_loopback(address: str | None) -> bool:
    """For a private local Ray or a cluster on this machine, make Ray use loopback, not the
    interface address. Ray reads this at import: the CLI calls this before importing Ray."""
    host = address.split("://")[-1].rsplit(":", 1)[0] if address else None
    local = host is None or host in ("127.0.0.1", "localhost", "::1", "[::1]")
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return local


def describe(the_plan: Plan) -> dict[str, Any]:
    """The plan as JSON-able data: what `raymerge plan --json` prints."""
    return {
        "plan_hash": the_plan.hash,
        "output_bytes": the_plan.output_bytes,
        "tensor_bytes": the_plan.tensor_bytes,
        "read_bytes": the_plan.read_bytes,
        "inputs": [{"role": f.role, "url": urls.redact(f.url), "size": f.size} for f in the_plan.files],
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                     "shard": the_plan.shards[t.shard].name, "offset": t.start, "nbytes": t.nbytes,
                     "rule": t.rule, "terms": len(t.terms), "special_rows": len(t.overrides)} for t in the_plan.tensors],
        "shards": [{"name": s.name, "size": s.size, "header_bytes": len(s.header), "tensors": len(s.tensors),
                    "items": len(s.items)} for s in the_plan.shards],
        "items": [{"id": i.id, "shard": the_plan.shards[i.shard].name, "part": i.part, "start": i.start,
                   "end": i.end, "pieces": len(i.pieces)} for i in the_plan.items],
        "aux_files": [a.name for a in the_plan.aux_files],
    }
