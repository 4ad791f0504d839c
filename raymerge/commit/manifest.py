"""raymerge's manifest: written last, its presence means "this checkpoint is complete".

It records the recipe, the inputs' fingerprints, the plan hash and a checksum per item, which is
what verify and resume read back.
"""

from __future__ import annotations

import json
import time
from typing import Any

from raymerge.plan import Plan
from raymerge.storage.urls import redact

MANIFEST_NAME = "raymerge_manifest.json"
FORMAT_VERSION = 1


def build_manifest(plan: Plan, kind: str, recipe: dict[str, Any], results: dict, version: str,
                   layout: dict[str, int]) -> bytes:
    """`kind` says what the checkpoint is ("chat vector", ...); `recipe` is what `raymerge run`
    reads to make it again; `results`: item id -> ItemResult."""
    obj = {
        "format": "raymerge-manifest",
        "format_version": FORMAT_VERSION,
        "raymerge_version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kind": kind,
        "recipe": recipe,
        "layout": layout,
        "plan_hash": plan.hash,
        "stats": "raymerge_stats.parquet",
        "inputs": [{"role": f.role, "url": redact(f.url), "size": f.size, "fingerprint": f.fingerprint}
                   for f in plan.files],
        "output_bytes": plan.output_bytes,
        "shards": [{"name": s.name, "size": s.size, "tensors": len(s.tensors), "items": len(s.items)}
                   for s in plan.shards],
        "items": [{"id": i.id, "shard": i.shard, "part": i.part, "start": i.start, "end": i.end,
                   "crc32": f"{results[i.id].crc32:08x}", "etag": results[i.id].etag}
                  for i in plan.items],
    }
    return (json.dumps(obj, indent=1) + "\n").encode()
