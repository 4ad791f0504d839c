"""Commit, only when every item of the plan is accounted for:

  1. when replacing an older checkpoint (--overwrite), remove its manifest and index first, so that
     the folder never looks complete while it is half replaced,
  2. give every shard its final name (fsync + rename; complete the multipart uploads),
  3. write the auxiliary files (config, generation config, tokenizer; chat template and EOS from
     the chat model: read and patched at plan time, see commit.aux) and the per-tensor statistics,
     then remove the older checkpoint's files the new one did not replace,
  4. write `model.safetensors.index.json` (sharded output only),
  5. write the manifest, last; then drop the resume journal.

A run that fails before step 5 leaves no manifest; one that fails before step 2 leaves nothing new
at the output: no shard under a final name, no config, no index. Every step is idempotent, so
`--resume` can finish a commit that was cut short. Only files the older checkpoint's manifest or
index named are ever removed.
"""

from __future__ import annotations

import logging
from typing import Any

from raymerge import __version__
from raymerge.commit.manifest import MANIFEST_NAME, Manifest, output_files
from raymerge.commit.stats import STATS_NAME, parquet_bytes, tensor_stats
from raymerge.errors import FULL, CommitError, RaymergeError, StorageError
from raymerge.planning.plan import Plan
from raymerge.records import ItemRecord, staged_items
from raymerge.safetensors.index import INDEX_NAME, index_bytes
from raymerge.storage import urls
from raymerge.storage.writers import Output, Target, clear_staging

log = logging.getLogger("raymerge.progress")


def commit(plan: Plan, output: Output, handles: list[str], done: dict[int, ItemRecord], *, kind: str,
           recipe: dict[str, Any], layout: dict[str, Any], aux: dict[str, bytes],
           replaces: tuple[str, ...] = (), facts: dict[str, Any] | None = None) -> None:
    """Commit a run whose items are all `done`; its manifest records `kind`, `recipe` and `layout`
    (what verify needs to plan it again) and the statistics passes' `facts` (what verify needs to
    compute items again). `aux`: the auxiliary files' bytes (commit.aux_contents). `replaces`: the
    files of an older checkpoint at the output, to remove (see the module's docstring)."""
    missing = [i.id for i in plan.items if i.id not in done]
    if missing:
        raise CommitError(f"commit: {len(missing)} of {len(plan.items)} items are not done "
                          f"(first: {missing[:5]}); nothing was committed")
    manifest = Manifest.of(plan, kind, recipe, done, __version__, layout, facts).to_json()
    stats = tensor_stats(plan, done)
    shards = [(Target(s.name, handles[k], s.size), staged_items(plan, k, done)) for k, s in enumerate(plan.shards)]
    try:
        # Nothing new appears at the output before the shards are final; every step can be run
        # again by --resume.
        _small(output.files.delete, [n for n in (MANIFEST_NAME, INDEX_NAME) if n in replaces])
        output.finalize(shards)
        for name in [*(a.name for a in plan.aux_files), *(n for n, _ in plan.tokenizer), *plan.card]:
            _small(output.files.put, name, aux[name])
        _small(output.files.put, STATS_NAME, parquet_bytes(stats))
        _small(output.files.delete, [n for n in replaces if n not in output_files(plan)])
        if len(plan.shards) > 1:
            weight_map = {t.name: plan.shards[t.shard].name for t in plan.tensors}
            _small(output.files.put, INDEX_NAME, index_bytes(plan.tensor_bytes, weight_map))
        _small(output.files.put, MANIFEST_NAME, manifest)
        _small(clear_staging, output)  # the journal: the manifest now says the checkpoint is complete
    except RaymergeError:
        raise
    except OSError as e:
        raise CommitError(f"commit: writing to {urls.redact(output.url)} failed: {e}") from e
    log.info("commit: %d shards, index and manifest written to %s", len(plan.shards), urls.redact(output.url))


def _small(step, *args) -> None:
    """One write or delete of the output's small files at commit. Whatever failed, --resume can
    run it again (the shards are final or still staged): a CommitError, but for a full disk, whose
    StorageError tells the room to free."""
    try:
        step(*args)
    except StorageError as e:
        if e.reason == FULL:
            raise
        raise CommitError(f"commit: {e}") from e
