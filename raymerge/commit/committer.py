"""Commit, only when every item of the plan is accounted for:

  1. when replacing an older checkpoint (--overwrite), remove its manifest and index first, so that
     the folder never looks complete while it is half replaced,
  2. copy the auxiliary files (config, generation config, tokenizer; chat template and EOS from
     the chat model), and write the per-tensor statistics,
  3. give every shard its final name (fsync + rename; complete the multipart uploads), then remove
     the older checkpoint's files the new one did not replace,
  4. write `model.safetensors.index.json` (sharded output only),
  5. write the manifest, last; then drop the resume journal.

A run that fails before step 5 leaves no manifest; one that fails before step 3 leaves no shard
under a final name and no index. Every step is idempotent, so `--resume` can finish a commit that
was cut short. Only files the older checkpoint's manifest or index named are ever removed.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from raymerge import __version__
from raymerge.commit.aux import patched
from raymerge.commit.manifest import MANIFEST_NAME, Manifest, output_files
from raymerge.commit.records import ItemRecord
from raymerge.commit.stats import STATS_NAME, parquet_bytes, tensor_stats
from raymerge.errors import CommitError, RaymergeError
from raymerge.planning.plan import AuxFile, Plan
from raymerge.safetensors.index import INDEX_NAME, index_bytes
from raymerge.storage import urls
from raymerge.storage.writers import Output, Span, StagedItem, Target

log = logging.getLogger("raymerge.progress")


def commit(plan: Plan, output: Output, handles: list[str], done: dict[int, ItemRecord], *, kind: str,
           recipe: dict[str, Any], layout: dict[str, Any], storage_options: dict[str, Any],
           replaces: tuple[str, ...] = (), facts: dict[str, Any] | None = None) -> None:
    """Commit a run whose items are all `done`; its manifest records `kind`, `recipe` and `layout`
    (what verify needs to plan it again) and the statistics passes' `facts` (what verify needs to
    compute items again). `replaces`: the files of an older checkpoint at the
    output, to remove (see the module's docstring)."""
    missing = [i.id for i in plan.items if i.id not in done]
    if missing:
        raise CommitError(f"commit: {len(missing)} of {len(plan.items)} items are not done "
                          f"(first: {missing[:5]}); nothing was committed")
    manifest = Manifest.of(plan, kind, recipe, done, __version__, layout, facts).to_json()
    stats = tensor_stats(plan, done)
    shards = [(Target(s.name, handles[k], s.size), staged_items(plan, k, done)) for k, s in enumerate(plan.shards)]
    try:
        # Harmless files first, so that the window between the first final shard name and the
        # manifest is as short as it can be; every step can be run again by --resume.
        output.delete([n for n in (MANIFEST_NAME, INDEX_NAME) if n in replaces])
        for aux in plan.aux_files:
            output.put(aux.name, _aux_bytes(plan, aux, storage_options))
        output.put(STATS_NAME, parquet_bytes(stats))
        output.finalize(shards)
        output.delete([n for n in replaces if n not in output_files(plan)])
        if len(plan.shards) > 1:
            weight_map = {t.name: plan.shards[t.shard].name for t in plan.tensors}
            output.put(INDEX_NAME, index_bytes(plan.tensor_bytes, weight_map))
        output.put(MANIFEST_NAME, manifest)
        output.clear_staging()  # the journal: the manifest now says the checkpoint is complete
    except RaymergeError:
        raise
    except OSError as e:
        raise CommitError(f"commit: writing to {urls.redact(output.url)} failed: {e}") from e
    log.info("commit: %d shards, index and manifest written to %s", len(plan.shards), urls.redact(output.url))


def staged_items(plan: Plan, shard: int, done: dict[int, ItemRecord]) -> list[StagedItem]:
    """What the writer is told of a shard's finished items, in the shard's order (resume and commit)."""
    items = (plan.items[i] for i in plan.shards[shard].items if i in done)
    return [StagedItem(it.id, Span(it.part, it.start, it.end), done[it.id].crc32, done[it.id].etag) for it in items]


def _aux_bytes(plan: Plan, aux: AuxFile, storage_options: dict[str, Any]) -> bytes:
    data = _read_small(aux.source, storage_options)
    if aux.patch_from is None:
        return data
    try:
        merged = patched(aux.name, data, _read_small(aux.patch_from, storage_options))
    except (ValueError, UnicodeDecodeError) as e:
        raise CommitError(f"commit: cannot take the chat template / EOS into {aux.name} ({e}); "
                          "fix the file or pass --no-chat-template") from e
    # A chat_template.jinja from the chat model wins: drop cp's inline template so none contradicts it.
    folder = aux.patch_from.rsplit("/", 1)[0]
    if aux.name == "tokenizer_config.json" and any(
            a.name == "chat_template.jinja" and a.source.rsplit("/", 1)[0] == folder for a in plan.aux_files):
        obj = json.loads(merged)
        obj.pop("chat_template", None)
        merged = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()
    return merged


def _read_small(url: str, storage_options: dict[str, Any]) -> bytes:
    fs, path = urls.filesystem(url, storage_options)
    try:
        return fs.cat_file(path)
    except Exception as e:
        raise CommitError(f"commit: copying {urls.redact(url)} failed ({type(e).__name__}: {e})") from e
