"""Options and recipes, validated at the boundary: every bad value becomes one clear InputError."""

from __future__ import annotations

import argparse
import difflib
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raymerge import mergekit_recipe
from raymerge.bounds import MAX_YAML_BYTES, load_yaml, parse_int, read_regular_file
from raymerge.errors import InputError
from raymerge.methods import COMBINING, METHODS, RECIPES, RecipeKind
from raymerge.ops.rules import VOCAB_MODES, check_texts, compile_patterns, parse_special_tokens
from raymerge.planning.schedule import PATTERN, RULE_KINDS, Scale
from raymerge.safetensors.dtypes import ALIASES, FLOATS
from raymerge.untrusted import UntrustedJSON, parse_json, shown

MAX_SIZE = 2**62  # bytes: far past any checkpoint, and safe in every int64 offset
MAX_NUMBER_CHARS = 1000  # of a size's or a number's text: float() and the regexes stay trivial
MAX_SEED = 2**63 - 1
MAX_COUNT = 2**31 - 1
MAX_WORKERS = 100_000  # far past any cluster's CPUs; asking more would only queue actors forever
MAX_IN_FLIGHT = 1_000  # items a worker holds at once, each up to --item-size in memory
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# ASCII only: float() would also take '５' and '1_0', and \s matches Unicode spaces.
_SIZE = re.compile(r"[ \t]*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)[ \t]*([a-zA-Z]*)[ \t]*")
_FLOAT = re.compile(r"[ \t]*[-+]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|inf|infinity|nan)[ \t]*",
                    re.IGNORECASE)


def parse_size(value: str | int, option: str) -> int:
    """Bytes from '5GB' (decimal, as Hugging Face counts), '64MiB' (binary) or a plain integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, float) and value.is_integer():  # the API's 5e9, YAML's 5.0e+9
        n = int(value)
    else:
        m = _SIZE.fullmatch(value) if isinstance(value, str) and len(value) <= MAX_NUMBER_CHARS else None
        if not m or m.group(2).upper() not in _UNITS:
            raise InputError(f"{option} {shown(value, 40)}: not a size; write e.g. 5GB, 500MB, 64MiB or a byte count")
        x = float(m.group(1)) * _UNITS[m.group(2).upper()]
        n = int(x) if math.isfinite(x) else MAX_SIZE
    if n <= 0:
        raise InputError(f"{option} {shown(value, 40)}: must be a positive size")
    if n >= MAX_SIZE:
        raise InputError(f"{option} {shown(value, 40)}: too large; sizes go up to a few TB")
    return n


def parse_number(value: float | str, option: str) -> float:
    """A finite float from a number or its text (bools are not numbers here)."""
    if isinstance(value, bool) or (isinstance(value, str) and not (len(value) <= MAX_NUMBER_CHARS
                                                                   and _FLOAT.fullmatch(value))):
        raise InputError(f"{option} {shown(value, 40)}: not a number; write e.g. 0.5 or 1.0")
    try:
        x = float(value)
    except OverflowError:  # an int too large for a float
        x = math.inf
    except (TypeError, ValueError) as e:
        raise InputError(f"{option} {shown(value, 40)}: not a number; write e.g. 0.5 or 1.0") from e
    if not math.isfinite(x):
        raise InputError(f"{option} {shown(value, 40)}: must be a finite number")
    return x


def parse_scale(value: float | str, option: str = "--scale") -> float:
    """A scale the float32 arithmetic can use as given: finite in float32, and not a nonzero value
    that float32 rounds to 0 (which would silently drop the vector)."""
    x = parse_number(value, option)
    try:
        as_f32 = struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        as_f32 = math.inf
    if math.isinf(as_f32) or (x != 0 and as_f32 == 0):
        raise InputError(f"{option} {shown(value, 40)}: {'overflows' if math.isinf(as_f32) else 'rounds to 0 in'} "
                         "float32, in which raymerge computes; use 0 or a magnitude between 1e-45 and 3.4e38")
    return x


def parse_dtype(value: str | None) -> str | None:
    """A safetensors float dtype name from 'bfloat16', 'bf16', 'BF16', ...; None stays None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"--dtype {shown(value, 40)}: not a dtype name; use float32, bfloat16 or float16")
    name = ALIASES.get(value.lower(), value.upper())
    if name not in FLOATS:
        raise InputError(f"--dtype {shown(value, 40)}: not a float dtype; use float32, bfloat16 or float16")
    return name


def parse_storage_options(value: str | dict | None) -> dict[str, Any]:
    """fsspec options: a mapping with string keys, given as one (a recipe, the API) or as JSON text."""
    if value is None:
        return {}
    obj = value
    if isinstance(value, str):
        try:
            obj = parse_json(value)
        except UntrustedJSON as e:
            raise InputError(f"--storage-options: {e}; write e.g. "
                             '\'{"client_kwargs": {"endpoint_url": "http://host:9000"}}\'') from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise InputError(f"--storage-options {shown(value, 40)}: must be a JSON object (a mapping with string keys) "
                         "of fsspec options")
    return dict(obj)


def parse_count(value: int | str | None, option: str, minimum: int = 1, maximum: int = MAX_COUNT) -> int | None:
    """An int from `minimum` to `maximum`, or its text in ASCII digits (a flag's); None stays None."""
    return None if value is None else parse_int(value, option, minimum, maximum)


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
    param: bool = False  # a parameter of the recipe's method (Recipe.params, TensorPlan.params)

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def takes(self, kind: str) -> bool:
        return not self.kinds or kind in self.kinds

    def needed(self, kind: str) -> bool:
        return self.required and self.takes(kind) and kind not in self.optional_in


def _url(value: Any, o: Option) -> str:
    if not isinstance(value, str):
        raise InputError(f"{o.flag}: expected a URL string, got {shown(value, 40)}")
    if not value.isprintable():  # a NUL or a newline names no file; the OS would refuse it later, less clearly
        raise InputError(f"{o.flag} {shown(value, 60)}: a URL or path holds no control characters")
    return value


def _urls(value: Any, o: Option) -> list[str]:
    items = _strings(value, o)
    if not all(items):
        raise InputError(f"{o.flag}: empty URL")
    return [_url(v, o) for v in items]


def _strings(value: Any, o: Option) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise InputError(f"{o.flag}: expected a string or a list of strings, got {shown(value, 40)}")
    return list(items)


def _scale_list(value: Any, o: Option) -> list[Scale]:
    """Each vector's scale schedule, in order (how many there must be, `build_recipe` checks)."""
    return [_schedule(v, o) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _schedule(value: Any, o: Option) -> Scale:
    """A number, a gradient (a list of numbers) or {rules: [{pattern: REGEX or contains: SUBSTRING,
    scale}], default} (see planning.schedule)."""
    if not isinstance(value, dict):
        return Scale(_scale_value(value, o))
    for key in value:
        if key not in ("rules", "default"):
            raise InputError(f"{o.flag} {shown(value, 60)}: a schedule has the keys rules and default, "
                             f"not {shown(key, 30)}")
    rules = value.get("rules", [])
    if not isinstance(rules, list):
        raise InputError(f"{o.flag} rules {shown(rules, 40)}: a list of {{pattern: REGEX, scale: X}}")
    parsed = tuple(_rule(rule, o) for rule in rules)
    _check_patterns(o, [t for kind, t, _ in parsed if kind == PATTERN], [t for kind, t, _ in parsed if kind != PATTERN])
    return Scale(_scale_value(value.get("default", 1.0), o), parsed)


def _rule(rule: Any, o: Option) -> tuple[str, str, Any]:
    kind = next((k for k in RULE_KINDS if isinstance(rule, dict) and k in rule), None)
    if kind is None or set(rule) != {kind, "scale"} or not isinstance(rule[kind], str):
        raise InputError(f"{o.flag} rule {shown(rule, 60)}: write {{pattern: REGEX, scale: X}} or "
                         "{contains: SUBSTRING, scale: X}")
    return kind, rule[kind], _scale_value(rule["scale"], o)


def _check_patterns(o: Option, patterns: list[str], substrings: list[str] = ()) -> None:
    """Refuse too many or too long patterns and substrings, and regexes RE2 cannot run (ops.rules),
    as one InputError."""
    try:
        check_texts([*patterns, *substrings], o.flag)
        compile_patterns(patterns, o.flag)
    except ValueError as e:
        raise InputError(str(e)) from e


def _density_list(value: Any, o: Option) -> list[Scale]:
    """Each vector's density: a schedule like a scale's, of fractions from 0 to 1."""
    schedules = _scale_list(value, o)
    for s in schedules:
        for v in (s.default, *(v for _, _, v in s.rules)):
            if not all(0 <= x <= 1 for x in (v if isinstance(v, tuple) else (v,))):
                raise InputError(f"{o.flag} {shown(value, 40)}: a density is the fraction of a vector's elements "
                                 "kept, from 0 to 1")
    return schedules


def _seed(value: Any, o: Option) -> int:
    return parse_int(value, o.flag, 0, MAX_SEED)


def _scale_value(value: Any, o: Option) -> float | tuple[float, ...]:
    if isinstance(value, (list, tuple)):
        if not value:
            raise InputError(f"{o.flag} []: a gradient needs at least one number")
        return tuple(parse_scale(v, o.flag) for v in value)
    return parse_scale(value, o.flag)


def _patterns(value: Any, o: Option) -> tuple[str, ...]:
    patterns = tuple(_strings(value, o))
    _check_patterns(o, list(patterns))
    return patterns


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


def _choice(*choices: str) -> Callable[[Any, Option], str]:
    def parse(value: Any, o: Option) -> str:
        if value not in choices:
            raise InputError(f"{o.flag} {shown(value, 40)}: must be one of {', '.join(choices)}")
        return value
    return parse


def _bool(value: Any, o: Option) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{o.key}: expected true or false, got {shown(value, 40)}")
    return value


def _special(value: Any, o: Option) -> tuple[tuple[int, int], ...]:
    """The pairs as text ('CP_ID:CHAT_ID,...'), from that text, a mapping or a list of pairs' texts."""
    def text(v: Any) -> str:  # shown(): an API's integer of thousands of digits has no str()
        return v if isinstance(v, str) else shown(v, 40)
    if isinstance(value, dict):
        value = ",".join(f"{text(k)}:{text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        value = ",".join(text(v) for v in value)
    return tuple(parse_special_tokens(text(value)))


def _positive(value: Any, o: Option) -> float:
    x = parse_number(value, o.flag)
    if x <= 0:
        raise InputError(f"{o.flag} {shown(value, 40)}: must be positive")
    return x


def _gpus(value: Any, o: Option) -> float:
    x = parse_number(value, o.flag)
    if x < 0:
        raise InputError(f"{o.flag} {shown(value, 40)}: must be zero or positive")
    if x > 1:  # a worker computes on one device; a second GPU would sit idle
        raise InputError(f"{o.flag} {shown(value, 40)}: a worker computes on one GPU; to use more GPUs run more "
                         "workers (--gpus-per-worker 1, or a fraction such as 0.5 to share a GPU between workers)")
    return x


def _item_size(value: Any, o: Option) -> int:
    n = parse_size(value, o.flag)
    if not MIN_ITEM_SIZE <= n <= MAX_ITEM_SIZE:
        raise InputError(f"{o.flag} {n}: must be between 4KiB and 2GiB (a worker holds a few "
                         "items' inputs in memory); the default 32MiB suits most runs")
    return n


def _resource(value: Any, o: Option) -> str:
    if not (isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.:/-]+", value)):
        raise InputError(f"{o.flag} {shown(value, 40)}: a Ray resource name, e.g. merge")
    return value


def _address(value: Any, o: Option) -> str:
    if not isinstance(value, str):
        raise InputError(f"{o.flag} {shown(value, 40)}: a Ray address, e.g. auto or ray://head:10001")
    return value


def _finite(value: Any, o: Option) -> float:
    return parse_scale(value, o.flag)


MIN_ITEM_SIZE = 4096
MAX_ITEM_SIZE = 2**31
_MERGE, _EXTRACT, _APPLY = "merge", "extract", "apply"
_TA, _LINEAR = "task_arithmetic", "linear"  # mergekit's methods, in mergekit's order (recipe files only)
_SPARSE = ("ties", "dare_linear", "dare_ties")  # mergekit's too; and methods of merge and apply

# Every option, once: argparse (cli.py), recipe files and the API's keywords all come from here.
OPTIONS: tuple[Option, ...] = (
    Option("base", "the base model the chat model was tuned from (URL); linear: whose config and tokenizer the "
           "output takes (default: the first model's)", _url, (_MERGE, _EXTRACT, _TA, _LINEAR, *_SPARSE), required=True,
           optional_in=(_LINEAR,)),
    Option("chat", "the chat model (URL); merge: repeat for several, one --scale each", _urls, (_MERGE, _EXTRACT),
           required=True, cli={"action": "append"}),
    Option("cp", "the model continually pre-trained on the new language (URL)", _url, (_MERGE, _APPLY),
           required=True),
    Option("vector", "a vector made by `raymerge extract` (URL); repeat for several, one --scale each", _urls,
           (_APPLY,), required=True, cli={"action": "append"}),
    Option("model", "a model to combine (URL), one --scale (mergekit's weight) each", _urls, (_TA, _LINEAR, *_SPARSE),
           required=True, cli={"action": "append"}),
    Option("out", "where the checkpoint goes (local path or s3://)", _url),
    Option("scale", "weight of each vector, in order (default 1.0 each)", _scale_list,
           (_MERGE, _APPLY, _TA, _LINEAR, *_SPARSE),
           cli={"action": "append"}),
    Option("method", "how the vectors combine: sum (default: cp + sum_i scale_i * vector_i), or TIES or DARE "
           "(mergekit's ties, dare_linear, dare_ties: --density, --normalize, --rescale, --lambda, --seed)",
           _choice(*COMBINING), (_MERGE, _APPLY), cli={"choices": COMBINING}),
    Option("density", "ties, dare_*: the fraction of each vector's elements kept, in order (default 1.0 each)",
           _density_list, (_MERGE, _APPLY, *_SPARSE), cli={"action": "append"}),
    Option("normalize", "divide the weighted sum by the sum of the weights (mergekit's normalize; default: "
           "on for linear and ties)", _bool, (_MERGE, _APPLY, _TA, _LINEAR, *_SPARSE), param=True,
           cli={"action": argparse.BooleanOptionalAction}),
    Option("rescale", "dare_*: rescale what each vector keeps to its L1 norm (mergekit's rescale; default: on "
           "for dare_*)", _bool, (_MERGE, _APPLY, *_SPARSE), param=True,
           cli={"action": argparse.BooleanOptionalAction}),
    Option("lambda", "multiply the combined change by this (mergekit's lambda)", _finite,
           (_MERGE, _APPLY, _TA, *_SPARSE), param=True),
    Option("seed", "dare_*: the seed of the random masks (default 0); the same seed gives the same bits on "
           "any cluster", _seed, (_MERGE, _APPLY, *_SPARSE), param=True),  # a flag's text: _seed checks it
    Option("scale_rule", "REGEX=VALUE: tensors whose name matches take this scale, for the --chat or --vector "
           "given last before it (repeatable; the first match wins; the others take its --scale)", _scale_list,
           (_MERGE, _APPLY), cli={"action": ScaleRuleAction, "metavar": "REGEX=VALUE"}, flag_only=True),
    Option("vocab", "embedding/head rows when cp's vocabulary is larger: overlap (default: shared rows get the "
           "vector, cp's extra rows stay), skip (no vector), error (the default for mergekit files)",
           _choice(*VOCAB_MODES), (_MERGE, _APPLY, _TA, _LINEAR, *_SPARSE), cli={"choices": VOCAB_MODES}),
    Option("skip", "tensors copied from cp unchanged (repeatable)", _patterns, (_MERGE, _APPLY),
           cli={"action": "append", "metavar": "REGEX"}),
    Option("special_tokens", "set these rows of the output embedding and head to the chat model's rows", _special,
           (_MERGE,), cli={"metavar": "CP_ID:CHAT_ID,..."}),
    Option("chat_template", "keep cp's chat template and EOS instead of the chat model's", _bool, (_MERGE, _APPLY),
           cli={"flag": "--no-chat-template", "action": "store_false"}),
    Option("dtype", "output dtype of float tensors (default: cp's; extract: float32)",
           lambda v, o: parse_dtype(v)),
    Option("shard_size", "max output shard size, decimal units like HF (default 5GB)",
           lambda v, o: parse_size(v, o.flag), run=True),
    Option("item_size", "bytes per work item (default 32MiB; S3 parts >= 5MiB)", _item_size, run=True),
    Option("storage_options", "JSON of fsspec options for every URL, e.g. "
           '\'{"client_kwargs": {"endpoint_url": "http://host:9000"}}\'',
           lambda v, o: parse_storage_options(v), run=True),
    Option("address", "Ray cluster to join (default: RAY_ADDRESS, else a private local Ray)", _address, run=True,
           plans=False),
    Option("workers", "worker actors (default: the cluster's CPUs / --cpus-per-worker)",
           lambda v, o: parse_count(v, o.flag, 1, MAX_WORKERS), run=True, plans=False),
    Option("cpus_per_worker", "CPUs per worker (default 1)", _positive, run=True, plans=False),  # text: ASCII checked
    Option("in_flight", "items per worker at once (default 2)", lambda v, o: parse_count(v, o.flag, 1, MAX_IN_FLIGHT),
           run=True, plans=False),
    Option("gpus_per_worker", "GPUs per worker, at most 1: the arithmetic runs there (default 0)", _gpus,
           run=True, plans=False),
    Option("worker_resource", "run workers only on nodes that advertise this custom Ray resource (e.g. ray start "
           "--resources '{\"merge\": 16}')", _resource, run=True, plans=False, cli={"metavar": "NAME"}),
    Option("overwrite", "replace a checkpoint (or an unfinished run) already at --out", _bool, run=True,
           plans=False, cli={"action": "store_true"}),
    Option("resume", "continue the unfinished run at --out: only items not yet done are done", _bool, run=True,
           plans=False, cli={"action": "store_true"}),
    Option("allow_nonfinite", "commit even when finite inputs give inf/NaN output (F16 overflow); counts are in "
           "the stats and the report", _bool, run=True, plans=False, cli={"action": "store_true"}),
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

    @classmethod
    def parse(cls, **values: Any) -> RunOptions:
        """Run options from raw values (a recipe's, the CLI's, the API's), each checked by its Option."""
        options = cls(**{k: OPTION[k].parse(v, OPTION[k]) for k, v in values.items() if v is not None})
        if options.overwrite and options.resume:
            raise InputError("--overwrite and --resume: choose one (start over, or continue the unfinished run)")
        return options


@dataclass(frozen=True)
class Recipe:
    """What to compute: a recipe kind (raymerge.methods.RECIPES) and its inputs. merge: cp + sum
    scale_i * (chat_i - base); extract: chat - base, a vector; apply: cp + sum scale_i * vector_i;
    task_arithmetic and linear: mergekit's, in mergekit's order (raymerge.mergekit_recipe)."""

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
    density: tuple[Scale, ...] = ()  # each vector's, in order (empty: 1.0 each)

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
        if self.density:
            m["density"] = [d.to_json() for d in self.density]
        m.update(self.params)
        m["dtype"] = self.dtype
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
    if how.single and len(urls_) != 1:
        raise InputError(f"{at}{kind} takes one --{how.vectors}; {kind} one vector per {how.vectors} model")
    scales = got.get("scale", [Scale()] * len(urls_))
    if len(scales) != len(urls_):
        raise InputError(f"{at}{len(scales)} --scale values for {len(urls_)} --{how.vectors} inputs; give one --scale "
                         f"per --{how.vectors}, in the same order (or none for 1.0 each); in a recipe, a gradient "
                         "over the layers is one list inside the list, e.g. scale: [[0.0, 0.5, 1.0]]")
    # Without a vocab key, a mergekit recipe refuses inputs whose vocabularies differ (its error names --vocab).
    vocab = got.get("vocab", "overlap" if kind in (_MERGE, _APPLY) else "error")
    method = METHODS[got.get("method", how.method)]
    _check_parameters(at, kind, method.name, got)
    density = got.get("density", ())
    if density and len(density) != len(urls_):
        raise InputError(f"{at}{len(density)} --density values for {len(urls_)} --{how.vectors} inputs; give one "
                         f"--density per --{how.vectors}, in the same order (or none for 1.0 each)")
    if any(p.name == "seed" for p in method.parameters):
        got.setdefault("seed", 0)  # recorded, so that the manifest says which masks were drawn
    recipe = Recipe(kind=kind, out=got.get("out"), cp=got.get("cp"), base=got.get("base"),
                    vectors=tuple(zip(urls_, scales)), vocab=vocab, skip=got.get("skip", ()),
                    special_tokens=got.get("special_tokens", ()), chat_template=got.get("chat_template", True),
                    dtype=got.get("dtype"),
                    params=tuple((o.key, got[o.key]) for o in OPTIONS if o.param and o.key in got),
                    method=got.get("method"), density=tuple(density))
    run = _at(at, RunOptions.parse, **{k: v for k, v in values.items() if OPTION[k].run})
    return recipe, run


def _check_parameters(at: str, kind: str, method: str, got: dict[str, Any]) -> None:
    """Refuse a method parameter the chosen method does not take (it would be silently ignored)."""
    takes = {p.name for p in METHODS[method].parameters}
    for key in ("density", *(o.key for o in OPTIONS if o.param)):
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


def load_recipe_file(path: str, flags: dict[str, Any] | None = None) -> tuple[Recipe, RunOptions]:
    """A YAML recipe: `kind` plus the same keys as the command's flags (`-` or `_`). `flags`: keys
    given on the command line, which win over the file's. The file is read as untrusted: a regular
    file only (a FIFO would block), bounded in size, nesting and alias expansion (raymerge.bounds)."""
    data = load_yaml(read_regular_file(path, MAX_YAML_BYTES + 1, "recipe"), f"recipe {path}")
    if not isinstance(data, dict):
        raise InputError(f"recipe {path}: must be a mapping of keys like kind, base, chat, cp, out")
    if mergekit_recipe.is_mergekit(data):
        kind, values = mergekit_recipe.recipe_values(data, f"recipe {path}")
        return build_recipe(kind, {**values, **(flags or {})}, where=f"recipe {path}")
    kind = data.pop("kind", None)
    if kind is None:
        kinds = [f"'kind: {k}'" for k in RECIPES]
        raise InputError(f"recipe {path}: needs {', '.join(kinds[:-1])} or {kinds[-1]}")
    data = {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in data.items()}
    data.update(flags or {})
    return build_recipe(kind, data, where=f"recipe {path}")
