"""The Python face: resolve -> plan -> execute -> commit, with the CLI's options.

    import raymerge
    result = raymerge.merge(base="s3://m/base", chat="s3://m/chat", cp="s3://m/cp", out="s3://m/out", scale=0.5)
    raymerge.extract(base="s3://m/base", chat="s3://m/chat", out="s3://m/vec")
    raymerge.apply(cp="s3://m/cp", vector=["s3://m/vec", "s3://m/vec2"], scale=[0.5, 0.5], out="s3://m/out2")
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from raymerge.commit.manifest import Manifest
from raymerge.commit.verify import Redo, verify as check_checkpoint
from raymerge.config import OPTIONS, Recipe, RunOptions, build_recipe
from raymerge.execution.passes import facts_by_index
from raymerge.execution.session import prefer_loopback, ray_session  # noqa: F401  (the faces' imports)
from raymerge.methods import COMBINING
from raymerge.planning.build import describe, input_roles, make_plan, total_read_bytes  # noqa: F401  (the faces')
from raymerge.planning.plan import Plan
from raymerge.runner import run as run_phases
from raymerge.storage import urls

log = logging.getLogger("raymerge")
progress_log = logging.getLogger("raymerge.progress")


@dataclass(frozen=True, kw_only=True)
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
    nonfinite: dict[str, tuple[int, int]] = field(default_factory=dict)  # tensor -> (inf/NaN, from finite inputs)
    pass_seconds: dict[str, float] = field(default_factory=dict)  # statistics passes (TIES, DARE), before execute

    def report(self) -> dict:
        """The run report, as `--report FILE.json` saves it."""
        return {"kind": self.kind, "out": urls.redact(self.out), "plan_hash": self.plan_hash, "shards": self.shards,
                "bytes_written": self.output_bytes, "bytes_read": self.read_bytes, "wall_seconds": self.seconds,
                "execute_seconds": self.execute_seconds, "gbps": self.gbps, "steady_gbps": self.steady_gbps,
                "items": self.items,
                "items_done_before": self.items_done_before, "items_retried": self.items_retried,
                "peak_rss_per_worker": self.peak_rss, "worker_seconds": self.worker_seconds,
                "nonfinite": {name: {"elements": n, "from_finite_inputs": new}
                              for name, (n, new) in self.nonfinite.items()},
                "statistics_pass_seconds": self.pass_seconds}

    @property
    def gbps(self) -> float:
        """Output GB/s over the execute phase."""
        return self.output_bytes / self.execute_seconds / 1e9 if self.execute_seconds else 0.0


# Every face takes the run options of the CLI as keywords (checked by config.OPTIONS, like flags).
RUN_KEYWORDS = ", ".join(o.key for o in OPTIONS if o.run)


def merge(base: str, chat: str | list[str], cp: str, out: str, *, scale: float | list[float] | None = None,
          vocab: str = "overlap", skip: list[str] | None = None, special_tokens: str | None = None,
          chat_template: bool = True, dtype: str | None = None, **options: Any) -> MergeResult:
    """`out = cp + sum_i scale_i * (chat_i - base)` in float32, rounded once to the output dtype.

    `chat` and `scale` may be lists (one scale per chat model, in order); `options` are the run
    options of the CLI: {run}; and how the vectors combine: method ({methods}) and the methods'
    parameters: {parameters} (config.OPTIONS says which method takes which, and their defaults).
    """
    return run(*build_recipe("merge", dict(base=base, chat=chat, cp=cp, out=out, scale=scale, vocab=vocab,
                                           skip=skip, special_tokens=special_tokens,
                                           chat_template=chat_template, dtype=dtype, **options)))


merge.__doc__ = merge.__doc__.format(
    run=RUN_KEYWORDS, methods=", ".join(COMBINING),
    parameters=", ".join(o.key + (" (one per chat model)" if o.per_vector else "") for o in OPTIONS
                         if (o.param or o.per_vector) and o.key != "scale" and o.takes("merge")))


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


def run(recipe: Recipe, run_options: RunOptions) -> MergeResult:
    """Resolve -> plan -> execute -> commit (raymerge.runner); with `resume`, continue the
    unfinished run at `out`."""
    o = run_phases(recipe, run_options)
    peaks: dict[str, int] = {}
    for r in [*o.stats_results, *o.results]:
        peaks[r.worker] = max(peaks.get(r.worker, 0), r.peak_rss)
    spent = dict(zip(("read", "compute", "write", "checksum"),
                     (round(sum(r.timings[k] for r in o.results if r.timings), 3) for k in range(4))))
    log.info("execute: worker seconds: %s", spent)
    written = sum(o.plan.items[r.item].nbytes for r in o.results)
    progress_log.info("done: %.2f GB written to %s; execute %.1fs (%.2f GB/s), %.1fs in all",
                      o.plan.output_bytes / 1e9, urls.redact(o.out), o.execute_seconds,
                      written / o.execute_seconds / 1e9 if o.execute_seconds else 0.0, o.seconds)
    return MergeResult(out=o.out, kind=recipe.kind, plan_hash=o.plan.hash, shards=[s.name for s in o.plan.shards],
                       output_bytes=o.plan.output_bytes, read_bytes=total_read_bytes(o.plan), seconds=o.seconds,
                       execute_seconds=o.execute_seconds, peak_rss=peaks, items=len(o.plan.items),
                       items_done_before=o.done_before, items_retried=o.retried, worker_seconds=spent,
                       steady_gbps=o.steady_gbps, nonfinite=o.nonfinite, pass_seconds=o.pass_seconds)


def verify(url: str, storage_options: dict[str, Any], recompute: int = 0, seed: int | None = None) -> list[str]:
    """`raymerge verify`: a checkpoint against its manifest (commit.verify) and, for `recompute`
    random items, against its inputs: the manifest's recipe planned again, the items produced again."""
    from raymerge.execution.worker import MergeWorker

    def plan_again(manifest: Manifest) -> Plan:
        recipe = dict(manifest.recipe)
        kind = recipe.pop("kind")
        recipe.update(manifest.layout, out=url, storage_options=storage_options)
        return make_plan(*build_recipe(kind, recipe))

    return check_checkpoint(url, storage_options, recompute, seed, Redo(plan_again, lambda plan, manifest: MergeWorker(
        plan, None, storage_options, {}, facts=facts_by_index(plan, manifest.facts))))
