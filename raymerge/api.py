"""The Python face: resolve -> plan -> execute -> commit, with the CLI's options.

    import raymerge
    result = raymerge.merge(base="s3://m/base", chat="s3://m/chat", cp="s3://m/cp", out="s3://m/out", scale=0.5)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from raymerge import __version__
from raymerge.commit.committer import commit
from raymerge.commit.manifest import MANIFEST_NAME, build_manifest
from raymerge.config import RunOptions, parse_scale
from raymerge.errors import OutputError
from raymerge.plan import Plan
from raymerge.planning.inputs import Checkpoint, resolve
from raymerge.planning.planner import S3_MAX_PARTS, S3_MIN_PART, PlanOptions, TermSpec, build_plan
from raymerge.safetensors.index import INDEX_NAME
from raymerge.storage import urls
from raymerge.storage.writers import Output, open_output

log = logging.getLogger("raymerge")


@dataclass(frozen=True)
class MergeResult:
    out: str
    plan_hash: str
    shards: list[str]
    output_bytes: int
    read_bytes: int
    seconds: float
    peak_rss: dict[str, int]  # worker -> bytes

    @property
    def gbps(self) -> float:
        return self.output_bytes / self.seconds / 1e9 if self.seconds else 0.0


def plan(base: str, chat: str, cp: str, *, scale: float = 1.0, out: str | None = None,
         **options: Any) -> Plan:
    """The plan of a chat-vector merge, made from the inputs' headers alone (no tensor data moves)."""
    run = RunOptions.parse(**options)
    recipe, _ = _chat_vector(base, chat, cp, scale, run)
    return _plan(recipe, run, out)


def merge(base: str, chat: str, cp: str, out: str, *, scale: float = 1.0, **options: Any) -> MergeResult:
    """`out = cp + scale * (chat - base)` in float32, rounded once to the output dtype."""
    run = RunOptions.parse(**options)
    recipe, description = _chat_vector(base, chat, cp, scale, run)
    return _run(recipe, description, run, out)


def _chat_vector(base: str, chat: str, cp: str, scale: float, run: RunOptions):
    scale = parse_scale(scale)
    started = time.perf_counter()
    anchor = resolve("cp", cp, run.storage_options)
    terms = [TermSpec(scale, resolve("chat", chat, run.storage_options), resolve("base", base, run.storage_options))]
    log.info("resolve: 3 inputs, %d tensors, in %.2fs", len(anchor.tensors), time.perf_counter() - started)
    description = {"kind": "chat-vector merge", "formula": "out = cp + scale * (chat - base)",
                   "cp": urls.redact(cp), "chat": urls.redact(chat), "base": urls.redact(base),
                   "scale": scale, "dtype": run.dtype, "shard_size": run.shard_size}
    return (anchor, terms), description


def _plan(recipe: tuple[Checkpoint | None, list[TermSpec]], run: RunOptions, out: str | None) -> Plan:
    s3 = out is not None and urls.protocol(out) == "s3"
    options = PlanOptions(shard_size=run.shard_size, item_size=run.item_size, dtype=run.dtype,
                          min_part=S3_MIN_PART if s3 else 0, max_parts=S3_MAX_PARTS if s3 else 0)
    started = time.perf_counter()
    anchor, terms = recipe
    result = build_plan(anchor, terms, options)
    log.info("plan: %d tensors, %d shards, %d items, %.2f GB out, in %.2fs (hash %s)", len(result.tensors),
             len(result.shards), len(result.items), result.output_bytes / 1e9, time.perf_counter() - started,
             result.hash[:12])
    return result


def _run(recipe, description: dict, run: RunOptions, out: str) -> MergeResult:
    from raymerge.execution.dispatch import PoolOptions, execute
    from raymerge.execution.progress import Progress

    the_plan = _plan(recipe, run, out)
    output = open_output(out, run.storage_options)
    _check_output(output, the_plan, run.overwrite)
    pool = PoolOptions(workers=run.workers, cpus_per_worker=run.cpus_per_worker, in_flight=run.in_flight)
    started = time.perf_counter()
    with ray_session(run.address):
        handles = output.prepare([(s.name, s.size) for s in the_plan.shards])
        try:
            progress = Progress(the_plan.output_bytes, len(the_plan.items))
            results = execute(the_plan, output.url, handles, run.storage_options, pool, progress)
            manifest = build_manifest(the_plan, description, results, __version__)
            commit(the_plan, output, handles, results, manifest, run.storage_options)
        except BaseException:
            output.abort([s.name for s in the_plan.shards], handles)
            raise
    seconds = time.perf_counter() - started
    peaks: dict[str, int] = {}
    for r in results.values():
        peaks[r.worker] = max(peaks.get(r.worker, 0), r.peak_rss)
    log.info("done: %.2f GB written in %.1fs (%.2f GB/s) to %s", the_plan.output_bytes / 1e9, seconds,
             the_plan.output_bytes / seconds / 1e9, urls.redact(output.url))
    return MergeResult(output.url, the_plan.hash, [s.name for s in the_plan.shards], the_plan.output_bytes,
                       the_plan.read_bytes, seconds, peaks)


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
                     "rule": "copy" if t.is_copy else "sum", "terms": len(t.terms)} for t in the_plan.tensors],
        "shards": [{"name": s.name, "size": s.size, "header_bytes": len(s.header), "tensors": len(s.tensors),
                    "items": len(s.items)} for s in the_plan.shards],
        "items": [{"id": i.id, "shard": the_plan.shards[i.shard].name, "part": i.part, "start": i.start,
                   "end": i.end, "pieces": len(i.pieces)} for i in the_plan.items],
        "aux_files": [urls.redact(u) for u in the_plan.aux_files],
    }
