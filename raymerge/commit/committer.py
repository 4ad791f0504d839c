"""Commit, only when every item of the plan is accounted for:

  1. give every shard its final name (fsync + rename; complete the multipart uploads),
  2. copy the auxiliary files (config, generation config, tokenizer),
  3. write `model.safetensors.index.json` (sharded output only),
  4. write the manifest, last.

A run that fails before step 4 leaves no manifest; one that fails before step 1 leaves no shard
under a final name and no index.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

from raymerge.commit.manifest import MANIFEST_NAME
from raymerge.errors import CommitError, RaymergeError
from raymerge.plan import Plan
from raymerge.safetensors.index import INDEX_NAME, index_bytes
from raymerge.storage import urls
from raymerge.storage.writers import Output

log = logging.getLogger("raymerge")


def commit(plan: Plan, output: Output, handles: list[str], results: dict, manifest: bytes,
           storage_options: dict[str, Any]) -> None:
    missing = [i.id for i in plan.items if i.id not in results]
    if missing:
        raise CommitError(f"commit: {len(missing)} of {len(plan.items)} items are not done "
                          f"(first: {missing[:5]}); nothing was committed")
    etags: list[dict[int, str]] = [{} for _ in plan.shards]
    for item in plan.items:
        etag = results[item.id].etag
        if etag is not None:
            etags[item.shard][item.part] = etag
    try:
        output.finalize([s.name for s in plan.shards], handles, etags)
        for url in plan.aux_files:
            output.put(posixpath.basename(url), _read_small(url, storage_options))
        if len(plan.shards) > 1:
            weight_map = {t.name: plan.shards[t.shard].name for t in plan.tensors}
            output.put(INDEX_NAME, index_bytes(plan.tensor_bytes, weight_map))
        output.put(MANIFEST_NAME, manifest)
    except RaymergeError:
        raise
    except OSError as e:
        raise CommitError(f"commit: writing to {urls.redact(output.url)} failed: {e}") from e
    log.info("commit: %d shards, index and manifest written to %s", len(plan.shards), urls.redact(output.url))


def _read_small(url: str, storage_options: dict[str, Any]) -> bytes:
    fs, path = urls.filesystem(url, storage_options)
    try:
        return fs.cat_file(path)
    except Exception as e:
        raise CommitError(f"commit: copying {urls.redact(url)} failed ({type(e).__name__}: {e})") from e
