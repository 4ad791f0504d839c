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

from raymerge.config import OPTIONS, Recipe, RunOptions, build_recipe
from raymerge.execution.passes import pass_items, pass_read_bytes, statistics_passes, tensor_passes
from raymerge.methods import ELEMENTWISE, METHODS, PASS_ORDER
from raymerge.planning.schedule import layer_of
from raymerge.planning.plan import Plan
from raymerge.runner import make_plan, run as run_phases
from raymerge.session import prefer_loopback, ray_session  # noqa: F401  (the faces' imports)
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
    options of the CLI: {run}; and the method's: method ("sum", "ties", "dare_linear",
    "dare_ties"), density (one per chat model), normalize, rescale, lambda, seed.
    """
    return run(*build_recipe("merge", dict(base=base, chat=chat, cp=cp, out=out, scale=scale, vocab=vocab,
                                           skip=skip, special_tokens=special_tokens,
                                           chat_template=chat_template, dtype=dtype, **options)))


merge.__doc__ = merge.__doc__.format(run=RUN_KEYWORDS)


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


def _method_passes(the_plan: Plan, method: str) -> list[str]:
    """The passes a method's tensors need in this plan (the elementwise one alone when none computes)."""
    used = {p for t in the_plan.tensors if t.method == method and t.terms for p in tensor_passes(t)}
    return [p for p in PASS_ORDER if p in used] or [ELEMENTWISE]


def total_read_bytes(the_plan: Plan) -> int:
    """Bytes of input data the workers read in every pass (statistics passes read the vectors again)."""
    return the_plan.read_bytes + sum(pass_read_bytes(the_plan, name) for name in statistics_passes(the_plan))


def describe(the_plan: Plan) -> dict[str, Any]:
    """The plan as JSON-able data: what `raymerge plan --json` prints."""
    return {
        "plan_hash": the_plan.hash,
        "output_bytes": the_plan.output_bytes,
        "tensor_bytes": the_plan.tensor_bytes,
        "read_bytes": total_read_bytes(the_plan),
        "inputs": [{"role": f.role, "url": urls.redact(f.url), "size": f.size} for f in the_plan.files],
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                     "shard": the_plan.shards[t.shard].name, "offset": t.start, "nbytes": t.nbytes,
                     "rule": t.rule, "method": t.method, "terms": len(t.terms), "scales": [x.scale for x in t.terms],
                     "vector_parameters": [dict(x.values) for x in t.terms], "passes": list(tensor_passes(t)),
                     "layer": layer_of(t.name), "special_rows": len(t.overrides)}
                    for t in the_plan.tensors],
        "shards": [{"name": s.name, "size": s.size, "header_bytes": len(s.header), "tensors": len(s.tensors),
                    "items": len(s.items)} for s in the_plan.shards],
        "items": [{"id": i.id, "shard": the_plan.shards[i.shard].name, "part": i.part, "start": i.start,
                   "end": i.end, "pieces": len(i.pieces)} for i in the_plan.items],
        "aux_files": [a.name for a in the_plan.aux_files],
        "passes": [{"name": name, "items": len(pass_items(the_plan, name)),
                    "read_bytes": pass_read_bytes(the_plan, name)} for name in statistics_passes(the_plan)]
        + [{"name": ELEMENTWISE, "items": len(the_plan.items), "read_bytes": the_plan.read_bytes}],
        "methods": {m.name: {"passes": _method_passes(the_plan, m.name),
                             "parameters": [p.name for p in m.parameters],
                             "given": dict(next(t.params for t in the_plan.tensors if t.method == m.name))}
                    for m in (METHODS[name] for name in sorted({t.method for t in the_plan.tensors}))},
    }
