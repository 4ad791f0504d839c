"""The options table: every option once, as a recipe file's key, a command's flag and an API
keyword alike. Inputs and run options are written here; the methods' parameters are made from
their declarations (raymerge.methods), so a method's new parameter needs no line here."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from raymerge.config import values as v
from raymerge.errors import InputError
from raymerge.methods import COMBINING, RECIPES, Parameter, RecipeKind, kind_methods, parameters_named
from raymerge.ops.rules import VOCAB_MODES
from raymerge.planning.vocabulary import TokenizerSpec, check_template, parse_spec
from raymerge.untrusted import shown


@dataclass(frozen=True)
class Option:
    """One option: a recipe file's key, a command-line flag and an API keyword alike."""

    key: str
    help: str
    parse: Callable[[Any, Option], Any]  # (value, this option) -> the checked value; raises InputError
    kinds: tuple[str, ...] = ()  # the recipe kinds that take it; (): every kind
    required: bool = False  # in the kinds that take it, but those of `optional_in`
    optional_in: tuple[str, ...] = ()
    run: bool = False  # how to run (a RunOptions field) rather than what to compute
    plans: bool = True  # a flag of `raymerge plan` too: it can change the plan
    cli: dict[str, Any] = field(default_factory=dict)  # argparse's extras: action, type, metavar, choices
    flag_only: bool = False  # a command-line spelling of another key (`recipe_from_flags` turns it into that key)
    param: bool = False  # a global parameter of the recipe's methods (Recipe.params, TensorPlan.params)
    per_vector: bool = False  # one value per vector input, in order (scale: Recipe.vectors; else Recipe.per_vector)

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def takes(self, kind: str) -> bool:
        return not self.kinds or kind in self.kinds

    def needed(self, kind: str) -> bool:
        return self.required and self.takes(kind) and kind not in self.optional_in


class ScaleRuleAction(argparse.Action):
    """--scale-rule REGEX=VALUE: a rule of the vector whose --chat or --vector came last before it,
    kept as (vector index, regex, value); `recipe_from_flags` makes them each vector's schedule."""

    def __call__(self, parser, namespace, value, option_string=None):
        vectors = getattr(namespace, "chat", None) or getattr(namespace, "vector", None) or []
        pattern, sep, scale = value.rpartition("=")
        if not vectors:
            parser.error(f"{option_string} {shown(value, 40)}: give it after the --chat or --vector it scales")
        if not sep or not pattern:
            parser.error(f"{option_string} {shown(value, 40)}: write REGEX=VALUE, e.g. 'mlp\\.=0.3'")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), (len(vectors) - 1, pattern, scale)])


def recipe_from_flags(values: dict[str, Any]) -> dict[str, Any]:
    """Flags as recipe keys: each vector's --scale-rule flags become its schedule's rules, with its
    --scale (or 1.0) as their default."""
    values = dict(values)
    rules = values.pop("scale_rule", None)
    if rules:
        count = len(values.get("chat") or values.get("vector") or [])
        scales = values.get("scale") or [1.0] * count
        if len(scales) == count:  # else build_recipe says how many --scale values there must be
            values["scale"] = [{"rules": [{"pattern": p, "scale": s} for i, p, s in rules if i == k], "default": v}
                               if any(i == k for i, _, _ in rules) else v for k, v in enumerate(scales)]
    return values


def _tokenizer(value: Any, option: Option) -> TokenizerSpec:
    """A tokenizer source as config.mergekit made it, or as a recipe (the manifest's) writes it."""
    if isinstance(value, TokenizerSpec):
        return value
    if not isinstance(value, dict) or set(value) - {"source", "tokens", "chat_template", "pad_to_multiple_of"}:
        raise InputError(f"{option.flag}: a mapping {{source: base | union | MODEL, tokens: {{...}}, chat_template: T, "
                         "pad_to_multiple_of: N}}")
    spec = (parse_spec(value.get("source"), value.get("tokens"), option.key, lambda ref, where: v.url(ref, option),
                       value.get("pad_to_multiple_of")) if value.get("source") != "" else TokenizerSpec(""))
    template = value.get("chat_template")
    return spec if template is None else replace(spec, chat_template=check_template(template, option.flag))


def _kinds(test: Callable[[RecipeKind], bool]) -> tuple[str, ...]:
    """The recipe kinds that pass `test`."""
    return tuple(k.name for k in RECIPES.values() if test(k))


def _input(key: str, help: str, many: bool = False) -> Option:
    """The option of an input role (`base`, `chat`, ...): taken by every kind that names it, needed
    by those that compute from it (the aux role alone is optional: the first vector input's then)."""
    return Option(key, help, v.urls if many else v.url, _kinds(lambda k: key in (k.vectors, k.anchor, k.minus, k.aux)),
                  required=True, optional_in=_kinds(lambda k: key not in (k.vectors, k.anchor, k.minus)
                                                    or (k.anchor_optional and key in (k.anchor, k.minus))),
                  cli={"action": "append"} if many else {})


_PARSERS: dict[str, Callable[[Any, Option], Any]] = {"weight": v.weights, "fraction": v.fractions, "flag": v.flag,
                                                     "number": v.number, "seed": v.seed}


def _parameter(name: str) -> Option:
    """The option of a method parameter, from every method's declaration of it (methods.Parameter)."""
    declared = parameters_named(name)
    p: Parameter = declared[0][1]
    kinds = _kinds(lambda k: k.tunable and any(name in {q.name for q in m.parameters} for m in kind_methods(k)))
    defaults: dict[str, list[str]] = {}
    for m, q in declared:
        defaults.setdefault(_default_text(q), []).append(m.name)
    default = next(iter(defaults)) if len(defaults) == 1 else \
        "; ".join(f"{d} for {', '.join(ms)}" for d, ms in defaults.items())
    methods = ", ".join(m.name for m, _ in declared)
    help = f"{p.help}{' (one per vector, in order)' if p.per_vector else ''}; methods {methods} (default {default})"
    if p.mergekit and p.mergekit != p.name:
        help += f"; mergekit's {p.mergekit}"
    cli = {"action": "append"} if p.per_vector else \
        {"action": argparse.BooleanOptionalAction} if p.type == "flag" else {}
    return Option(name, help, _PARSERS[p.type], kinds, param=not p.per_vector, per_vector=p.per_vector, cli=cli)


def _default_text(p: Parameter) -> str:
    return ("on" if p.default else "off") if p.type == "flag" else str(p.default)


# Every parameter name of the methods, in the order the methods declare them.
_PARAMETER_NAMES = tuple(dict.fromkeys(q.name for k in RECIPES.values() for m in kind_methods(k) for q in m.parameters))

# Every option, once: argparse (cli.py), recipe files and the API's keywords all come from here.
OPTIONS: tuple[Option, ...] = (
    _input("base", "the base model (URL): what each vector input is taken minus, or the anchor; where it only gives "
           "the output's config and tokenizer (linear), optional: the first model's then"),
    _input("chat", "the chat model (URL); merge: repeat for several, one --scale each", many=True),
    _input("cp", "the model continually pre-trained on the new language (URL)"),
    _input("vector", "a vector made by `raymerge extract` (URL); repeat for several, one --scale each", many=True),
    _input("model", "a model to combine (URL), one --scale (mergekit's weight) each", many=True),
    Option("out", "where the checkpoint goes (local path or s3://)", v.url),
    Option("method", f"how the vectors combine: sum (default: cp + sum_i scale_i * vector_i), or mergekit's "
           f"{', '.join(m for m in COMBINING if m != 'sum')}, with their parameters",
           v.choice(*COMBINING), _kinds(lambda k: k.methods), cli={"choices": COMBINING}),
    *(_parameter(name) for name in _PARAMETER_NAMES),
    Option("scale_rule", "REGEX=VALUE: tensors whose name matches take this scale, for the --chat or --vector "
           "given last before it (repeatable; the first match wins; the others take its --scale)", v.weights,
           _kinds(lambda k: k.methods), cli={"action": ScaleRuleAction, "metavar": "REGEX=VALUE"}, flag_only=True),
    Option("vocab", "embedding/head rows when cp's vocabulary is larger: overlap (default: shared rows get the "
           "vector, cp's extra rows stay), skip (no vector), error (the default for mergekit files), union (the "
           "tokenizers differ: cp's plus the others' tokens, every row mapped by token)",
           v.choice(*VOCAB_MODES), _kinds(lambda k: k.tunable), cli={"choices": VOCAB_MODES}),
    Option("skip", "tensors copied from cp unchanged (repeatable)", v.patterns, ("merge", "apply"),
           cli={"action": "append", "metavar": "REGEX"}),
    Option("special_tokens", "set these rows of the output embedding and head to the chat model's rows",
           v.special_tokens, ("merge",), cli={"metavar": "CP_ID:CHAT_ID,..."}),
    Option("chat_template", "keep cp's chat template and EOS instead of the chat model's", v.flag, ("merge", "apply"),
           cli={"flag": "--no-chat-template", "action": "store_false"}),
    Option("dtype", "output dtype of float tensors (default: cp's; extract: float32)",
           lambda x, o: v.parse_dtype(x)),
    Option("compute_dtype", "mergekit's compute dtype: the inputs are cast to it and each operation is rounded to "
           "it as mergekit 0.1.5 rounds it, so the output is mergekit's bits (a mergekit file: its dtype, else "
           "inputs, each tensor at its inputs' dtype); float32 computes in float32 and rounds once (default for "
           "a raymerge recipe)", lambda x, o: v.parse_compute_dtype(x), _kinds(lambda k: k.mergekit),
           cli={"metavar": "|".join(v.COMPUTE_CHOICES)}),
    Option("slices", "a frankenmerge (mergekit's slices): per slice, the layer range of each of its models (the "
           "models in order, slice after slice) and of the base model; the output stacks the slices' layers",
           v.slices, _kinds(lambda k: k.mergekit)),
    Option("tokenizer", "mergekit's tokenizer source: {source: base | union | MODEL, tokens: {TOKEN: {source: ..., "
           "force: BOOL}}}: the output's vocabulary, every model's embedding and head rows mapped to it by token",
           _tokenizer, _kinds(lambda k: k.mergekit)),
    Option("shard_size", "max output shard size, decimal units like HF (default 5GB)",
           lambda x, o: v.parse_size(x, o.flag), run=True),
    Option("item_size", "bytes per work item (default 32MiB; S3 parts >= 5MiB)", v.item_size, run=True),
    Option("storage_options", "JSON of fsspec options for every URL, e.g. "
           '\'{"client_kwargs": {"endpoint_url": "http://host:9000"}}\'',
           lambda x, o: v.parse_storage_options(x), run=True),
    Option("address", "Ray cluster to join (default: RAY_ADDRESS, else a private local Ray)", v.address, run=True,
           plans=False),
    Option("workers", "worker actors (default: the cluster's CPUs / --cpus-per-worker)",
           lambda x, o: v.parse_count(x, o.flag, 1, v.MAX_WORKERS), run=True, plans=False),
    Option("cpus_per_worker", "CPUs per worker (default 1)", v.positive, run=True, plans=False),  # text: ASCII checked
    Option("in_flight", "items per worker at once (default 2)", lambda x, o: v.parse_count(x, o.flag, 1, v.MAX_IN_FLIGHT),
           run=True, plans=False),
    Option("gpus_per_worker", "GPUs per worker, at most 1: the arithmetic runs there (default 0)", v.gpus,
           run=True, plans=False),
    Option("worker_resource", "run workers only on nodes that advertise this custom Ray resource (e.g. ray start "
           "--resources '{\"merge\": 16}')", v.resource, run=True, plans=False, cli={"metavar": "NAME"}),
    Option("overwrite", "replace a checkpoint (or an unfinished run) already at --out", v.flag, run=True,
           plans=False, cli={"action": "store_true"}),
    Option("resume", "continue the unfinished run at --out: only items not yet done are done", v.flag, run=True,
           plans=False, cli={"action": "store_true"}),
    Option("card", "write a model card (README.md) and the recipe beside the checkpoint (the default); "
           "--no-card leaves both out", v.flag, run=True, cli={"flag": "--no-card", "action": "store_false"}),
    Option("allow_nonfinite", "commit even when finite inputs give inf/NaN output (F16 overflow); counts are in "
           "the stats and the report", v.flag, run=True, plans=False, cli={"action": "store_true"}),
)
OPTION: dict[str, Option] = {o.key: o for o in OPTIONS}


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to compute): layout, pool and storage settings. Its fields are the
    `run` options of OPTIONS, which check them."""

    shard_size: int = 5_000_000_000
    item_size: int = 32 * 2**20
    workers: int | None = None
    cpus_per_worker: float = 1.0
    in_flight: int = 2
    address: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    resume: bool = False
    gpus_per_worker: float = 0.0
    worker_resource: str | None = None
    allow_nonfinite: bool = False  # commit even when finite inputs give inf/NaN output
    card: bool = True  # write README.md and the recipe copy (commit.card)

    @classmethod
    def parse(cls, **values: Any) -> RunOptions:
        """Run options from raw values (a recipe's, the CLI's, the API's), each checked by its Option."""
        options = cls(**{k: OPTION[k].parse(v, OPTION[k]) for k, v in values.items() if v is not None})
        if options.overwrite and options.resume:
            raise InputError("--overwrite and --resume: choose one (start over, or continue the unfinished run)")
        return options

