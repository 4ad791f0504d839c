"""raymerge's manifest: written last, its presence means "this checkpoint is complete".

It records the recipe, the inputs' fingerprints, the plan hash and a checksum per item, which is
what verify and resume read back.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from raymerge.commit.records import ItemRecord
from raymerge.commit.stats import STATS_NAME, nonfinite_totals
from raymerge.errors import InputError
from raymerge.planning.plan import Plan
from raymerge.safetensors.index import INDEX_NAME, is_safe_name
from raymerge.storage.urls import redact
from raymerge.untrusted import UntrustedJSON, parse_json

MANIFEST_NAME = "raymerge_manifest.json"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 * 2**20  # ~500,000 items; readers fetch at most one byte more


def build_manifest(plan: Plan, kind: str, recipe: dict[str, Any], done: dict[int, ItemRecord], version: str,
                   layout: dict[str, int]) -> bytes:
    """`kind` says what the checkpoint is ("chat vector", ...); `recipe` is what `raymerge run`
    reads to make it again; `done`: item id -> ItemRecord."""
    obj = {
        "format": "raymerge-manifest",
        "format_version": FORMAT_VERSION,
        "raymerge_version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kind": kind,
        "recipe": recipe,
        "layout": layout,
        "plan_hash": plan.hash,
        "stats": STATS_NAME,
        "files": output_files(plan),  # all this checkpoint is: what a later --overwrite may remove
        "inputs": [{"role": f.role, "url": redact(f.url), "size": f.size, "version": f.version,
                    "fingerprint": f.fingerprint} for f in plan.files],
        "output_bytes": plan.output_bytes,
        "nonfinite": {name: {"elements": n, "from_finite_inputs": new}
                      for name, (n, new) in nonfinite_totals(plan, done).items()},
        "shards": [{"name": s.name, "size": s.size, "tensors": len(s.tensors), "items": len(s.items)}
                   for s in plan.shards],
        "items": [{"id": i.id, "shard": i.shard, "part": i.part, "start": i.start, "end": i.end,
                   "crc32": f"{done[i.id].crc32:08x}", "etag": done[i.id].etag}
                  for i in plan.items],
    }
    return (json.dumps(obj, indent=1) + "\n").encode()


def output_files(plan: Plan) -> list[str]:
    """Every file a commit writes, the manifest last: what a later --overwrite may remove."""
    index = [INDEX_NAME] if len(plan.shards) > 1 else []
    return [a.name for a in plan.aux_files] + [STATS_NAME] + [s.name for s in plan.shards] + index + [MANIFEST_NAME]


class _Damaged(Exception):
    """One wrong field: its path in the manifest and what was expected there."""


def parse_manifest(raw: bytes, where: str) -> dict:
    """The manifest `raw`, checked as untrusted data before verify, inspect or resume use it.

    `where` names the command and checkpoint ("raymerge verify s3://b/out"). Raises one-line
    InputErrors: damaged (the field and what it should be), or written by a newer raymerge.
    """
    try:
        obj = parse_json(raw, max_bytes=MAX_MANIFEST_BYTES)
        version = _check_top(obj)
        if version > FORMAT_VERSION:
            raise InputError(f"{where}: {MANIFEST_NAME} has format_version {version}, newer than this raymerge "
                             f"reads ({FORMAT_VERSION}); upgrade raymerge")
        sizes = [_check_shard(s, f"shards[{i}]") for i, s in enumerate(obj["shards"])]
        names = [s["name"] for s in obj["shards"]]
        if len(set(names)) != len(names):
            raise _Damaged("shards: a shard name appears twice")
        for i, item in enumerate(obj["items"]):
            _check_item(item, f"items[{i}]", sizes)
        for i, entry in enumerate(obj["inputs"]):
            _expect(isinstance(entry, dict), f"inputs[{i}]", "an object")
    except (UntrustedJSON, _Damaged) as e:
        raise InputError(f"{where}: {MANIFEST_NAME} is damaged ({e}); this is not a checkpoint raymerge can "
                         "verify or inspect") from e
    return obj


def _check_top(obj: Any) -> int:
    _expect(isinstance(obj, dict), "the document", "a JSON object")
    _expect(obj.get("format") == "raymerge-manifest", "format", "'raymerge-manifest'")
    version = obj.get("format_version")
    _expect(_is_count(version) and version >= 1, "format_version", "an integer >= 1")
    _expect(isinstance(obj.get("plan_hash"), str), "plan_hash", "a string")
    _expect(isinstance(obj.get("stats"), str) and is_safe_name(obj["stats"]), "stats",
            "a file name inside the checkpoint")
    recipe = obj.get("recipe")
    _expect(isinstance(recipe, dict) and isinstance(recipe.get("kind"), str), "recipe", "an object with a kind")
    _expect(isinstance(obj.get("layout"), dict), "layout", "an object")
    for key in ("inputs", "shards", "items"):
        _expect(isinstance(obj.get(key), list), key, "a list")
    files = obj.get("files", [])
    _expect(isinstance(files, list) and all(isinstance(n, str) and is_safe_name(n) and "/" not in n for n in files),
            "files", "a list of file names in the checkpoint's folder")
    for key in ("kind", "raymerge_version", "created"):
        _expect(isinstance(obj.get(key, ""), str), key, "a string")
    _expect(_is_count(obj.get("output_bytes", 0)), "output_bytes", "an integer >= 0")
    return version


def _check_shard(shard: Any, at: str) -> int:
    _expect(isinstance(shard, dict), at, "an object")
    _expect(isinstance(shard.get("name"), str) and is_safe_name(shard["name"]), f"{at}.name",
            "a file name inside the checkpoint")
    _expect(_is_count(shard.get("size")), f"{at}.size", "an integer >= 0")
    return shard["size"]


def _check_item(item: Any, at: str, sizes: list[int]) -> None:
    _expect(isinstance(item, dict), at, "an object")
    for key in ("id", "shard", "part", "start", "end"):
        _expect(_is_count(item.get(key)), f"{at}.{key}", "an integer >= 0")
    _expect(item["shard"] < len(sizes), f"{at}.shard", f"one of the {len(sizes)} shards")
    _expect(item["start"] <= item["end"] <= sizes[item["shard"]], f"{at}.end",
            "start <= end <= the shard's size")
    crc = item.get("crc32")
    _expect(isinstance(crc, str) and re.fullmatch("[0-9a-f]{8}", crc) is not None, f"{at}.crc32",
            "8 hex digits")
    _expect(item.get("etag") is None or isinstance(item["etag"], str), f"{at}.etag", "a string or null")


def _expect(ok: bool, at: str, expected: str) -> None:
    if not ok:
        raise _Damaged(f"{at}: expected {expected}")


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**62
