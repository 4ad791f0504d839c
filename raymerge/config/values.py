"""Value parsers: every option's raw value (a flag's text, YAML's, the API's) checked at the
boundary, each bad one one clear InputError that names the option and what to write."""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from raymerge.bounds import parse_int
from raymerge.errors import InputError
from raymerge.ops.rules import check_texts, compile_patterns, parse_special_tokens
from raymerge.planning.schedule import PATTERN, RULE_KINDS, Scale
from raymerge.safetensors.dtypes import ALIASES, FLOATS
from raymerge.untrusted import UntrustedJSON, parse_json, shown

if TYPE_CHECKING:
    from raymerge.config.options import Option

MAX_SIZE = 2**62  # bytes: far past any checkpoint, and safe in every int64 offset
MAX_NUMBER_CHARS = 1000  # of a size's or a number's text: float() and the regexes stay trivial
MAX_SEED = 2**63 - 1
MAX_COUNT = 2**31 - 1
MAX_WORKERS = 100_000  # far past any cluster's CPUs; asking more would only queue actors forever
MAX_IN_FLIGHT = 1_000  # items a worker holds at once, each up to --item-size in memory
MIN_ITEM_SIZE = 4096
MAX_ITEM_SIZE = 2**31
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


COMPUTE_CHOICES = ("float32", "bfloat16", "float16", "inputs")


def parse_compute_dtype(value: Any) -> str:
    """--compute-dtype: "F32", "BF16", "F16", or "inputs" (each tensor at its inputs' shared dtype)."""
    if isinstance(value, str) and value.lower() == "inputs":
        return "inputs"
    name = ALIASES.get(value.lower(), value.upper()) if isinstance(value, str) else None
    if name not in ("F32", "BF16", "F16"):
        raise InputError(f"--compute-dtype {shown(value, 40)}: use {', '.join(COMPUTE_CHOICES)} (float64 computes "
                         "in float32)")
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


def url(value: Any, o: Option) -> str:
    if not isinstance(value, str):
        raise InputError(f"{o.flag}: expected a URL string, got {shown(value, 40)}")
    if not value.isprintable():  # a NUL or a newline names no file; the OS would refuse it later, less clearly
        raise InputError(f"{o.flag} {shown(value, 60)}: a URL or path holds no control characters")
    return value


def urls(value: Any, o: Option) -> list[str]:
    items = _strings(value, o)
    if not all(items):
        raise InputError(f"{o.flag}: empty URL")
    return [url(v, o) for v in items]


def _strings(value: Any, o: Option) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise InputError(f"{o.flag}: expected a string or a list of strings, got {shown(value, 40)}")
    return list(items)


def weights(value: Any, o: Option) -> list[Scale]:
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


def fractions(value: Any, o: Option) -> list[Scale]:
    """Each vector's density: a schedule like a scale's, of fractions from 0 to 1."""
    schedules = weights(value, o)
    for s in schedules:
        for v in (s.default, *(v for _, _, v in s.rules)):
            if not all(0 <= x <= 1 for x in (v if isinstance(v, tuple) else (v,))):
                raise InputError(f"{o.flag} {shown(value, 40)}: {o.key} is a fraction, from 0 to 1")
    return schedules


def seed(value: Any, o: Option) -> int:
    return parse_int(value, o.flag, 0, MAX_SEED)


def _scale_value(value: Any, o: Option) -> float | tuple[float, ...]:
    if isinstance(value, (list, tuple)):
        if not value:
            raise InputError(f"{o.flag} []: a gradient needs at least one number")
        return tuple(parse_scale(v, o.flag) for v in value)
    return parse_scale(value, o.flag)


def patterns(value: Any, o: Option) -> tuple[str, ...]:
    found = tuple(_strings(value, o))
    _check_patterns(o, list(found))
    return found


def choice(*choices: str) -> Callable[[Any, Option], str]:
    def parse(value: Any, o: Option) -> str:
        if value not in choices:
            raise InputError(f"{o.flag} {shown(value, 40)}: must be one of {', '.join(choices)}")
        return value
    return parse


def flag(value: Any, o: Option) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{o.key}: expected true or false, got {shown(value, 40)}")
    return value


def special_tokens(value: Any, o: Option) -> tuple[tuple[int, int], ...]:
    """The pairs as text ('CP_ID:CHAT_ID,...'), from that text, a mapping or a list of pairs' texts."""
    def text(v: Any) -> str:  # shown(): an API's integer of thousands of digits has no str()
        return v if isinstance(v, str) else shown(v, 40)
    if isinstance(value, dict):
        value = ",".join(f"{text(k)}:{text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        value = ",".join(text(v) for v in value)
    return tuple(parse_special_tokens(text(value)))


def positive(value: Any, o: Option) -> float:
    x = parse_number(value, o.flag)
    if x <= 0:
        raise InputError(f"{o.flag} {shown(value, 40)}: must be positive")
    return x


def gpus(value: Any, o: Option) -> float:
    x = parse_number(value, o.flag)
    if x < 0:
        raise InputError(f"{o.flag} {shown(value, 40)}: must be zero or positive")
    if x > 1:  # a worker computes on one device; a second GPU would sit idle
        raise InputError(f"{o.flag} {shown(value, 40)}: a worker computes on one GPU; to use more GPUs run more "
                         "workers (--gpus-per-worker 1, or a fraction such as 0.5 to share a GPU between workers)")
    return x


def item_size(value: Any, o: Option) -> int:
    n = parse_size(value, o.flag)
    if not MIN_ITEM_SIZE <= n <= MAX_ITEM_SIZE:
        raise InputError(f"{o.flag} {n}: must be between 4KiB and 2GiB (a worker holds a few "
                         "items' inputs in memory); the default 32MiB suits most runs")
    return n


def resource(value: Any, o: Option) -> str:
    if not (isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.:/-]+", value)):
        raise InputError(f"{o.flag} {shown(value, 40)}: a Ray resource name, e.g. merge")
    return value


def address(value: Any, o: Option) -> str:
    if not isinstance(value, str):
        raise InputError(f"{o.flag} {shown(value, 40)}: a Ray address, e.g. auto or ray://head:10001")
    return value


def number(value: Any, o: Option) -> float:
    return parse_scale(value, o.flag)


MAX_LAYER = 10**6  # far past any model's layer count


def slices(value: Any, o: Option) -> tuple[tuple[tuple[tuple[int, int], ...], tuple[int, int] | None], ...]:
    """A frankenmerge's slices (mergekit's `slices`, as a recipe records them): a list of
    {layers: [[FIRST, END] per model of the slice], base: [FIRST, END] or null}, each range as many
    layers as the others of its slice (no model but the base: its layers as they are). The models
    are the recipe's, the slices' in order."""
    def layer_range(r: Any, where: str) -> tuple[int, int]:
        if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_LAYER for x in r) and r[0] < r[1]):
            raise InputError(f"{where}: {shown(r, 40)}: a layer range is [FIRST, END], whole numbers, FIRST < END")
        return r[0], r[1]

    if not isinstance(value, (list, tuple)) or not value:
        raise InputError(f"{o.key}: a list of slices like {{layers: [[0, 16]], base: null}}")
    out = []
    for i, s in enumerate(value):
        where = f"{o.key}[{i}]"
        if not (isinstance(s, dict) and set(s) <= {"layers", "base"} and isinstance(s.get("layers"), (list, tuple))
                and (s["layers"] or s.get("base") is not None)):
            raise InputError(f"{where}: {shown(s, 60)}: write {{layers: [[FIRST, END] per model], base: [FIRST, END] "
                             "or null}")
        layers = tuple(layer_range(r, f"{where}.layers") for r in s["layers"])
        base = layer_range(s["base"], f"{where}.base") if s.get("base") is not None else None
        counts = {b - a for a, b in (*layers, *([base] if base else []))}
        if len(counts) != 1:
            raise InputError(f"{where}: its layer ranges span {sorted(counts)} layers; every source of a slice "
                             "gives the same number of layers")
        out.append((layers, base))
    return tuple(out)
