"""The Python face: resolve -> plan -> execute -> commit, with the CLI's options.

    import raymerge
    result = raymerge.merge(base="s3://m/base", chat="s3://m/chat", cp="s3://m/cp", out="s3://m/out", scale=0.5)
    raymerge.extract(base="s3://m/base", chat="s3://m/chat", out="s3://m/vec")
    raymerge.apply(cp="s3://m/cp", vector=["s3://m/vec", "s3://m/vec2"], scale=[0.5, 0.5], out="s3://m/out2")
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from raymerge import __version__
from raymerge.commit.committer import commit
from raymerge.commit.manifest import MANIFEST_NAME, build_manifest
from raymerge.commit.stats import tensor_stats
from raymerge.config import Recipe, RunOptions, build_recipe
from raymerge.errors import InputError, OutputError
from raymerge.plan import Plan
from raymerge.planning.inputs import resolve
from raymerge.planning.planner import S3_MAX_PARTS, S3_MIN_PART, PlanOptions, RecipeSpec, TermSpec, build_plan
from raymerge.safetensors.index import INDEX_NAME
from raymerge.storage import urls
from raymerge.storage.writers import Output, open_output

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
    """Resolve -> plan -> execute -> commit."""
    from raymerge.execution.dispatch import PoolOptions, execute
    from raymerge.execution.progress import Progress

    if not recipe.out:
        raise InputError(f"{recipe.kind} needs --out: where the checkpoint goes (a local path or s3://)")
    started = time.perf_counter()
    the_plan = make_plan(recipe, run_options)
    output = open_output(recipe.out, run_options.storage_options)
    _check_output(output, the_plan, run_options.overwrite)
    pool = PoolOptions(workers=run_options.workers, cpus_per_worker=run_options.cpus_per_worker,
                       in_flight=run_options.in_flight)
    with ray_session(run_options.address):
        handles = output.prepare([(s.name, s.size) for s in the_plan.shards])
        try:
            progress = Progress(the_plan.output_bytes, len(the_plan.items))
            results = execute(the_plan, output.url, handles, run_options.storage_options, pool, progress)
            execute_seconds = progress.elapsed
            stats = tensor_stats(the_plan, results)
            manifest = build_manifest(the_plan, KINDS[recipe.kind], _redacted(recipe.to_mapping()), results,
                                      __version__)
            commit(the_plan, output, handles, results, manifest, stats, run_options.storage_options)
        except BaseException:
            output.abort([s.name for s in the_plan.shards], handles)
            raise
    seconds = time.perf_counter() - started
    peaks: dict[str, int] = {}
    for r in results.values():
        peaks[r.worker] = max(peaks.get(r.worker, 0), r.peak_rss)
    progress_log.info("done: %.2f GB written to %s; execute %.1fs (%.2f GB/s), %.1fs in all", the_plan.output_bytes / 1e9,
             urls.redact(output.url), execute_seconds, the_plan.output_bytes / max(execute_seconds, 1e-9) / 1e9,
             seconds)
    return MergeResult(output.url, recipe.kind, the_plan.hash, [s.name for s in the_plan.shards],
                       the_plan.output_bytes, the_plan.read_bytes, seconds, execute_seconds, peaks)


KINDS = {"merge": "chat vector merge", "extract": "chat vector", "apply": "chat vector apply"}


def _redacted(mapping: dict[str, Any]) -> dict[str, Any]:
    def one(v: Any) -> Any:
        if isinstance(v, str):
            return urls.redact(v)
        if isinstance(v, list):
            return [one(x) for x in v]
        return v
    return {k: one(v) for k, v in mapping.items()}


def _check_output(output: Output, the_plan: Plan, overwrite: bool) -> None:
    """Refuse an output that is (or holds, or lies in) an input, or that holds a checkpoint."""
    for f in the_plan.files:
        folder = f.url.rsplit("/", 1)[0]
        if urls.is_inside(folder, output.url) or urls.is_inside(output.url, folder):
            raise OutputError(f"--out {urls.redact(output.url)}: overlaps the input {urls.redact(f.url)}; "
                              "inputs are never modified: choose another output location")
    existing = [n for n in output.listing() if _is_checkpoint_file(n)]
    if existing and not overwrite:
        raise OutputError(f"--out {urls.redact(output.url)}: already holds a checkpoint "
                          f"({', '.join(existing[:3])}); choose another location or pass --overwrite")
    if existing:
        # The manifest goes first, so the folder never looks complete while it is half replaced.
        output.delete(sorted(existing, key=lambda n: (n != MANIFEST_NAME, n != INDEX_NAME, n)))


def _is_checkpoint_file(name: str) -> bool:
    return name in (MANIFEST_NAME, INDEX_NAME) or name.endswith(".safetensors")


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use the Ray this process already joined; else join `address` or RAY_ADDRESS (inside
    `ray job submit`); else start a private local Ray for this run and stop it afterwards."""
    import ray

    if ray.is_initialized():
        yield
        return
    temp_dir = None
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # A short private temp dir (Ray's socket paths must stay short), loopback only.
        temp_dir = tempfile.mkdtemp(prefix="raymerge-", dir="/tmp")
        # A private cluster on loopback serves this process alone: no token, no interface address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", _temp_dir=temp_dir, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


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
