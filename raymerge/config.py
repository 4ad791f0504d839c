"""Options and recipes, validated at the boundary: every bad value becomes one clear InputError."""

from __future__ import annotations

import difflib
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from raymerge.errors import InputError
from raymerge.ops.rules import VOCAB_MODES, parse_special_tokens
from raymerge.safetensors.dtypes import ALIASES, FLOATS
from raymerge.untrusted import UntrustedJSON, parse_json, shown

MAX_SIZE = 2**62  # bytes: far past any checkpoint, and safe in every int64 offset
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int, option: str) -> int:
    """Bytes from '5GB' (decimal, as Hugging Face counts), '64MiB' (binary) or a plain integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise InputError(f"{option} {value!r}: not a size; write e.g. 5GB, 500MB, 64MiB or a byte count")
        x = float(m.group(1)) * _UNITS[m.group(2).upper()]
        n = int(x) if math.isfinite(x) else MAX_SIZE
    if n <= 0:
        raise InputError(f"{option} {value!r}: must be a positive size")
    if n >= MAX_SIZE:
        raise InputError(f"{option} {str(value)[:40]!r}: too large; sizes go up to a few TB")
    return n


def parse_number(value: float | str, option: str) -> float:
    """A finite float from a number or its text (bools are not numbers here)."""
    if isinstance(value, bool):
        raise InputError(f"{option} {value!r}: not a number; write e.g. 0.5 or 1.0")
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
        raise InputError(f"--dtype {value!r}: not a float dtype; use float32, bfloat16 or float16")
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


def parse_count(value: int | None, option: str, minimum: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{option} {value!r}: must be an integer >= {minimum}")
    return value


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to compute): layout, pool and storage settings."""

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
    def parse(cls, *, shard_size: str | int = "5GB", item_size: str | int = "32MiB", workers: int | None = None,
              cpus_per_worker: float = 1.0, in_flight: int = 2, address: str | None = None,
              storage_options: str | dict | None = None, overwrite: bool = False,
              resume: bool = False, gpus_per_worker: float = 0.0, worker_resource: str | None = None,
              allow_nonfinite: bool = False) -> RunOptions:
        cpus = parse_number(cpus_per_worker, "--cpus-per-worker")
        if cpus <= 0:
            raise InputError(f"--cpus-per-worker {cpus_per_worker!r}: must be positive")
        gpus = parse_number(gpus_per_worker, "--gpus-per-worker")
        if gpus < 0:
            raise InputError(f"--gpus-per-worker {gpus_per_worker!r}: must be zero or positive")
        if worker_resource is not None and not (isinstance(worker_resource, str)
                                                and re.fullmatch(r"[A-Za-z0-9_.:/-]+", worker_resource)):
            raise InputError(f"--worker-resource {shown(worker_resource, 40)}: a Ray resource name, e.g. merge")
        if address is not None and not isinstance(address, str):
            raise InputError(f"--address {shown(address, 40)}: a Ray address, e.g. auto or ray://head:10001")
        overwrite, resume = _bool(overwrite, "overwrite", ""), _bool(resume, "resume", "")
        item_size = parse_size(item_size, "--item-size")
        if not MIN_ITEM_SIZE <= item_size <= MAX_ITEM_SIZE:
            raise InputError(f"--item-size {item_size}: must be between 4KiB and 2GiB (a worker holds a few "
                             "items' inputs in memory); the default 32MiB suits most runs")
        if overwrite and resume:
            raise InputError("--overwrite and --resume: choose one (start over, or continue the unfinished run)")
        return cls(shard_size=parse_size(shard_size, "--shard-size"), item_size=item_size,
                   workers=parse_count(workers, "--workers"), cpus_per_worker=cpus,
                   in_flight=parse_count(in_flight, "--in-flight"), address=address,
                   storage_options=parse_storage_options(storage_options), overwrite=overwrite, resume=resume,
                   gpus_per_worker=gpus, worker_resource=worker_resource,
                   allow_nonfinite=_bool(allow_nonfinite, "allow_nonfinite", ""))


MIN_ITEM_SIZE = 4096
MAX_ITEM_SIZE = 2**31
RUN_KEYS = ("shard_size", "item_size", "workers", "cpus_per_worker", "in_flight", "address",
            "storage_options", "overwrite", "resume", "gpus_per_worker", "worker_resource", "allow_nonfinite")


@dataclass(frozen=True)
class Recipe:
    """What to compute. Every command is one: merge (cp + sum scale_i * (chat_i - base)),
    extract (chat - base, a vector) and apply (cp + sum scale_i * vector_i)."""

    kind: str
    out: str | None
    cp: str | None = None
    base: str | None = None
    chats: tuple[tuple[str, float], ...] = ()
    vectors: tuple[tuple[str, float], ...] = ()
    vocab: str = "overlap"
    skip: tuple[str, ...] = ()
    special_tokens: tuple[tuple[int, int], ...] = ()
    chat_template: bool = True
    dtype: str | None = None

    def to_mapping(self) -> dict[str, Any]:
        """The recipe as `raymerge run` reads it (and as the manifest records it)."""
        m: dict[str, Any] = {"kind": self.kind}
        if self.base:
            m["base"] = self.base
        if self.chats:
            m["chat"] = [u for u, _ in self.chats]
        if self.cp:
            m["cp"] = self.cp
        if self.vectors:
            m["vector"] = [u for u, _ in self.vectors]
        if self.kind != "extract":
            m["scale"] = [s for _, s in (self.chats or self.vectors)]
            m.update(vocab=self.vocab, skip=list(self.skip), chat_template=self.chat_template,
                     special_tokens=",".join(f"{a}:{b}" for a, b in self.special_tokens) or None)
        m["dtype"] = self.dtype
        m["out"] = self.out
        return m


_RECIPE_KEYS = {
    "merge": ("base", "chat", "cp", "scale", "out", "vocab", "skip", "special_tokens", "chat_template", "dtype"),
    "extract": ("base", "chat", "out", "dtype"),
    "apply": ("cp", "vector", "scale", "out", "vocab", "skip", "chat_template", "dtype"),
}
_REQUIRED = {"merge": ("base", "chat", "cp"), "extract": ("base", "chat"), "apply": ("cp", "vector")}


def build_recipe(kind: str, values: dict[str, Any], where: str = "") -> tuple[Recipe, RunOptions]:
    """Validate a recipe given as a mapping (parsed YAML, or the CLI's flags) and split it into
    what to compute and how to run. Keys may use '-' or '_'. Errors name the key and the fix."""
    at = f"{where}: " if where else ""
    if not isinstance(kind, str) or kind not in _RECIPE_KEYS:
        raise InputError(f"{at}kind {shown(kind, 40)}: must be one of {', '.join(_RECIPE_KEYS)}")
    for key in values:
        if not isinstance(key, str):
            raise InputError(f"{at}key {shown(key, 40)}: keys are option names like base, chat, scale, out")
    values = {k.replace("-", "_"): v for k, v in values.items() if v is not None}
    allowed = _RECIPE_KEYS[kind] + RUN_KEYS
    for key in values:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; {kind} takes: {', '.join(allowed)}"
            raise InputError(f"{at}unknown key {shown(key, 40)} for {kind}{hint}")
    for key in _REQUIRED[kind]:
        if not values.get(key):
            raise InputError(f"{at}{kind} needs {_flag(key)}")
    urls_ = {k: _url_list(values.get(k), k, at) for k in ("chat", "vector")}
    inputs = urls_["chat"] if kind != "apply" else urls_["vector"]
    if kind == "extract" and len(inputs) != 1:
        raise InputError(f"{at}extract takes one --chat; extract one vector per chat model")
    scales = _scales(values.get("scale"), len(inputs), "--vector" if kind == "apply" else "--chat", at)
    pairs = tuple(zip(inputs, scales))
    recipe = Recipe(
        kind=kind, out=_opt_str(values.get("out"), "out", at),
        cp=_opt_str(values.get("cp"), "cp", at), base=_opt_str(values.get("base"), "base", at),
        chats=pairs if kind != "apply" else (), vectors=pairs if kind == "apply" else (),
        vocab=_choice(values.get("vocab", "overlap"), "vocab", VOCAB_MODES, at),
        skip=tuple(_str_list(values.get("skip"), "skip", at)),
        special_tokens=_special(values.get("special_tokens"), at),
        chat_template=_bool(values.get("chat_template", True), "chat_template", at),
        dtype=_at(at, parse_dtype, values.get("dtype")))
    for pattern in recipe.skip:
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as e:
            raise InputError(f"{at}--skip {shown(pattern, 40)}: not a valid regular expression ({e})") from e
    run = _at(at, RunOptions.parse, **{k: values[k] for k in RUN_KEYS if k in values})
    return recipe, run


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _at(at: str, fn, *args, **kwargs):
    """Call a parser, prefixing its error with where the value came from."""
    try:
        return fn(*args, **kwargs)
    except InputError as e:
        if not at:
            raise
        raise InputError(f"{at}{e}") from e


def _opt_str(value: Any, key: str, at: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InputError(f"{at}{_flag(key)}: expected a URL string, got {value!r}")


def _url_list(value: Any, key: str, at: str) -> list[str]:
    items = _str_list(value, key, at)
    if not all(items):
        raise InputError(f"{at}{_flag(key)}: empty URL")
    return items


def _str_list(value: Any, key: str, at: str) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise InputError(f"{at}{_flag(key)}: expected a string or a list of strings, got {value!r}")
    return list(items)


def _scales(value: Any, count: int, pairs_with: str, at: str) -> list[float]:
    if value is None:
        return [1.0] * count
    items = value if isinstance(value, (list, tuple)) else [value]
    scales = [_at(at, parse_scale, v) for v in items]
    if len(scales) != count:
        raise InputError(f"{at}{len(scales)} --scale values for {count} {pairs_with} inputs; give one --scale "
                         f"per {pairs_with}, in the same order (or none for 1.0 each)")
    return scales


def _choice(value: Any, key: str, choices: tuple[str, ...], at: str) -> str:
    if value not in choices:
        raise InputError(f"{at}{_flag(key)} {value!r}: must be one of {', '.join(choices)}")
    return value


def _bool(value: Any, key: str, at: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{at}{key}: expected true or false, got {value!r}")
    return value


def _special(value: Any, at: str) -> tuple[tuple[int, int], ...]:
    if value is None:
        return ()
    if isinstance(value, dict):
        value = ",".join(f"{k}:{v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    try:
        return tuple(parse_special_tokens(str(value)))
    except ValueError as e:
        raise InputError(f"{at}{e}") from e


def load_recipe_file(path: str) -> tuple[Recipe, RunOptions]:
    """A YAML recipe: `kind` plus the same keys as the command's flags (`-` or `_`)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise InputError(f"recipe {path}: cannot read it ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise InputError(f"recipe {path}: not valid YAML ({str(e).splitlines()[0]})") from e
    except RecursionError as e:
        raise InputError(f"recipe {path}: nested too deeply; a recipe is a flat mapping of keys") from e
    if not isinstance(data, dict):
        raise InputError(f"recipe {path}: must be a mapping of keys like kind, base, chat, cp, out")
    kind = data.pop("kind", None)
    if kind is None:
        raise InputError(f"recipe {path}: needs 'kind: merge', 'kind: extract' or 'kind: apply'")
    return build_recipe(kind, data, where=f"recipe {path}")
