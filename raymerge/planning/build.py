"""Building a plan from a recipe: resolve every input (phase 1), then plan (phase 2); and the plan
described as data (`raymerge plan --json`)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from raymerge.commit.card import card_names
from raymerge.errors import InputError
from raymerge.methods import ELEMENTWISE, METHODS, PASS_ORDER, pass_named
from raymerge.planning import tokenizer_process
from raymerge.planning.inputs import resolve
from raymerge.planning.passes import pass_items, pass_read_bytes, statistics_passes, tensor_passes
from raymerge.planning.plan import Plan
from raymerge.planning.planner import PlanOptions, RecipeSpec, TermSpec, build_plan
from raymerge.planning.schedule import layer_of
from raymerge.planning.slices import LayerSlice
from raymerge.planning.vocabulary import TokenizerSpec, Vocabulary, has_tokenizer
from raymerge.planning.vocabulary import build as build_vocabulary
from raymerge.storage import urls
from raymerge.storage.writers import part_rules

if TYPE_CHECKING:  # planning reads a recipe's fields; config imports planning, never the other way
    from raymerge.config import Recipe, RunOptions

log = logging.getLogger("raymerge")


def make_plan(recipe: Recipe, run_options: RunOptions) -> Plan:
    spec = resolve_recipe(recipe, run_options.storage_options)
    rules = part_rules(recipe.out)  # items line up with the output writer's parts (none without --out)
    options = PlanOptions(shard_size=run_options.shard_size, item_size=run_options.item_size, dtype=recipe.dtype,
                          min_part=rules.min_part, max_parts=rules.max_parts)
    started = time.perf_counter()
    result = build_plan(spec, options)
    if run_options.card:
        result = replace(result, card=card_names(recipe))
    log.info("plan: %d tensors, %d shards, %d items, %.2f GB out, in %.2fs (hash %s)", len(result.tensors),
             len(result.shards), len(result.items), result.output_bytes / 1e9, time.perf_counter() - started,
             result.hash[:12])
    return result


def resolve_recipe(recipe: Recipe, storage_options: dict[str, Any]) -> RecipeSpec:
    """Phase 1: resolve every input of the recipe (concurrently; each URL once)."""
    started = time.perf_counter()
    roles = input_roles(recipe)
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = dict(zip(roles, pool.map(lambda u: resolve(roles[u], u, storage_options), roles)))
    log.info("resolve: %d inputs, %d shards, in %.2fs", len(found), sum(len(c.files) for c in found.values()),
             time.perf_counter() - started)
    how = recipe.how
    role = {"cp": recipe.cp, "base": recipe.base, how.vectors: recipe.vectors[0][0] if recipe.vectors else None}
    checkpoint = {key: found[url] if url else None for key, url in role.items()}
    minus = checkpoint[how.minus] if how.minus else None
    terms = tuple(TermSpec(scale, found[url], minus, tuple((name, given[i]) for name, given in recipe.per_vector))
                  for i, (url, scale) in enumerate(recipe.vectors))
    first = checkpoint[how.vectors]
    anchor = checkpoint[how.anchor] if how.anchor else None
    template_from = first if recipe.chat_template and how.template else None
    vocabulary, vocab_models = _vocabulary(recipe, terms, anchor, checkpoint["base"] if how.mergekit else anchor,
                                           storage_options, template_from)
    return RecipeSpec(anchor=anchor, terms=terms, vocab=recipe.vocab,
                      skip=recipe.skip, special_tokens=recipe.special_tokens,
                      special_from=first if how.minus else None, template_from=template_from,
                      aux_from=checkpoint[how.aux] or first, method=recipe.method_name, params=recipe.params,
                      compute=recipe.compute_dtype, slices=_slices(recipe), vocabulary=vocabulary,
                      vocab_models=vocab_models)


def _vocabulary(recipe: Recipe, terms, anchor, base, storage_options, template_from) -> tuple[Vocabulary | None, tuple]:
    """A tokenizer source's vocabulary over the merge's models: the vectors' in the file's order,
    then the anchor and what they are taken minus (the base model), where not among them.
    `--vocab union` is the union source over cp's tokenizer (`base`: the anchor), so cp keeps its ids."""
    spec = recipe.tokenizer or (TokenizerSpec("union") if recipe.vocab == "union" else None)
    if spec is None:
        return None, ()
    if recipe.tokenizer is None and not recipe.how.minus:
        raise InputError(f"--vocab union maps the rows of models by token, and a stored --{recipe.how.vectors} holds "
                         "differences, whose missing rows no model gives; run raymerge merge with the chat and base "
                         "models and --vocab union instead")
    models: list = []
    for ckpt in [*(t.a for t in terms), anchor, *(t.b for t in terms)]:
        if ckpt is not None and all(c.url != ckpt.url for c in models):
            models.append(ckpt)
    groups = _groups(recipe, terms, anchor, models)
    if spec.source == "base" and not spec.tokens and spec.chat_template is None and \
            not any(has_tokenizer(c) for c in models):
        return None, ()  # no tokenizer anywhere: the base model's files as they are (raymerge's reading before)
    started = time.perf_counter()
    # In a process of its own: transformers brings torch (600 MB resident) that the driver never needs.
    vocabulary = tokenizer_process.run(build_vocabulary, spec, models, base, storage_options, template_from, groups)
    log.info("tokenizer: %s, %s tokens, in %.2fs", spec.source if spec.source in ("base", "union") else
             "a model's" if spec.source else "a chat template", vocabulary.size or "the donor's",
             time.perf_counter() - started)
    return vocabulary, tuple(models)


def _groups(recipe: Recipe, terms, anchor, models: list) -> tuple[tuple[int, ...], ...]:
    """The sets of models (indices into `models`) the embedding and head are merged from: every
    model; a frankenmerge's first slice's for the embedding and last slice's for the head (with the
    anchor, where the recipe has one), as planning.slices stacks them."""
    index = {c.url: i for i, c in enumerate(models)}

    def group(js) -> tuple[int, ...]:
        used = {c.url for j in js for c in (terms[j].a, terms[j].b, anchor) if c is not None}
        return tuple(sorted(index[u] for u in used))

    if not recipe.slices:
        return (group(range(len(terms))),)
    slices = _slices(recipe)
    return tuple(dict.fromkeys((group(slices[0].terms), group(slices[-1].terms))))


def _slices(recipe: Recipe) -> tuple[LayerSlice, ...]:
    """A frankenmerge's slices over the recipe's terms: each slice the next vectors, in order."""
    out, j = [], 0
    for layers, base in recipe.slices:
        first, end = layers[0] if layers else base
        count = end - first
        out.append(LayerSlice(tuple(range(j, j + len(layers))), tuple(a for a, _ in layers), count,
                              base[0] if base else None))
        j += len(layers)
    return tuple(out)


def input_roles(recipe: Recipe) -> dict[str, str]:
    """Every input URL of the recipe once, with the role its messages name it by."""
    roles: dict[str, str] = {}
    if recipe.cp:
        roles[recipe.cp] = "cp"
    if recipe.base:
        roles.setdefault(recipe.base, "base")
    name = recipe.how.vectors
    for i, (url, _) in enumerate(recipe.vectors):
        roles.setdefault(url, name if i == 0 else f"{name}[{i + 1}]")
    return roles


def _method_passes(the_plan: Plan, method: str) -> list[str]:
    """The passes a method's tensors need in this plan (the elementwise one alone when none computes)."""
    used = {p for t in the_plan.tensors if t.method == method and t.terms for p in tensor_passes(t)}
    return [p for p in PASS_ORDER if p in used] or [ELEMENTWISE]


def total_read_bytes(the_plan: Plan) -> int:
    """Bytes of input data the workers read in every pass (statistics passes read the vectors again)."""
    return the_plan.read_bytes + sum(pass_read_bytes(the_plan, name) for name in statistics_passes(the_plan))


def describe(the_plan: Plan) -> dict[str, Any]:
    """The plan as JSON-able data: what `raymerge plan --json` prints."""
    return {
        "plan_hash": the_plan.hash,
        "output_bytes": the_plan.output_bytes,
        "tensor_bytes": the_plan.tensor_bytes,
        "read_bytes": total_read_bytes(the_plan),
        "inputs": [{"role": f.role, "url": urls.redact(f.url), "size": f.size} for f in the_plan.files],
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                     "shard": the_plan.shards[t.shard].name, "offset": t.start, "nbytes": t.nbytes,
                     "rule": t.rule, "method": t.method, "compute_dtype": t.compute or "F32", "terms": len(t.terms), "scales": [x.scale for x in t.terms],
                     "vector_parameters": [dict(x.values) for x in t.terms], "passes": list(tensor_passes(t)),
                     "layer": layer_of(t.name), "special_rows": len(t.overrides)}
                    for t in the_plan.tensors],
        "shards": [{"name": s.name, "size": s.size, "header_bytes": len(s.header), "tensors": len(s.tensors),
                    "items": len(s.items)} for s in the_plan.shards],
        "items": [{"id": i.id, "shard": the_plan.shards[i.shard].name, "part": i.part, "start": i.start,
                   "end": i.end, "pieces": len(i.pieces)} for i in the_plan.items],
        "aux_files": [a.name for a in the_plan.aux_files],
        "card": list(the_plan.card),
        "layers": [{"layer": o, "from": [{"role": role, "layer": i} for role, i in sources]}
                   for o, sources in enumerate(the_plan.layers)],
        "passes": [{"name": name, "items": len(pass_items(the_plan, name)),
                    "read_bytes": pass_read_bytes(the_plan, name), "only": pass_named(name).only}
                   for name in statistics_passes(the_plan)]
        + [{"name": ELEMENTWISE, "items": len(the_plan.items), "read_bytes": the_plan.read_bytes}],
        "methods": {m.name: {"passes": _method_passes(the_plan, m.name),
                             "parameters": [p.name for p in m.parameters],
                             "given": dict(next(t.params for t in the_plan.tensors if t.method == m.name))}
                    for m in (METHODS[name] for name in sorted({t.method for t in the_plan.tensors}))},
    }
