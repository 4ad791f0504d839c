"""Phase 2, plan: match tensors across inputs, validate, lay out the output, cut it into items.

Pure data in, pure data out: no Ray, no torch, no network. The result is a frozen `Plan` whose
hash identifies the run (same inputs, recipe and options: same hash).
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

from raymerge.errors import PlanError
from raymerge.methods import METHODS
from raymerge.ops.kernel import COMPUTE_DTYPES
from raymerge.ops.rules import compile_patterns, is_head_name, is_vocab_tensor, tied_embedding
from raymerge.planning.inputs import Checkpoint, TensorRef
from raymerge.planning.layout import Slot, cut_points, layout_shard, pieces_of, shard_names, split_into_shards
from raymerge.text import listed
from raymerge.planning.plan import (AuxFile, InputFile, Item, Plan, RowMap, RowOverride, ShardPlan, Source, TensorPlan,
                                    Term)
from raymerge.planning.vocabulary import TOKENIZER_FILES, RowRun, Vocabulary
from raymerge.planning.schedule import NAMED, Scale, count_layers
from raymerge.planning.slices import LayerSlice, Origin, stacked, whole_model
from raymerge.safetensors.dtypes import ITEMSIZE, is_float, nbytes, numel

# Files whose chat template / EOS settings come from the chat model (see commit.aux).
PATCHED = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


@dataclass(frozen=True, slots=True)
class PlanOptions:
    shard_size: int = 5_000_000_000
    item_size: int = 32 * 1024 * 1024
    dtype: str | None = None  # output dtype of float tensors; None: the anchor's (or F32 when extracting)
    # The output writer's part rules (storage.writers.part_rules; S3: 5 MiB, 10,000); 0: no limit.
    min_part: int = 0  # bytes: every item of a shard but its last at least this
    max_parts: int = 0  # items a shard at most


@dataclass(frozen=True, slots=True)
class TermSpec:
    """One recipe term: `scale * (a - b)`, or `scale * a` when b is None (a stored vector). The
    scale is one number, or a schedule that gives each tensor its own (planning.schedule)."""

    scale: float | Scale
    a: Checkpoint
    b: Checkpoint | None
    values: tuple[tuple[str, float | Scale], ...] = ()  # the method's other per-vector parameters (density, ...)


@dataclass(frozen=True)
class RecipeSpec:
    """What to compute, with the inputs resolved: the planner's whole input besides options."""

    anchor: Checkpoint | None  # None: extract (the accumulator starts at zero)
    terms: tuple[TermSpec, ...]
    vocab: str = "overlap"  # rows of embedding/head tensors when vocabularies differ: see ops.rules
    skip: tuple[str, ...] = ()  # regexes of tensors copied from the anchor unchanged
    special_tokens: tuple[tuple[int, int], ...] = ()  # (anchor row, row of special_from)
    special_from: Checkpoint | None = None
    template_from: Checkpoint | None = None  # whose chat template and EOS the tokenizer takes
    aux_from: Checkpoint | None = None  # whose config/tokenizer files are copied (default: anchor)
    method: str = "sum"  # the name of the method (raymerge.methods) that combines the terms
    params: tuple[tuple[str, float | bool], ...] = ()  # the method's parameters, (name, value)
    # mergekit's compute dtype: "F32" (raymerge's own: float32, rounded once), "BF16" or "F16", or
    # INPUTS (each tensor at its inputs' dtype when they share one: mergekit's without `dtype`).
    compute: str = "F32"
    slices: tuple[LayerSlice, ...] = ()  # a frankenmerge's (planning.slices); (): every tensor of every input
    # A mergekit tokenizer source's vocabulary (planning.vocabulary) and the models its runs index.
    vocabulary: Vocabulary | None = None
    vocab_models: tuple[Checkpoint, ...] = ()


INPUTS = "inputs"


@dataclass(frozen=True, slots=True)
class _Rule:
    """What one output tensor is made from, before it has a place in a shard."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    anchor: Source | None
    terms: tuple[Term, ...] = ()
    overrides: tuple[RowOverride, ...] = ()
    rule: str = "sum"


def build_plan(spec: RecipeSpec, options: PlanOptions) -> Plan:
    if spec.anchor is None and not spec.terms:
        raise PlanError("plan: the recipe has no anchor and no terms; nothing to compute")
    files, file_ids = _files(spec)
    reference = spec.anchor if spec.anchor is not None else spec.terms[0].a
    try:
        skip = compile_patterns(spec.skip)
    except ValueError as e:
        raise PlanError(f"plan: {e}") from e
    problems = _Problems(reference.role)
    layers = count_layers(list(reference.tensors), reference.config)
    if spec.slices:
        origins, layer_map = stacked(spec.slices, spec.anchor, [t.a for t in spec.terms])
    else:
        origins, layer_map = whole_model(list(reference.tensors), len(spec.terms)), ()
    rules = [_tensor_rule(name, origin, spec, skip, file_ids, options, problems, layers) for name, origin in origins]
    if not spec.slices:  # a frankenmerge leaves layers out
        _check_extras(spec, reference, skip, problems)
    if spec.special_tokens and not any(r.overrides for r in rules):
        problems.other.append("--special-tokens: no embedding or output-head tensor found in "
                              f"--{reference.role} to set rows of")
    problems.raise_if_any()
    return _layout(files, rules, _aux_plan(spec, reference), options, spec, layer_map)


class _Problems:
    """Every mismatch found while planning, raised together as one error."""

    def __init__(self, reference: str) -> None:
        self.reference = reference
        self.missing: dict[str, list[str]] = {}
        self.extra: dict[str, list[str]] = {}
        self.other: list[str] = []

    def raise_if_any(self) -> None:
        parts = [f"{len(v)} tensors of --{self.reference} missing from --{role}: " + listed(v)
                 for role, v in self.missing.items()]
        parts += [f"{len(v)} tensors of --{role} not in --{self.reference}: " + listed(v)
                  for role, v in self.extra.items()]
        parts += self.other
        if parts:
            more = f"; and {len(parts) - 5} more problems" if len(parts) > 5 else ""
            raise PlanError(f"plan: the inputs do not line up ({len(parts)} problems): " + "; ".join(parts[:5])
                            + more + ". Check that every input is the same architecture and size")


def _files(spec: RecipeSpec) -> tuple[list[InputFile], dict[tuple[str, int], int]]:
    """Every input shard once, and (checkpoint url, file index) -> plan file id."""
    files: list[InputFile] = []
    ids: dict[tuple[str, int], int] = {}
    by_url: dict[str, int] = {}
    ckpts = [spec.anchor] + [c for t in spec.terms for c in (t.a, t.b)] + [spec.special_from]
    for ckpt in ckpts:
        if ckpt is None:
            continue
        for i, f in enumerate(ckpt.files):
            if f.url not in by_url:
                by_url[f.url] = len(files)
                files.append(InputFile(ckpt.role, f.url, f.size, f.fingerprint, f.version))
            ids[(ckpt.url, i)] = by_url[f.url]
    return files, ids


def _lookup(name: str, ckpt: Checkpoint) -> TensorRef | None:
    """The tensor `name` of a checkpoint, or the embedding a tied head shares."""
    alias = tied_embedding(name, ckpt.tensors, ckpt.config)
    return ckpt.tensors.get(name) or (ckpt.tensors[alias] if alias else None)


def _source(ckpt: Checkpoint, ref: TensorRef, file_ids, offset: int = 0, nbytes: int | None = None) -> Source:
    return Source(file_ids[(ckpt.url, ref.file)], ref.dtype, ref.start + offset,
                  ref.nbytes if nbytes is None else nbytes)


def _tensor_rule(name: str, origin: Origin, spec: RecipeSpec, skip, file_ids, options: PlanOptions,
                 problems: _Problems, layers: int) -> _Rule:
    """What output tensor `name` is made from (`origin`: which tensor of each input), and the rule
    that says why. `layers`: the model's, for scale schedules."""
    if spec.anchor is not None:
        reference, ref_name = spec.anchor, origin.anchor
    else:
        reference, ref_name = spec.terms[origin.terms[0][0]].a, origin.terms[0][1]
    ref = _lookup(ref_name, reference)
    if ref is None:  # a frankenmerge's layer missing from the model it names
        problems.missing.setdefault(reference.role, []).append(ref_name)
        return _Rule(name, "F32", (), None)
    anchor = _source(spec.anchor, ref, file_ids) if spec.anchor is not None else None
    if not is_float(ref.dtype):
        # Integer and bool tensors (ids, masks) have no meaningful difference: keep them as they are.
        if anchor is None:
            problems.other.append(f"{name}: is {ref.dtype}, which has no difference to extract")
        return _Rule(name, ref.dtype, ref.shape, anchor, rule="copy")
    dtype = options.dtype or (ref.dtype if anchor is not None else "F32")
    vocab = is_vocab_tensor(name, ref.shape, reference.config, tuple(reference.tensors))
    new_vocabulary = vocab and spec.vocabulary is not None and spec.vocabulary.size is not None
    if anchor is not None and any(p.search(name) for p in skip):
        if new_vocabulary:
            problems.other.append(f"{name}: --skip keeps the anchor's rows, and the tokenizer source gives the output "
                                  f"{spec.vocabulary.size}; leave the embedding and head out of --skip")
        return _Rule(name, dtype, ref.shape, anchor, rule="skip")
    overrides = _overrides(name, ref, spec, file_ids, problems) if vocab else ()
    if new_vocabulary:
        return _tokenizer_rule(name, ref, dtype, spec, file_ids, problems, layers, origin, overrides)
    if vocab and spec.vocab == "skip":
        if anchor is None:  # nothing to keep the rows of
            problems.other.append(f"{name}: --vocab skip keeps the anchor's rows, and this recipe has no anchor "
                                  "(a base or cp model); pass --vocab overlap")
        return _Rule(name, dtype, ref.shape, anchor, overrides=overrides, rule="vocab-skip")
    found: list[list[TensorRef | None]] = []
    rows = ref.shape[0] if ref.shape else 0
    fewest = reference.role  # the input with the fewest rows (an anchorless recipe's output must be its)
    terms_in = [spec.terms[j] for j, _ in origin.terms]
    for term, (_, a_name) in zip(terms_in, origin.terms):
        pair: list[TensorRef | None] = []
        for ckpt, wanted in ((term.a, a_name), (term.b, origin.anchor)):
            other = _lookup(wanted, ckpt) if ckpt is not None else None
            pair.append(other)
            if ckpt is None or (ckpt is reference and wanted == ref_name):
                continue
            if other is None:
                problems.missing.setdefault(ckpt.role, []).append(wanted)
            elif not is_float(other.dtype):
                problems.other.append(f"{name}: {other.dtype} in --{ckpt.role} but {ref.dtype} in --{reference.role}")
            elif other.shape != ref.shape:
                if vocab and other.shape[1:] == ref.shape[1:] and spec.vocab != "error":
                    if other.shape[0] < rows:
                        rows, fewest = other.shape[0], ckpt.role
                elif vocab and other.shape[1:] == ref.shape[1:]:
                    problems.other.append(
                        f"{name}: {ref.shape[0]} rows in --{reference.role} but {other.shape[0]} in --{ckpt.role} "
                        "(an expanded vocabulary); pass --vocab overlap or --vocab skip")
                else:
                    problems.other.append(f"{name}: shape {list(ref.shape)} in --{reference.role} but "
                                          f"{list(other.shape)} in --{ckpt.role}")
        found.append(pair)
    if any(r is None for pair, t in zip(found, terms_in) for r, c in zip(pair, (t.a, t.b)) if c is not None):
        return _Rule(name, dtype, ref.shape, anchor, overrides=overrides)  # a missing input: reported above
    limit = None if not ref.shape or rows >= ref.shape[0] else rows * numel(ref.shape[1:])
    if limit is not None and anchor is None:  # rows past `rows` would come from no input
        problems.other.append(f"{name}: {ref.shape[0]} rows in --{reference.role} but {rows} in --{fewest}, and no "
                              f"anchor (a base or cp model) to keep the rest from; list --{fewest}'s model first "
                              "(the output then takes its rows: the ones every input has)")
    terms = []
    for term, (ra, rb) in zip(terms_in, found):
        # Each input's first `rows` rows: the shared ones (a larger vocabulary's extra rows are not read).
        srcs = [_source(c, r, file_ids, nbytes=None if r.shape[0] == rows else rows * numel(r.shape[1:])
                        * ITEMSIZE[r.dtype]) if r is not None else None for c, r in ((term.a, ra), (term.b, rb))]
        values = tuple((k, _at(v, name, layers, origin)) for k, v in term.values)
        terms.append(Term(_at(term.scale, name, layers, origin), srcs[0], srcs[1], limit, values))
    return _Rule(name, dtype, ref.shape, anchor, tuple(terms), overrides, "vocab-overlap" if limit else "sum")


def _tokenizer_rule(name: str, ref: TensorRef, dtype: str, spec: RecipeSpec, file_ids, problems: _Problems,
                    layers: int, origin: Origin, overrides: tuple) -> _Rule:
    """A vocabulary tensor in the output tokenizer's vocabulary: every input's rows gathered by
    token (planning.vocabulary), in the compute dtype (or the inputs' one dtype)."""
    vocab = spec.vocabulary
    rows = numel(ref.shape[1:])
    term_specs = [spec.terms[j] for j, _ in origin.terms]  # a frankenmerge's: its first or last slice's
    used = {c.url for t in term_specs for c in (t.a, t.b, spec.anchor) if c is not None}
    group = tuple(m for m, c in enumerate(spec.vocab_models) if c.url in used)
    if group not in vocab.runs:
        raise AssertionError(f"{name}: no vocabulary runs for models {group}")  # build.py names every group
    found = {spec.vocab_models[m].url: _lookup(name, spec.vocab_models[m]) for m in group}
    if any(r is None or r.shape[1:] != ref.shape[1:] or not is_float(r.dtype) for r in found.values()):
        problems.other.append(f"{name}: not a float tensor of rows of {list(ref.shape[1:])} in every model, which "
                              "a tokenizer source needs")
        return _Rule(name, dtype, ref.shape, None)
    dtypes = {r.dtype for r in found.values()}
    gather = spec.compute if spec.compute != INPUTS else dtypes.pop() if len(dtypes) == 1 else None
    if gather not in (None, "F32", "BF16", "F16"):
        problems.other.append(f"{name}: the models hold it in {gather}, in which raymerge does not gather rows; give "
                              "the file a dtype (bfloat16, float16 or float32)")
        return _Rule(name, dtype, ref.shape, None)
    if gather is None:
        problems.other.append(f"{name}: the models hold it in {', '.join(sorted(dtypes))}; give the file a dtype "
                              "(the rows of a tokenizer source are gathered in one)")
        return _Rule(name, dtype, ref.shape, None)

    def source(member: tuple[RowRun, ...], ckpt: Checkpoint) -> Source | None:
        runs = []
        for run in member:
            parts = []
            for k, in_row in run.parts:  # model k's rows
                donor = spec.vocab_models[k]
                r = found[donor.url]
                if in_row + (run.count if len(run.parts) == 1 else 1) > r.shape[0]:
                    problems.other.append(f"{name}: --{donor.role}'s tokenizer has ids up to "
                                          f"{in_row + run.count - 1}, past the tensor's {r.shape[0]} rows; fix its "
                                          "config's vocab_size or its tokenizer")
                    return None
                parts.append((file_ids[(donor.url, r.file)], r.start + in_row * rows * ITEMSIZE[r.dtype], r.dtype))
            runs.append((run.row, run.count, tuple(parts)))
        first = found[ckpt.url]
        return Source(file_ids[(ckpt.url, first.file)], gather, 0, vocab.size * rows * ITEMSIZE[gather],
                      RowMap(rows, tuple(runs), vocab.tokens))

    # Each model's once: the base model is the anchor and every vector's b.
    sources = {spec.vocab_models[m].url: source(member, spec.vocab_models[m])
               for m, member in zip(group, vocab.runs[group])}

    def gathered(ckpt: Checkpoint | None) -> Source | None:
        return None if ckpt is None else sources[ckpt.url]

    terms = tuple(Term(_at(t.scale, name, layers, origin), gathered(t.a), gathered(t.b), None,
                       tuple((k, _at(v, name, layers, origin)) for k, v in t.values)) for t in term_specs)
    return _Rule(name, dtype, (vocab.size, *ref.shape[1:]), gathered(spec.anchor), terms, overrides, "vocab-tokenizer")


def _at(value: float | Scale, name: str, layers: int, origin: Origin) -> float:
    """A per-vector value for one tensor: a schedule's (at the layer of the slice it lies in, where
    it comes from a frankenmerge's slice), or the number."""
    if not isinstance(value, Scale):
        return value
    return value.at(name, layers) if origin.layer == NAMED else value.at(name, origin.layers, origin.layer)


def _overrides(name: str, ref: TensorRef, spec: RecipeSpec, file_ids, problems: _Problems) -> tuple:
    """Special-token rows of a vocabulary tensor, taken from the chat model's rows."""
    if not spec.special_tokens:
        return ()
    chat = spec.special_from
    other = _lookup(name, chat) if chat is not None else None
    if chat is None or other is None:
        problems.other.append(f"--special-tokens: {name} has no counterpart in a chat model to take rows from")
        return ()
    row_bytes = numel(other.shape[1:]) * ITEMSIZE[other.dtype]
    out = []
    for cp_row, chat_row in spec.special_tokens:
        if cp_row >= ref.shape[0] or chat_row >= other.shape[0]:
            problems.other.append(f"--special-tokens {cp_row}:{chat_row}: {name} has {ref.shape[0]} rows in "
                                  f"the output and {other.shape[0]} in --{chat.role}")
            continue
        out.append(RowOverride(cp_row, _source(chat, other, file_ids, chat_row * row_bytes, row_bytes)))
    return tuple(out)


def _check_extras(spec: RecipeSpec, reference: Checkpoint, skip, problems: _Problems) -> None:
    """Tensors an input has that the output will not: an error, except a tied-away head or a skip."""
    for ckpt in [c for t in spec.terms for c in (t.a, t.b)]:
        if ckpt is None or ckpt is reference:
            continue
        for name, ref in ckpt.tensors.items():
            if name in reference.tensors or any(p.search(name) for p in skip):
                continue
            if is_head_name(name) and tied_embedding(name, reference.tensors, reference.config):
                continue  # reference ties its head to its embedding: the head is that tensor
            problems.extra.setdefault(ckpt.role, []).append(name)


def _aux_plan(spec: RecipeSpec, reference: Checkpoint) -> tuple[AuxFile, ...]:
    """Config and tokenizer files: the anchor's, with the chat model's chat template and EOS."""
    source = spec.aux_from or spec.anchor or reference
    ours = {posixpath.basename(u): u for u in source.aux_files}
    theirs = {posixpath.basename(u): u for u in spec.template_from.aux_files} if spec.template_from else {}
    if spec.vocabulary is not None:
        # The output tokenizer's files replace the tokenizer's (Plan.tokenizer), the chat model's
        # template and EOS in them; generation_config's EOS ids are those tokens' new ids (Plan.eos_ids).
        return tuple(AuxFile(name, url) for name, url in ours.items() if name not in TOKENIZER_FILES)
    aux = []
    for name, url in ours.items():
        if name == "chat_template.jinja" and theirs:
            continue  # the chat model's template replaces it (or its tokenizer_config's does)
        aux.append(AuxFile(name, url, theirs.get(name) if name in PATCHED else None))
    for name in ("chat_template.jinja", *PATCHED):
        if name in theirs and name not in ours:
            aux.append(AuxFile(name, theirs[name]))
    return tuple(aux)


def _layout(files: list[InputFile], rules: list[_Rule], aux: tuple[AuxFile, ...], options: PlanOptions,
            spec: RecipeSpec, layer_map: tuple = ()) -> Plan:
    sizes = [nbytes(r.dtype, r.shape) for r in rules]
    groups = split_into_shards(sizes, options.shard_size)
    names = shard_names(len(groups))
    tensors: list[TensorPlan] = []
    shards: list[ShardPlan] = []
    items: list[Item] = []
    for s, (name, group) in enumerate(zip(names, groups)):
        header, starts = layout_shard([(rules[i].name, rules[i].dtype, rules[i].shape, sizes[i]) for i in group])
        first = len(tensors)
        for i, start in zip(group, starts):
            r = rules[i]
            tensors.append(TensorPlan(r.name, r.dtype, r.shape, s, start, sizes[i], r.anchor, r.terms, r.overrides,
                                      r.rule, spec.method, spec.params, _compute(spec.compute, r)))
            problem = METHODS[spec.method].check(tensors[-1]) if r.terms else None
            if problem:
                raise PlanError(f"{spec.method}: tensor {r.name}: {problem}")
        size = len(header) + sum(sizes[i] for i in group)
        slots = [Slot(t.start, t.nbytes, ITEMSIZE[t.dtype], _row_bytes(t)) for t in tensors[first:]]
        item_size = _item_size(size, options)
        cuts = cut_points(size, len(header), slots, item_size)
        shard_items = []
        for part, (lo, hi) in enumerate(zip(cuts, cuts[1:]), start=1):
            shard_items.append(len(items))
            items.append(Item(len(items), s, part, lo, hi, pieces_of(lo, hi, len(header), slots, first)))
        shards.append(ShardPlan(name, size, header, tuple(range(first, len(tensors))), tuple(shard_items)))
    digest = _hash(files, tensors, shards, items)
    vocab = spec.vocabulary
    return Plan(tuple(files), tuple(tensors), tuple(shards), tuple(items), aux, digest, layer_map,
                tokenizer=vocab.files if vocab else (), vocab_size=vocab.size if vocab else None,
                eos_ids=vocab.eos_ids if vocab else None)


def _row_bytes(t: TensorPlan) -> int:
    """A tensor's row in bytes where its method computes with whole rows in each piece (0: none
    needed): the last dimension's, or the whole tensor's for one dimension."""
    if not t.terms or not METHODS[t.method].whole_rows:
        return 0
    return ITEMSIZE[t.dtype] * (t.shape[-1] if len(t.shape) > 1 else numel(t.shape))


def _compute(compute: str, r: _Rule) -> str | None:
    """A tensor's compute dtype (TensorPlan.compute): a narrower one than float32, or None. With
    INPUTS, its inputs' dtype when they all share it (mergekit promotes: BF16 with F16 is float32).
    An integer or bool tensor (a buffer) is copied as it is, whatever the compute dtype."""
    if not is_float(r.dtype):
        return None
    if compute == INPUTS:
        dtypes = {s.dtype for s in (r.anchor, *(x for t in r.terms for x in (t.a, t.b))) if s is not None}
        compute = dtypes.pop() if len(dtypes) == 1 else "F32"
    return compute if compute in COMPUTE_DTYPES else None


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
