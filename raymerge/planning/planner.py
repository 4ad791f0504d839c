"""Phase 2, plan: match tensors across inputs, validate, lay out the output, cut it into items.

Pure data in, pure data out: no Ray, no torch, no network. The result is a frozen `Plan` whose
hash identifies the run (same inputs, recipe and options: same hash).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from raymerge.errors import PlanError
from raymerge.plan import InputFile, Item, Plan, ShardPlan, Source, TensorPlan, Term
from raymerge.planning.inputs import Checkpoint, TensorRef
from raymerge.planning.layout import Slot, cut_points, layout_shard, pieces_of, shard_names, split_into_shards
from raymerge.safetensors.dtypes import ITEMSIZE, is_float

S3_MIN_PART = 5 * 1024 * 1024
S3_MAX_PARTS = 10_000


@dataclass(frozen=True, slots=True)
class PlanOptions:
    shard_size: int = 5_000_000_000
    item_size: int = 32 * 1024 * 1024
    dtype: str | None = None  # output dtype of float tensors; None: the anchor's (or F32 when extracting)
    min_part: int = 0  # S3: 5 MiB
    max_parts: int = 0  # S3: 10,000 parts a shard; 0: no limit


@dataclass(frozen=True, slots=True)
class TermSpec:
    """One recipe term: `scale * (a - b)`, or `scale * a` when b is None."""

    scale: float
    a: Checkpoint
    b: Checkpoint | None


def build_plan(anchor: Checkpoint | None, terms: list[TermSpec], options: PlanOptions) -> Plan:
    if anchor is None and not terms:
        raise PlanError("plan: the recipe has no anchor and no terms; nothing to compute")
    files, file_ids = _files(anchor, terms)
    reference = anchor if anchor is not None else terms[0].a
    _check_match(reference, terms)
    tensors = []
    for name, ref in reference.tensors.items():
        tensors.append(_tensor_rule(name, ref, anchor, terms, file_ids, options))
    return _layout(files, tensors, anchor or reference, options)


def _files(anchor: Checkpoint | None, terms: list[TermSpec]) -> tuple[list[InputFile], dict[tuple[str, int], int]]:
    """Every input shard once, and (checkpoint url, file index) -> plan file id."""
    files: list[InputFile] = []
    ids: dict[tuple[str, int], int] = {}
    by_url: dict[str, int] = {}
    ckpts = ([anchor] if anchor else []) + [c for t in terms for c in (t.a, t.b) if c is not None]
    for ckpt in ckpts:
        for i, f in enumerate(ckpt.files):
            if f.url not in by_url:
                by_url[f.url] = len(files)
                files.append(InputFile(ckpt.role, f.url, f.size, f.fingerprint))
            ids[(ckpt.url, i)] = by_url[f.url]
    return files, ids


def _check_match(reference: Checkpoint, terms: list[TermSpec]) -> None:
    """Every tensor of the reference in every input, same shape: all problems in one error."""
    problems = []
    for term in terms:
        for other in (term.a, term.b):
            if other is None or other is reference:
                continue
            missing = [n for n in reference.tensors if n not in other.tensors]
            extra = [n for n in other.tensors if n not in reference.tensors]
            if missing:
                problems.append(f"{len(missing)} tensors of --{reference.role} missing from --{other.role}: "
                                + ", ".join(missing))
            if extra:
                problems.append(f"{len(extra)} tensors of --{other.role} not in --{reference.role}: "
                                + ", ".join(extra))
            for name, ref in reference.tensors.items():
                theirs = other.tensors.get(name)
                if theirs is not None and theirs.shape != ref.shape:
                    problems.append(f"{name}: shape {list(ref.shape)} in --{reference.role} but "
                                    f"{list(theirs.shape)} in --{other.role}")
    if problems:
        raise PlanError(f"plan: the inputs do not line up ({len(problems)} problems): " + "; ".join(problems)
                        + ". Check that every input is the same architecture and size")


def _source(ckpt: Checkpoint, ref: TensorRef, file_ids: dict[tuple[str, int], int]) -> Source:
    return Source(file_ids[(ckpt.url, ref.file)], ref.dtype, ref.start, ref.nbytes)


def _tensor_rule(name: str, ref: TensorRef, anchor: Checkpoint | None, terms: list[TermSpec],
                 file_ids: dict[tuple[str, int], int], options: PlanOptions) -> tuple:
    """(name, dtype, shape, anchor source, terms) of one output tensor."""
    anchor_src = _source(anchor, anchor.tensors[name], file_ids) if anchor is not None else None
    if not is_float(ref.dtype):
        # Integer and bool tensors (ids, masks) have no meaningful difference: keep them as they are.
        if anchor_src is None:
            raise PlanError(f"plan: tensor {name!r} is {ref.dtype}, which has no difference to extract; "
                            "extract only from checkpoints whose tensors are all floating point")
        return name, ref.dtype, ref.shape, anchor_src, ()
    for term in terms:
        for ckpt in (term.a, term.b):
            if ckpt is not None and not is_float(ckpt.tensors[name].dtype):
                raise PlanError(f"plan: tensor {name!r} is {ckpt.tensors[name].dtype} in --{ckpt.role} but "
                                f"{ref.dtype} elsewhere; the checkpoints do not match")
    plan_terms = tuple(
        Term(t.scale, _source(t.a, t.a.tensors[name], file_ids),
             _source(t.b, t.b.tensors[name], file_ids) if t.b is not None else None)
        for t in terms)
    dtype = options.dtype or (ref.dtype if anchor is not None else "F32")
    return name, dtype, ref.shape, anchor_src, plan_terms


def _layout(files: list[InputFile], rules: list[tuple], aux_from: Checkpoint, options: PlanOptions) -> Plan:
    sizes = [_nbytes(dtype, shape) for _, dtype, shape, _, _ in rules]
    groups = split_into_shards(sizes, options.shard_size)
    names = shard_names(len(groups))
    tensors: list[TensorPlan] = []
    shards: list[ShardPlan] = []
    items: list[Item] = []
    for s, (name, group) in enumerate(zip(names, groups)):
        header, starts = layout_shard([(rules[i][0], rules[i][1], rules[i][2], sizes[i]) for i in group])
        first = len(tensors)
        for i, start in zip(group, starts):
            tname, dtype, shape, anchor, terms = rules[i]
            tensors.append(TensorPlan(tname, dtype, shape, s, start, sizes[i], anchor, terms))
        size = len(header) + sum(sizes[i] for i in group)
        slots = [Slot(t.start, t.nbytes, ITEMSIZE[t.dtype]) for t in tensors[first:]]
        item_size = _item_size(size, options)
        cuts = cut_points(size, len(header), slots, item_size)
        shard_items = []
        for part, (lo, hi) in enumerate(zip(cuts, cuts[1:]), start=1):
            shard_items.append(len(items))
            items.append(Item(len(items), s, part, lo, hi, pieces_of(lo, hi, len(header), slots, first)))
        shards.append(ShardPlan(name, size, header, tuple(range(first, len(tensors))), tuple(shard_items)))
    digest = _hash(files, tensors, shards, items)
    return Plan(tuple(files), tuple(tensors), tuple(shards), tuple(items), aux_from.aux_files, digest)


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


def _item_size(shard_size: int, options: PlanOptions) -> int:
    """The item size for one shard: the option, raised so that S3's part-count limit holds."""
    size = max(options.item_size, options.min_part)
    if options.max_parts and -(-shard_size // size) > options.max_parts:
        size = -(-shard_size // options.max_parts)
    return size


def _hash(files, tensors, shards, items) -> str:
    """A stable digest of everything that decides the output bytes (reprs of frozen dataclasses)."""
    h = hashlib.sha256()
    for f in files:
        h.update(repr(f).encode())
    for t in tensors:
        h.update(repr(t).encode())
    for s in shards:
        h.update(repr((s.name, s.size, s.header)).encode())
    for i in items:
        h.update(repr((i.shard, i.part, i.start, i.end)).encode())
    return h.hexdigest()
