"""raymerge's manifest: written last, its presence means "this checkpoint is complete".

It records the recipe, the inputs' fingerprints, the plan hash and a checksum per item, which is
what verify, inspect and --overwrite read back. `Manifest` is the document: `Manifest.of` makes it
at commit, `to_json` writes it, `from_json` reads it back as untrusted data.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from raymerge.commit.stats import STATS_NAME, nonfinite_totals
from raymerge.errors import InputError
from raymerge.planning.plan import Plan
from raymerge.records import ItemRecord
from raymerge.safetensors.index import INDEX_NAME, is_safe_name
from raymerge.storage.urls import redact
from raymerge.untrusted import MAX_NAME, MAX_TEXT, UntrustedJSON, is_text, parse_json, shown

MANIFEST_NAME = "raymerge_manifest.json"
FORMAT = "raymerge-manifest"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 * 2**20  # ~500,000 items; readers fetch at most one byte more
LAYOUT_KEYS = ("shard_size", "item_size")  # what runner._layout records; verify plans with them again
_STRING = f"a string of at most {MAX_TEXT} characters"

# Fields that are None were absent from the document read (written by an older raymerge, or by
# hand); `to_json` leaves them out again. Every manifest `Manifest.of` makes has them all.


@dataclass(frozen=True, slots=True)
class InputEntry:
    """One input file as the run read it (raymerge never reads these back; people and tests do)."""

    role: str
    url: str  # redacted
    size: int
    fingerprint: str
    version: str | None = None  # what reads were pinned to ("" for local files)

    def to_json(self) -> dict[str, Any]:
        return _present({"role": self.role, "url": self.url, "size": self.size, "version": self.version,
                         "fingerprint": self.fingerprint})


@dataclass(frozen=True, slots=True)
class NonFinite:
    """A tensor's inf/NaN output elements, and those of them made from finite inputs."""

    tensor: str
    elements: int
    from_finite_inputs: int


@dataclass(frozen=True, slots=True)
class ShardEntry:
    name: str
    size: int
    tensors: int | None = None
    items: int | None = None

    def to_json(self) -> dict[str, Any]:
        return _present({"name": self.name, "size": self.size, "tensors": self.tensors, "items": self.items})


@dataclass(frozen=True, slots=True)
class ItemEntry:
    """One item's byte range [start, end) of shard number `shard`, and the CRC-32 of those bytes."""

    id: int
    shard: int
    part: int
    start: int
    end: int
    crc32: int
    etag: str | None  # S3 part ETag; null in the document for local output

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "shard": self.shard, "part": self.part, "start": self.start, "end": self.end,
                "crc32": f"{self.crc32:08x}", "etag": self.etag}


@dataclass(frozen=True, slots=True)
class Manifest:
    """raymerge_manifest.json, field for field. `recipe` and `layout` are the JSON objects as they
    are (the recipe is validated again where it is used: config.build_recipe)."""

    format_version: int
    recipe: dict[str, Any]  # what `raymerge run` reads to make it again; has a "kind"
    layout: dict[str, Any]  # what verify needs, besides the recipe, to plan the same layout again
    plan_hash: str
    stats: str  # the statistics table's file name
    inputs: tuple[InputEntry, ...]
    shards: tuple[ShardEntry, ...]
    items: tuple[ItemEntry, ...]  # in item id order
    kind: str | None = None  # what the checkpoint is ("chat vector merge", ...)
    raymerge_version: str | None = None
    created: str | None = None
    files: tuple[str, ...] | None = None  # all this checkpoint is, the manifest last
    output_bytes: int | None = None
    nonfinite: tuple[NonFinite, ...] | None = None
    facts: dict[str, list] | None = None  # per tensor, what the statistics passes found (TIES thresholds, ...)

    @classmethod
    def of(cls, plan: Plan, kind: str, recipe: dict[str, Any], done: dict[int, ItemRecord], version: str,
           layout: dict[str, Any], facts: dict[str, list] | None = None) -> Manifest:
        """The manifest of a finished run; `done`: item id -> ItemRecord, every item of the plan."""
        return cls(
            format_version=FORMAT_VERSION, recipe=recipe, layout=layout, plan_hash=plan.hash, stats=STATS_NAME,
            inputs=tuple(InputEntry(f.role, redact(f.url), f.size, f.fingerprint, f.version) for f in plan.files),
            shards=tuple(ShardEntry(s.name, s.size, len(s.tensors), len(s.items)) for s in plan.shards),
            items=tuple(ItemEntry(i.id, i.shard, i.part, i.start, i.end, done[i.id].crc32, done[i.id].etag)
                        for i in plan.items),
            kind=kind, raymerge_version=version, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            files=tuple(output_files(plan)), output_bytes=plan.output_bytes,
            nonfinite=tuple(NonFinite(name, n, new) for name, (n, new) in nonfinite_totals(plan, done).items()),
            facts=facts or None)

    @property
    def named(self) -> list[str]:
        """Every file the manifest names: its shards, its statistics table and its file list.
        What a later --overwrite may remove (besides the manifest itself)."""
        return [s.name for s in self.shards] + [self.stats] + list(self.files or ())

    def to_json(self) -> bytes:
        obj = _present({
            "format": FORMAT, "format_version": self.format_version, "raymerge_version": self.raymerge_version,
            "created": self.created, "kind": self.kind, "recipe": self.recipe, "layout": self.layout,
            "plan_hash": self.plan_hash, "stats": self.stats,
            "files": None if self.files is None else list(self.files),
            "inputs": [i.to_json() for i in self.inputs], "output_bytes": self.output_bytes,
            "nonfinite": None if self.nonfinite is None else {
                n.tensor: {"elements": n.elements, "from_finite_inputs": n.from_finite_inputs}
                for n in self.nonfinite},
            "facts": self.facts,
            "shards": [s.to_json() for s in self.shards], "items": [i.to_json() for i in self.items]})
        return (_document(obj) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Manifest:
        """The manifest `raw`, checked as untrusted data before verify, inspect or --overwrite use it.

        `where` names the command and checkpoint ("raymerge verify s3://b/out"). Raises one-line
        InputErrors: damaged (the field and what it should be), or written by a newer raymerge.
        """
        try:
            obj = parse_json(raw, max_bytes=MAX_MANIFEST_BYTES)
            version = _check_top(obj)
            if version > FORMAT_VERSION:
                raise InputError(f"{where}: {MANIFEST_NAME} has format_version {version}, newer than this "
                                 f"raymerge reads ({FORMAT_VERSION}); upgrade raymerge")
            shards = tuple(_shard(s, f"shards[{i}]") for i, s in enumerate(obj["shards"]))
            names = [s.name for s in shards]
            if len(set(names)) != len(names):
                raise _Damaged("shards: a shard name appears twice")
            # In id order, every id once: verify finds an item of the plan at manifest.items[id].
            items = tuple(_item(item, f"items[{i}]", i, shards) for i, item in enumerate(obj["items"]))
            inputs = tuple(_input(entry, f"inputs[{i}]") for i, entry in enumerate(obj["inputs"]))
            nonfinite = _nonfinite(obj["nonfinite"]) if "nonfinite" in obj else None
            facts = _facts(obj["facts"]) if "facts" in obj else None
        except (UntrustedJSON, _Damaged) as e:
            raise InputError(f"{where}: {MANIFEST_NAME} is damaged ({e}); this is not a checkpoint raymerge can "
                             "verify or inspect") from e
        files = obj.get("files")
        return cls(format_version=version, recipe=obj["recipe"], layout=obj["layout"], plan_hash=obj["plan_hash"],
                   stats=obj["stats"], inputs=inputs, shards=shards, items=items, kind=obj.get("kind"),
                   raymerge_version=obj.get("raymerge_version"), created=obj.get("created"),
                   files=None if files is None else tuple(files), output_bytes=obj.get("output_bytes"),
                   nonfinite=nonfinite, facts=facts)


def output_files(plan: Plan) -> list[str]:
    """Every file a commit writes, the manifest last: what a later --overwrite may remove."""
    index = [INDEX_NAME] if len(plan.shards) > 1 else []
    return ([a.name for a in plan.aux_files] + [n for n, _ in plan.tokenizer] + list(plan.card) + [STATS_NAME]
            + [s.name for s in plan.shards] + index + [MANIFEST_NAME])


class _Damaged(Exception):
    """One wrong field: its path in the manifest and what was expected there."""


def _check_top(obj: Any) -> int:
    _expect(isinstance(obj, dict), "the document", "a JSON object")
    _expect(obj.get("format") == FORMAT, "format", f"{FORMAT!r}")
    version = obj.get("format_version")
    _expect(_is_count(version) and version >= 1, "format_version", "an integer >= 1")
    _expect(is_text(obj.get("plan_hash")), "plan_hash", _STRING)
    _expect(_file_name(obj.get("stats")), "stats", "a file name inside the checkpoint")
    recipe = obj.get("recipe")
    _expect(isinstance(recipe, dict) and is_text(recipe.get("kind")), "recipe", "an object with a kind")
    _layout(obj.get("layout"))
    for key in ("inputs", "shards", "items"):
        _expect(isinstance(obj.get(key), list), key, "a list")
    files = obj.get("files", [])
    _expect(isinstance(files, list) and all(_file_name(n) and "/" not in n for n in files),
            "files", "a list of file names in the checkpoint's folder")
    for key in ("kind", "raymerge_version", "created"):
        _expect(is_text(obj.get(key, "")), key, _STRING)
    _expect(_is_count(obj.get("output_bytes", 0)), "output_bytes", "an integer >= 0")
    return version


def _layout(layout: Any) -> None:
    """The layout is merged into the recipe that verify plans again: only the keys raymerge
    writes, each a size in bytes (build_recipe checks the range each option takes)."""
    _expect(isinstance(layout, dict) and all(k in LAYOUT_KEYS for k in layout), "layout",
            f"an object with at most {', '.join(LAYOUT_KEYS)}")
    for key, value in layout.items():
        _expect(_is_count(value) and value >= 1, f"layout.{key}", "an integer >= 1 (bytes)")


def _shard(shard: Any, at: str) -> ShardEntry:
    _expect(isinstance(shard, dict), at, "an object")
    _expect(_file_name(shard.get("name")), f"{at}.name", "a file name inside the checkpoint")
    _expect(_is_count(shard.get("size")), f"{at}.size", "an integer >= 0")
    for key in ("tensors", "items"):
        _expect(_is_count(shard.get(key, 0)), f"{at}.{key}", "an integer >= 0")
    return ShardEntry(shard["name"], shard["size"], shard.get("tensors"), shard.get("items"))


def _item(item: Any, at: str, index: int, shards: tuple[ShardEntry, ...]) -> ItemEntry:
    _expect(isinstance(item, dict), at, "an object")
    for key in ("id", "shard", "part", "start", "end"):
        _expect(_is_count(item.get(key)), f"{at}.{key}", "an integer >= 0")
    _expect(item["id"] == index, f"{at}.id", f"{index}: items are listed in id order, from 0")
    _expect(item["shard"] < len(shards), f"{at}.shard", f"one of the {len(shards)} shards")
    _expect(item["start"] <= item["end"] <= shards[item["shard"]].size, f"{at}.end",
            "start <= end <= the shard's size")
    crc = item.get("crc32")
    _expect(isinstance(crc, str) and re.fullmatch("[0-9a-f]{8}", crc) is not None, f"{at}.crc32",
            "8 hex digits")
    etag = item.get("etag")
    _expect(etag is None or is_text(etag, MAX_NAME), f"{at}.etag", f"a string or null (at most {MAX_NAME} characters)")
    return ItemEntry(item["id"], item["shard"], item["part"], item["start"], item["end"], int(crc, 16), etag)


def _input(entry: Any, at: str) -> InputEntry:
    _expect(isinstance(entry, dict), at, "an object")
    for key in ("role", "url", "fingerprint"):
        _expect(is_text(entry.get(key)), f"{at}.{key}", _STRING)
    _expect(_is_count(entry.get("size")), f"{at}.size", "an integer >= 0")
    _expect(is_text(entry.get("version", "")), f"{at}.version", _STRING)
    return InputEntry(entry["role"], entry["url"], entry["size"], entry["fingerprint"], entry.get("version"))


def _nonfinite(obj: Any) -> tuple[NonFinite, ...]:
    _expect(isinstance(obj, dict), "nonfinite", "an object")
    out = []
    for name, counts in obj.items():
        at = f"nonfinite[{shown(name)}]"
        _expect(is_text(name), at, f"a tensor name of at most {MAX_TEXT} characters")
        _expect(isinstance(counts, dict), at, "an object")
        for key in ("elements", "from_finite_inputs"):
            _expect(_is_count(counts.get(key)), f"{at}.{key}", "an integer >= 0")
        out.append(NonFinite(name, counts["elements"], counts["from_finite_inputs"]))
    return tuple(out)


def _facts(obj: Any) -> dict[str, list]:
    """Per tensor, per vector: None or {name: a finite number, or a list of them (one per row)}. Whether they are what the tensor's
    method records is checked against the plan, where it is known (passes.facts_by_index; each
    method's `facts_problem`)."""
    _expect(isinstance(obj, dict), "facts", "an object")
    for name, per_vector in obj.items():
        at = f"facts[{shown(name)}]"
        _expect(is_text(name), at, f"a tensor name of at most {MAX_TEXT} characters")
        _expect(isinstance(per_vector, list), at, "a list")
        for f in per_vector:
            _expect(f is None or isinstance(f, dict) and all(is_text(k, MAX_NAME) and _is_facts(v)
                                                             for k, v in f.items()),
                    at, "a list of null or {name: a number or a list of numbers}")
    return obj


def _document(obj: dict[str, Any]) -> str:
    """obj as `json.dumps(obj, indent=1)` writes it, but each tensor's facts on one line, compact. A
    row-wise method's facts are millions of numbers: one a line, the 728M bench trio's nuslerp
    manifest was 33 MB and took the driver 1.2 s to write (an indented document is written by
    json's Python encoder, a compact one by its C encoder)."""
    fields = []
    for key, value in obj.items():
        if key == "facts" and value:
            text = "{\n" + ",\n".join(f"  {json.dumps(t)}: {json.dumps(f, separators=(',', ':'))}"
                                       for t, f in value.items()) + "\n }"
        else:  # a string's newlines are escaped: every newline here is the layout's, one level in
            text = json.dumps(value, indent=1).replace("\n", "\n ")
        fields.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(fields) + "\n}" if fields else "{}"


def _present(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` without its None values: the fields a document read back did not have."""
    return {k: v for k, v in obj.items() if v is not None}


def _expect(ok: bool, at: str, expected: str) -> None:
    if not ok:
        raise _Damaged(f"{at}: expected {expected}")


def _is_fact(x: Any) -> bool:
    """A fact a method records: an integer of at most 64 bits, or a finite float."""
    return (isinstance(x, int) and not isinstance(x, bool) and -2**63 <= x < 2**64) or \
        (isinstance(x, float) and math.isfinite(x))


def _is_facts(x: Any) -> bool:
    """A fact, or a list of facts (a geometric method's, one per vector of a tensor)."""
    return _is_fact(x) or (isinstance(x, list) and all(_is_fact(y) for y in x))


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**62


def _file_name(x: Any) -> bool:
    return is_text(x, MAX_NAME) and is_safe_name(x)
