"""`raymerge verify`: is a checkpoint what its manifest says, and (optionally) what its inputs make?

Checks, in order: the manifest; every shard's presence and size; every shard header (parsed and
validated like an input's); the index against the headers; every item's CRC-32. With
`recompute`, N random items are computed again from the inputs (the same plan, rebuilt from the
recipe in the manifest) and compared byte for byte. Problems name the shard and the tensors.

This module sits below the planner's faces and the workers: how items are computed again comes
in as a `Redo` (raymerge.api.verify gives it).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raymerge import __version__
from raymerge.commit.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, ItemEntry, Manifest
from raymerge.errors import RaymergeError
from raymerge.planning.plan import Plan
from raymerge.safetensors.header import Header, parse_header, read_header_bytes
from raymerge.safetensors.index import INDEX_NAME
from raymerge.storage import urls
from raymerge.storage.checksum import crc32
from raymerge.storage.reader import Buffer, RangeReader
from raymerge.untrusted import UntrustedJSON, parse_json

MAX_INDEX_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Redo:
    """How `verify` computes items again."""

    plan: Callable[[Manifest], Plan]  # the manifest's recipe and layout planned again; RaymergeError if not
    worker: Callable[[Plan, Manifest], Any]  # a producer of the plan's items, with the manifest's facts:
    # produce(item_id) -> (bytes, ...), close()


def verify(url: str, storage_options: dict[str, Any], recompute: int = 0, seed: int | None = None,
           redo: Redo | None = None) -> list[str]:
    """Every problem found (empty: the checkpoint is sound). `recompute` items need a `redo`."""
    url = urls.normalize(url)
    fs, root = urls.filesystem(url, storage_options)
    try:
        raw = fs.cat_file(f"{root}/{MANIFEST_NAME}", start=0, end=MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return [f"{MANIFEST_NAME}: missing; this is not a finished raymerge checkpoint"]
    except OSError as e:  # NotRegular (a FIFO there must not block verify), permissions, I/O
        return [f"{MANIFEST_NAME}: cannot read it ({e.strerror or e}); this is not a finished raymerge checkpoint"]
    manifest = Manifest.from_json(raw, f"raymerge verify {urls.redact(url)}")
    reader, buf = RangeReader(storage_options), Buffer()
    try:
        return _check(fs, root, url, manifest, redo if recompute else None, recompute, seed, reader, buf)
    finally:
        reader.close()


def _check(fs, root, url, manifest: Manifest, redo, recompute, seed, reader, buf) -> list[str]:
    problems: list[str] = []
    headers = _check_shards(fs, root, url, manifest, reader, buf, problems)
    _check_index(fs, root, manifest, headers, problems)
    for item in manifest.items:
        shard = manifest.shards[item.shard]
        if shard.name not in headers:
            continue
        data = reader.read(urls.join(url, shard.name), [(item.start, item.end)], buf)[0]
        if crc32(data) != item.crc32:
            problems.append(_fault(shard.name, headers[shard.name], item, "do not match their checksum"))
    if redo is not None and not problems:
        problems += _recompute(url, manifest, headers, redo, recompute, seed, reader, buf)
    return problems


def _check_shards(fs, root, url, manifest: Manifest, reader, buf, problems) -> dict[str, Header]:
    try:
        sizes = {e["name"].rsplit("/", 1)[-1]: int(e["size"]) for e in fs.ls(root, detail=True)}
    except FileNotFoundError:
        sizes = {}
    headers = {}
    for shard in manifest.shards:
        name, size = shard.name, shard.size
        if name not in sizes:
            problems.append(f"{name}: missing")
            continue
        if sizes[name] != size:
            problems.append(f"{name}: {sizes[name]} bytes, the manifest says {size}")
            continue
        try:
            headers[name] = _header(reader, buf, urls.join(url, name), name, size)
        except RaymergeError as e:
            problems.append(f"{name}: bad header ({e})")
    return headers


def _header(reader: RangeReader, buf: Buffer, url: str, name: str, size: int) -> Header:
    def read(requests: list[tuple[int, int, int]]) -> list[bytes]:
        # copied out: the second read reuses `buf`
        return [m.tobytes() for m in reader.read(url, [(start, end) for _, start, end in requests], buf)]

    return parse_header(read_header_bytes(read, [size], [name])[0], name, size)


def _check_index(fs, root, manifest: Manifest, headers, problems) -> None:
    if len(manifest.shards) < 2:
        return
    try:
        index = parse_json(fs.cat_file(f"{root}/{INDEX_NAME}", start=0, end=MAX_INDEX_BYTES + 1),
                           max_bytes=MAX_INDEX_BYTES)
    except FileNotFoundError:
        problems.append(f"{INDEX_NAME}: missing")
        return
    except OSError as e:
        problems.append(f"{INDEX_NAME}: cannot read it ({e.strerror or e})")
        return
    except UntrustedJSON as e:
        problems.append(f"{INDEX_NAME}: refused ({e})")
        return
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not isinstance(index.get("metadata"), dict):
        problems.append(f"{INDEX_NAME}: has no 'weight_map' and 'metadata' objects")
        return
    in_headers = {e.name: shard for shard, h in headers.items() for e in h.entries}
    wrong = [t for t, f in weight_map.items() if in_headers.get(t) not in (None, f)]
    missing = [t for t in in_headers if t not in weight_map]
    if wrong or missing:
        problems.append(f"{INDEX_NAME}: {len(wrong)} tensors mapped to the wrong shard, {len(missing)} not mapped "
                        f"(first: {(wrong + missing)[0]})")
    total = sum(e.end - e.begin for h in headers.values() for e in h.entries)
    if len(headers) == len(manifest.shards) and index["metadata"].get("total_size") != total:
        problems.append(f"{INDEX_NAME}: total_size {index['metadata'].get('total_size')!r:.40} but the shards "
                        f"hold {total} tensor bytes")


def _fault(shard: str, header: Header, item: ItemEntry, what: str) -> str:
    """'shard: bytes [a, b) (tensors x, y) <what>' with the tensors that overlap the range."""
    lo, hi = item.start - header.data_start, item.end - header.data_start
    names = [e.name for e in header.entries if e.begin < hi and e.end > lo]
    where = f"tensors {', '.join(names[:4])}" + (f" and {len(names) - 4} more" if len(names) > 4 else "") \
        if names else "the header"
    return f"{shard}: bytes [{item.start}, {item.end}) ({where}) {what}"


def _recompute(url, manifest: Manifest, headers, redo: Redo, count, seed, reader, buf) -> list[str]:
    try:
        plan = redo.plan(manifest)
    except RaymergeError as e:
        return [f"recompute: the inputs cannot be planned again ({e})"]
    if plan.hash != manifest.plan_hash:
        return [f"recompute: the plan differs from the one this checkpoint was made with (plan {plan.hash[:12]}, "
                f"manifest {manifest.plan_hash[:12]}): the inputs or the recipe changed since, or the checkpoint "
                f"was made by another raymerge (this is {__version__}, it says {manifest.raymerge_version}), whose "
                "plans can differ in form; cannot compare"]
    # The same plan hash, but the manifest is data: its shards and items must be the plan's
    # before one is looked up by the plan's ids and names.
    if _cut(plan.shards, plan.items) != _cut(manifest.shards, manifest.items):
        return ["recompute: the manifest's shards and items are not those of the plan they claim to be "
                f"(plan {plan.hash[:12]}); this manifest was damaged or written by hand"]
    try:
        worker = redo.worker(plan, manifest)  # refuses facts unlike what the plan's statistics passes record
    except RaymergeError as e:
        return [f"recompute: {e}"]
    problems = []
    try:
        for item_id in random.Random(seed).sample(range(len(plan.items)), min(count, len(plan.items))):
            item = plan.items[item_id]
            shard = plan.shards[item.shard]
            want, _, _ = worker.produce(item_id)
            got = reader.read(urls.join(url, shard.name), [(item.start, item.end)], buf)[0]
            if want != got:
                problems.append(_fault(shard.name, headers[shard.name], manifest.items[item_id],
                                       "differ from the bytes computed again from the inputs"))
    finally:
        worker.close()
    return problems


def _cut(shards, items) -> tuple[list[tuple[str, int]], list[tuple[int, int, int, int]]]:
    """What a plan and a manifest must agree on for items to be compared by id: (name, size) of
    every shard, (id, shard, start, end) of every item."""
    return [(s.name, s.size) for s in shards], [(i.id, i.shard, i.start, i.end) for i in items]
