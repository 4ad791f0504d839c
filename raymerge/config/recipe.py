"""A recipe: what to compute (a recipe kind, its inputs, its method's parameters), validated from
a mapping (parsed YAML, the CLI's flags, the API's keywords) against the options table."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from raymerge.config.options import OPTION, OPTIONS, Option, RunOptions
from raymerge.errors import InputError
from raymerge.methods import COMBINING, METHODS, RECIPES, RecipeKind, parameters_named
from raymerge.planning.schedule import Scale
from raymerge.planning.vocabulary import TokenizerSpec
from raymerge.untrusted import shown


@dataclass(frozen=True)
class Recipe:
    """What to compute: a recipe kind (raymerge.methods.RECIPES) and its inputs. merge: cp + sum
    scale_i * (chat_i - base); extract: chat - base, a vector; apply: cp + sum scale_i * vector_i;
    the mergekit kinds: mergekit's, in mergekit's order (config.mergekit)."""

    kind: str
    out: str | None
    cp: str | None = None
    base: str | None = None
    vectors: tuple[tuple[str, Scale], ...] = ()  # (URL, scale): chat models, stored vectors, models, as the kind says
    vocab: str = "overlap"
    skip: tuple[str, ...] = ()
    special_tokens: tuple[tuple[int, int], ...] = ()
    chat_template: bool = True
    dtype: str | None = None
    params: tuple[tuple[str, float | bool], ...] = ()  # the method's parameters given (normalize, lambda, ...)
    method: str | None = None  # merge, apply: how the vectors combine (None: the kind's own, sum)
    # The method's other per-vector parameters given (density, ...): (name, one value per vector, in order).
    per_vector: tuple[tuple[str, tuple[Scale, ...]], ...] = ()
    compute_dtype: str = "F32"  # mergekit's compute dtype (the mergekit kinds): planning.RecipeSpec.compute
    # A frankenmerge's slices (mergekit's `slices`): per slice, (the layer range of each of its vectors,
    # the vectors in order slice after slice; the base model's range or None). (): whole models.
    slices: tuple[tuple[tuple[tuple[int, int], ...], tuple[int, int] | None], ...] = ()
    mergekit_text: str | None = None  # a mergekit file's text, as given: the card's copy (commit.card)
    tokenizer: TokenizerSpec | None = None  # mergekit's tokenizer source (planning.vocabulary)

    @property
    def how(self) -> RecipeKind:
        return RECIPES[self.kind]

    @property
    def method_name(self) -> str:
        return self.method or self.how.method

    def to_mapping(self) -> dict[str, Any]:
        """The recipe as `raymerge run` reads it (and as the manifest records it)."""
        m: dict[str, Any] = {"kind": self.kind}
        if self.base:
            m["base"] = self.base
        m[self.how.vectors] = [u for u, _ in self.vectors]
        if self.cp:
            m["cp"] = self.cp
        if OPTION["scale"].takes(self.kind):
            m["scale"] = [s.to_json() for _, s in self.vectors]
        if OPTION["vocab"].takes(self.kind):
            m["vocab"] = self.vocab
        if OPTION["skip"].takes(self.kind):
            m.update(skip=list(self.skip), chat_template=self.chat_template)
        if OPTION["special_tokens"].takes(self.kind):
            m["special_tokens"] = ",".join(f"{a}:{b}" for a, b in self.special_tokens) or None
        if self.method:
            m["method"] = self.method
        for name, given in self.per_vector:
            m[name] = [x.to_json() for x in given]
        m.update(self.params)
        m["dtype"] = self.dtype
        if OPTION["compute_dtype"].takes(self.kind):
            m["compute_dtype"] = self.compute_dtype
        if self.slices:
            m["slices"] = [{"layers": [list(r) for r in layers], "base": list(base) if base else None}
                           for layers, base in self.slices]
        if self.tokenizer is not None:
            m["tokenizer"] = self.tokenizer.to_json()
        m["out"] = self.out
        return m


def build_recipe(kind: str, values: dict[str, Any], where: str = "") -> tuple[Recipe, RunOptions]:
    """Validate a recipe given as a mapping (parsed YAML, the CLI's flags, the API's keywords) and
    split it into what to compute and how to run. Keys may use '-' or '_'. Errors name the key and
    the fix."""
    at = f"{where}: " if where else ""
    if not isinstance(kind, str) or kind not in RECIPES:
        raise InputError(f"{at}kind {shown(kind, 40)}: must be one of {', '.join(RECIPES)}")
    for key in values:
        if not isinstance(key, str):
            raise InputError(f"{at}key {shown(key, 40)}: keys are option names like base, chat, scale, out")
    values = {k.replace("-", "_"): v for k, v in values.items() if v is not None}
    allowed = [o.key for o in OPTIONS if o.takes(kind) and not o.flag_only]
    for key in values:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; {kind} takes: {', '.join(allowed)}"
            raise InputError(f"{at}unknown key {shown(key, 40)} for {kind}{hint}")
    for o in OPTIONS:
        if o.needed(kind) and not values.get(o.key):
            raise InputError(f"{at}{kind} needs {o.flag}")
    got = {k: _at(at, OPTION[k].parse, v, OPTION[k]) for k, v in values.items() if not OPTION[k].run}
    how = RECIPES[kind]
    urls_ = got.get(how.vectors, [])
    if how.single and how.command and len(urls_) != 1:
        raise InputError(f"{at}{kind} takes one --{how.vectors}; {kind} one vector per {how.vectors} model")
    for where, n in _model_groups(at, how, got, len(urls_)):
        _check_count(where, kind, how, n)
    scales = got.get("scale", [Scale()] * len(urls_))
    if len(scales) != len(urls_):
        raise InputError(f"{at}{len(scales)} --scale values for {len(urls_)} --{how.vectors} inputs; give one --scale "
                         f"per --{how.vectors}, in the same order (or none for 1.0 each); in a recipe, a gradient "
                         "over the layers is one list inside the list, e.g. scale: [[0.0, 0.5, 1.0]]")
    # Without a vocab key, a mergekit recipe refuses inputs whose vocabularies differ (its error names --vocab).
    vocab = got.get("vocab", "overlap" if how.methods else "error")
    method = METHODS[got.get("method", how.method)]
    _check_parameters(at, kind, method.name, got)
    problem = method.refuses(got)
    if problem:
        raise InputError(f"{at}{problem}")
    per_vector = tuple((o.key, tuple(_one_each(at, o, got[o.key], urls_, how.vectors)))
                       for o in OPTIONS if o.per_vector and o.key != "scale" and o.key in got)
    for p in method.parameters:
        if p.recorded:
            got.setdefault(p.name, p.default)  # so that the manifest says what was drawn (a seed's masks)
    recipe = Recipe(kind=kind, out=got.get("out"), cp=got.get("cp"), base=got.get("base"),
                    vectors=tuple(zip(urls_, scales)), vocab=vocab, skip=got.get("skip", ()),
                    special_tokens=got.get("special_tokens", ()), chat_template=got.get("chat_template", True),
                    dtype=got.get("dtype"),
                    params=tuple((o.key, got[o.key]) for o in OPTIONS if o.param and o.key in got),
                    method=got.get("method"), per_vector=per_vector, compute_dtype=got.get("compute_dtype", "F32"),
                    slices=got.get("slices", ()), tokenizer=got.get("tokenizer"))
    run = _at(at, RunOptions.parse, **{k: v for k, v in values.items() if OPTION[k].run})
    return recipe, run


def _model_groups(at: str, how: RecipeKind, got: dict[str, Any], count: int) -> list[tuple[str, int]]:
    """(where, how many vector inputs) of each group the method combines at once: every slice of a
    frankenmerge, else all of them. The slices must name every vector input once, and a base range
    where the recipe has a base model (what the method takes as its anchor), else none."""
    if "slices" not in got:
        return [(at, count)]
    given = sum(len(layers) for layers, _ in got["slices"])
    if given != count:
        raise InputError(f"{at}slices: {given} layer ranges for {count} --{how.vectors} inputs; give one per "
                         f"{how.vectors}, in order, slice after slice")
    anchored = bool(got.get("base")) and how.anchor is not None
    for i, (_, base) in enumerate(got["slices"]):
        if (base is not None) != anchored:
            raise InputError(f"{at}slices[{i}]: " + ("the base model is not among its sources; mergekit's "
                             f"{how.name} takes the base model's layers from each slice, so list it there" if anchored
                             else f"a base range, but {how.name} has no base model here; leave base out"))
    return [(f"{at}slices[{i}]: ", len(layers)) for i, (layers, _) in enumerate(got["slices"])]


def _check_count(at: str, kind: str, how: RecipeKind, n: int) -> None:
    count = 1 if how.single else how.count
    if n < how.at_least:
        raise InputError(f"{at}{kind} takes at least {how.at_least} --{how.vectors} inputs (mergekit's models besides "
                         f"the base model), got {n}")
    if count and n != count:
        raise InputError(f"{at}{kind} takes exactly {count} --{how.vectors} input{'s' if count > 1 else ''} "
                         f"(mergekit's models besides the base model), got {n}")


def _one_each(at: str, o: Option, given: list, urls: list[str], key: str) -> list:
    """A per-vector parameter's values: one per vector input, in order."""
    if len(given) != len(urls):
        default = parameters_named(o.key)[0][1].default
        raise InputError(f"{at}{len(given)} {o.flag} values for {len(urls)} --{key} inputs; give one {o.flag} per "
                         f"--{key}, in the same order (or none for {default} each)")
    return given


def _check_parameters(at: str, kind: str, method: str, got: dict[str, Any]) -> None:
    """Refuse a method parameter the chosen method does not take (it would be silently ignored)."""
    takes = {p.name for p in METHODS[method].parameters}
    for key in (o.key for o in OPTIONS if (o.param or o.per_vector) and not o.flag_only):
        if key in got and key not in takes:
            others = [m for m in COMBINING if any(p.name == key for p in METHODS[m].parameters)]
            hint = f"use --method {' or '.join(others)}" if OPTION["method"].takes(kind) and others else \
                f"{method} takes {', '.join(sorted(takes - {'scale'})) or 'no parameters but --scale'}"
            raise InputError(f"{at}{OPTION[key].flag}: {kind} with method {method} takes no {key}; {hint}")


def _at(at: str, fn, *args, **kwargs):
    """Call a parser, prefixing its error with where the value came from."""
    try:
        return fn(*args, **kwargs)
    except InputError as e:
        if not at:
            raise
        raise InputError(f"{at}{e}") from e
