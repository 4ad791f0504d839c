"""mergekit configurations as raymerge recipes: which model is the anchor, which are the vectors.

Read: `merge_method` (each method's mergekit recipe kind: methods.MERGEKIT), `base_model`,
`models[].model` and their `parameters` (those the method declares with a mergekit name), or
`slices[].sources[]` (model, layer_range, parameters) with each slice's `parameters` (a frankenmerge:
planning.slices),
top-level `parameters` (the default of every model's), `dtype` (the compute dtype: every input is cast
to it and each operation rounded as mergekit rounds it; without it, each tensor's inputs' dtype),
`out_dtype`, `tokenizer_source: base`. A parameter may be a number, a gradient (a list of numbers) or a list of
`{filter, value}` conditions (mergekit's filter is a substring of the tensor name, never a regex:
it becomes a `contains` rule of the schedule; a condition without a filter, or with "*", is the
default). A file means what it means to mergekit: anything else, raymerge's own syntax included
(a `{rules, default}` schedule), is refused with one line naming the key and what to write.
Model references are local paths, URLs, or Hugging Face ids (`org/name` -> `hf://org/name`).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import replace
from typing import Any

from raymerge.config.values import parse_compute_dtype
from raymerge.errors import InputError
from raymerge.methods import MERGEKIT, METHODS, RECIPES, Parameter
from raymerge.planning.schedule import CONTAINS
from raymerge.planning.vocabulary import TokenizerSpec, check_template, parse_spec
from raymerge.untrusted import shown

log = logging.getLogger("raymerge")

_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
         "tokenizer", "chat_template", "name")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def is_mergekit(data: dict[str, Any]) -> bool:
    return "merge_method" in data


def recipe_values(data: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """(raymerge recipe kind, its keys) for a mergekit configuration; InputError for what cannot map."""
    method = data.get("merge_method")
    if method not in MERGEKIT:
        raise InputError(f"{where}: merge_method {shown(method, 40)}: raymerge runs mergekit's "
                         f"{', '.join(MERGEKIT)} recipes; for the others use mergekit itself")
    for key in data:
        if key not in _KEYS:
            raise InputError(f"{where}: {shown(key, 40)}: not a key raymerge can map; raymerge reads "
                             f"{', '.join(_KEYS)}")
    tokenizer = _tokenizer(data, where)
    if ("models" in data) == ("slices" in data):
        raise InputError(f"{where}: give models (whole models) or slices (layer ranges), one of them")
    defaults = _parameters(data.get("parameters"), method, f"{where}: parameters")
    how = RECIPES[method]
    base = _reference(data["base_model"], f"{where}: base_model") if data.get("base_model") is not None else None
    if base is None and (how.anchor or how.minus) and not how.anchor_optional:
        raise InputError(f"{where}: {method} needs a base_model: the model each one's change is taken from")
    models = _Models(method, base)
    if "models" in data:
        entries = data["models"]
        if not isinstance(entries, list) or not entries or not all(isinstance(m, dict) for m in entries):
            raise InputError(f"{where}: models: a list of {{model: REFERENCE, parameters: {{weight: X}}}}")
        for i, entry in enumerate(entries):
            _keys(entry, ("model", "parameters"), f"{where}: models[{i}]")
            models.add(entry, defaults, f"{where}: models[{i}]")
        if how.base_joins and base is not None and not models.has(base):
            models.add({"model": base}, defaults, f"{where}: base_model")  # mergekit adds it after the models
        values: dict[str, Any] = {}
    else:
        values = {"slices": _slices(data["slices"], models, defaults, where)}
    values.update(models.values())
    for p in _declared(method):
        if not p.per_vector and p.mergekit in defaults:
            values[p.name] = defaults[p.mergekit]
    if base is not None:
        values["base"] = base
    if tokenizer == TokenizerSpec("base") and "slices" in data:
        tokenizer = None  # a frankenmerge's usual `tokenizer_source: base`: the base model's files, as they are
    if tokenizer is not None:
        values["tokenizer"] = tokenizer
    dtype = data.get("dtype")
    values["compute_dtype"] = _compute_dtype(dtype, where)
    if data.get("out_dtype", dtype) is not None:
        values["dtype"] = data.get("out_dtype", dtype)
    return method, values


class _Models:
    """The models of a configuration as the recipe's vector inputs, with their per-model parameters
    (a model's own over its slice's over the file's). The base model itself is the anchor, not a
    vector, where the method takes one."""

    def __init__(self, method: str, base: str | None) -> None:
        self.method, self.base = method, base
        self.urls: list[str] = []
        self.per_model: dict[str, list] = {p.mergekit: [] for p in _declared(method) if p.per_vector}

    def has(self, url: str) -> bool:
        return url.rstrip("/") in [u.rstrip("/") for u in self.urls]

    def is_base(self, url: str) -> bool:
        return bool(RECIPES[self.method].anchor) and self.base is not None and url.rstrip("/") == self.base.rstrip("/")

    def add(self, entry: dict, defaults: dict[str, Any], at: str) -> bool:
        """Add one model (a models entry or a slice's source); False for the base model itself
        (mergekit takes no change from it, nor its weight into normalize's sum)."""
        url = _reference(entry.get("model"), f"{at}.model")
        own = _over(_parameters(entry.get("parameters"), self.method, f"{at}.parameters"), defaults)
        if self.is_base(url):
            return False
        for p in _declared(self.method):
            if p.required and p.mergekit not in own:
                raise InputError(f"{at}.parameters.{p.mergekit}: missing; mergekit's {self.method} needs a "
                                 f"{p.mergekit} for every model (under the model's parameters, or the file's)")
            setting = own.get(p.mergekit, p.default)
            if isinstance(setting, dict) and setting["default"] is None:  # filters alone, in every scope
                if p.required:
                    raise InputError(f"{at}.parameters.{p.mergekit}: its filters leave other tensors without a "
                                     f"{p.mergekit}, which mergekit refuses; end the list with {{value: X}} (here or "
                                     "in the file's parameters)")
                setting = {**setting, "default": p.default}
            if p.per_vector:
                self.per_model[p.mergekit].append(setting)
        self.urls.append(url)
        return True

    def values(self) -> dict[str, Any]:
        values: dict[str, Any] = {"model": self.urls}
        for p in _declared(self.method):
            if p.per_vector and (p.name == "scale" or any(x != p.default for x in self.per_model[p.mergekit])):
                values[p.name] = self.per_model[p.mergekit]  # a parameter left at its default everywhere stays unsaid
        return values


def _slices(value: Any, models: _Models, defaults: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """mergekit's slices as the recipe's: each source a model (the base model's range apart), its
    layer_range kept; the slice's parameters between the file's and each source's own."""
    if not isinstance(value, list) or not value or not all(isinstance(s, dict) for s in value):
        raise InputError(f"{where}: slices: a list of {{sources: [{{model: REFERENCE, layer_range: [FIRST, END]}}]}}")
    out = []
    for i, s in enumerate(value):
        at = f"{where}: slices[{i}]"
        _keys(s, ("sources", "parameters", "base_model"), at)
        if s.get("base_model") is not None and (models.base is None or _reference(s["base_model"], at).rstrip("/")
                                                != models.base.rstrip("/")):
            raise InputError(f"{at}.base_model: a base model of its own; raymerge takes the file's base_model for "
                             "every slice (give it at the top, and drop it here)")
        given = _parameters(s.get("parameters"), models.method, f"{at}.parameters")
        for p in _declared(models.method):
            if not p.per_vector and p.mergekit in given:
                raise InputError(f"{at}.parameters.{p.mergekit}: one value for the whole merge; give it in the "
                                 "file's parameters")
        own = _over(given, defaults)
        sources = s.get("sources")
        if not isinstance(sources, list) or not sources or not all(isinstance(x, dict) for x in sources):
            raise InputError(f"{at}.sources: a list of {{model: REFERENCE, layer_range: [FIRST, END]}}")
        layers, base, seen = [], None, set()
        for k, src in enumerate(sources):
            where_src = f"{at}.sources[{k}]"
            _keys(src, ("model", "layer_range", "parameters"), where_src)
            r = src.get("layer_range")
            if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in r) and 0 <= r[0] < r[1]):
                raise InputError(f"{where_src}.layer_range: {shown(r, 40)}; write layer_range: [FIRST, END], whole "
                                 "numbers, FIRST < END")
            model = _reference(src.get("model"), f"{where_src}.model").rstrip("/")
            if model in seen:
                raise InputError(f"{where_src}.model: {shown(model, 60)} is in this slice twice; mergekit takes each "
                                 "model once per slice")
            seen.add(model)
            if models.add(src, own, where_src):
                layers.append(r)
            else:
                base = r
        out.append({"layers": layers, "base": base})
    return out


def _tokenizer(data: dict[str, Any], where: str) -> Any:
    """mergekit's tokenizer source (the `tokenizer:` section's over `tokenizer_source`), with its
    `chat_template`; or None. A chat template alone: the donor's tokenizer as it is, with it."""
    spec = _source(data, where)
    template = data.get("chat_template")
    if template is None:
        return spec
    return replace(spec or TokenizerSpec(""), chat_template=check_template(template, f"{where}: chat_template"))


def _source(data: dict[str, Any], where: str) -> Any:
    section = data.get("tokenizer")
    if section is None:
        source = data.get("tokenizer_source")
        return None if source is None else parse_spec(source, None, f"{where}: tokenizer_source", _reference)
    if not isinstance(section, dict):
        raise InputError(f"{where}: tokenizer: a mapping of source, tokens, pad_to_multiple_of")
    _keys(section, ("source", "tokens", "pad_to_multiple_of"), f"{where}: tokenizer")
    return parse_spec(section.get("source", "union"), section.get("tokens"), f"{where}: tokenizer", _reference,
                      section.get("pad_to_multiple_of"))


def _keys(entry: dict, allowed: tuple[str, ...], at: str) -> None:
    for key in entry:
        if key not in allowed:
            raise InputError(f"{at}: {shown(key, 40)}: raymerge reads {', '.join(allowed)}")


def _compute_dtype(dtype: Any, where: str) -> str:
    """The compute dtype of a mergekit file: its `dtype` (mergekit casts every input to it and computes
    there), else each tensor at its inputs' dtype, as mergekit promotes them. float64 computes in float32."""
    if dtype is None:
        return "inputs"
    if isinstance(dtype, str) and dtype.lower() in ("float64", "fp64", "f64"):
        log.warning("%s: dtype %s: raymerge computes in float32 (mergekit would in float64); the results can "
                    "differ in the last bits", where, dtype)
        return "F32"
    try:
        return parse_compute_dtype(dtype)
    except InputError:
        raise InputError(f"{where}: dtype {shown(dtype, 40)}: mergekit's compute dtype; raymerge computes in "
                         "float32, bfloat16 or float16") from None


def _declared(method: str) -> list[Parameter]:
    """The parameters of the method a mergekit kind computes with that mergekit names."""
    return [p for p in METHODS[RECIPES[method].method].parameters if p.mergekit]


_ANY_METHODS = {p.mergekit for m in METHODS.values() for p in m.parameters if p.mergekit}


def _parameters(value: Any, method: str, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{where}: a mapping of parameters like weight: 0.5")
    declared = {p.mergekit: p for p in _declared(method)}
    ignored = METHODS[RECIPES[method].method].mergekit_ignores
    out = {}
    for key, setting in value.items():
        if key not in declared and key not in ignored and key in _ANY_METHODS:
            # Another method's parameter (mergekit's tests give slerp models a weight): mergekit runs
            # without it; so does raymerge, saying so. A name no method takes is refused (a typo).
            log.warning("%s.%s: %s takes no %s; ignored, as mergekit ignores it", where, key, method, key)
            continue
        if key not in declared and key not in ignored:
            raise InputError(f"{where}.{shown(key, 40)}: not a {method} parameter raymerge can map; it takes "
                             f"{', '.join([*declared, *ignored])}")
        if key in ignored:
            continue  # changes nothing in the result (how mergekit holds its masks in memory)
        if declared[key].schedulable:
            out[key] = _schedule(setting, f"{where}.{key}")
        elif isinstance(setting, (list, dict)):
            raise InputError(f"{where}.{key}: one value for the whole merge; per-tensor filters and gradients "
                             f"apply to {' and '.join(k for k, p in declared.items() if p.schedulable)} only")
        else:
            out[key] = setting
    return out


def _over(high: dict[str, Any], low: dict[str, Any]) -> dict[str, Any]:
    """A scope's settings over a lower scope's (a model's over its slice's over the file's), as
    mergekit resolves them: where a setting's filters match no tensor's name (it ends without a
    condition that has no filter), the lower scope's setting applies."""
    out = dict(low)
    for key, setting in high.items():
        lower = low.get(key)
        if isinstance(setting, dict) and setting["default"] is None and lower is not None:
            setting = {"rules": setting["rules"] + lower["rules"], "default": lower["default"]} \
                if isinstance(lower, dict) else {"rules": setting["rules"], "default": lower}
        out[key] = setting
    return out


def _schedule(setting: Any, where: str) -> Any:
    """A mergekit weight or density as a raymerge schedule (its values are checked by the recipe);
    filters without a last condition that has none: default None, the lower scope's (`_over`)."""
    _no_mapping(setting, where)
    if not isinstance(setting, list) or not any(isinstance(c, dict) for c in setting):
        return setting  # a number, or a gradient
    rules, default = [], None
    for c in setting:
        if not (isinstance(c, dict) and "value" in c and set(c) <= {"filter", "value"}):
            raise InputError(f"{where}: {shown(c, 60)}: write {{filter: SUBSTRING, value: X}}")
        _no_mapping(c["value"], f"{where}: value")
        if c.get("filter") in (None, "*"):
            default = c["value"]
            break  # mergekit's first matching condition wins: nothing after a catch-all is reached
        if not isinstance(c["filter"], str):
            raise InputError(f"{where}: filter {shown(c['filter'], 40)}: a substring of tensor names")
        rules.append({CONTAINS: c["filter"], "scale": c["value"]})
    return {"rules": rules, "default": default}


def _no_mapping(value: Any, where: str) -> None:
    """Refuse a mapping as a value: mergekit has none, and raymerge's own {rules, default} schedule
    would otherwise pass through and mean something mergekit never would."""
    if isinstance(value, dict):
        raise InputError(f"{where}: a mapping (keys {shown(list(value), 40)}) is raymerge's own syntax; in a "
                         "mergekit file write a number, a gradient (a list of numbers) or a list of "
                         "{filter: SUBSTRING, value: X}")


def _reference(ref: Any, where: str) -> str:
    """A model reference as a URL: a URL or a local path as it is, a Hugging Face id on the Hub."""
    if not isinstance(ref, str) or not ref:
        raise InputError(f"{where}: a model reference (a path, a URL or a Hugging Face id), got {shown(ref, 40)}")
    if "+" in ref and "://" not in ref:
        raise InputError(f"{where} {shown(ref, 60)}: LoRA references (model+lora) are not supported; merge the LoRA first")
    if "://" in ref or ref.startswith(("/", ".", "~")) or os.path.exists(ref) or not _HUB_ID.fullmatch(ref):
        return ref
    return f"hf://{ref}"
