"""Scale schedules: a vector's scale for each tensor.

A schedule is a number (every tensor), a gradient (numbers spread over the layers and linearly
interpolated, as mergekit's gradients are: layer i of n sits at t = i / (n - 1)), or rules: an
ordered list of (kind, text, number or gradient), the first that finds its text in the tensor's
name winning, with a default (a number or a gradient) for the tensors no rule names. A rule's kind
is how it finds its text: `pattern`, a regex that `search`es the name (raymerge's rules, run on
RE2 in linear time), or `contains`, a plain substring (mergekit's filters, which are never
regexes). Tensors outside numbered layers (embeddings, head, final norm) take a gradient's first
value, as mergekit gives them t = 0. The planner resolves a schedule into one float per tensor and
term.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from raymerge.ops.rules import compile_patterns

# The layer index in a tensor name: Llama's model.layers.N., GPT-2's h.N., blocks.N., layer.N.
# At most 9 ASCII digits: a longer run is no model's layer count (and int() of thousands of digits
# raises), so such a name is outside the numbered layers rather than an error of the whole plan.
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.([0-9]{1,9})\.")

Value = float | tuple[float, ...]  # a number, or a gradient over the layers
PATTERN, CONTAINS = "pattern", "contains"  # the kinds of rules, named as a recipe writes them
RULE_KINDS = (PATTERN, CONTAINS)
NAMED = -1  # Scale.at's layer: the one the tensor's name gives


def layer_of(name: str) -> int | None:
    """The layer a tensor belongs to, from its name; None outside numbered layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def count_layers(names: list[str], config: dict[str, Any] | None) -> int:
    """Layers of a model: its config's count, else one more than the highest layer index named."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        n = (config or {}).get(key)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return 1 + max((i for i in map(layer_of, names) if i is not None), default=0)


@dataclass(frozen=True)
class Scale:
    """One vector's schedule (see the module's docstring)."""

    default: Value = 1.0
    rules: tuple[tuple[str, str, Value], ...] = ()  # (PATTERN or CONTAINS, its text, value)

    def at(self, name: str, layers: int, layer: int | None = NAMED) -> float:
        """The scale of tensor `name` in a model of `layers` layers, at the layer its name gives, or
        at `layer` where one is given (None: outside the numbered layers). A slice of a frankenmerge
        gives its own: mergekit spreads a gradient over each slice's layers."""
        at = layer_of(name) if layer == NAMED else layer
        for (_, text, value), regex in zip(self.rules, self._regexes):
            if regex.search(name) if regex is not None else text in name:
                return _evaluate(value, at, layers)
        return _evaluate(self.default, at, layers)

    @cached_property
    def _regexes(self) -> tuple[Any, ...]:
        """Each rule's compiled pattern (None for a substring), compiled once, not once per tensor."""
        compiled = iter(compile_patterns([text for kind, text, _ in self.rules if kind == PATTERN], "--scale-rule"))
        return tuple(next(compiled) if kind == PATTERN else None for kind, _, _ in self.rules)

    @property
    def constant(self) -> bool:
        return not self.rules and isinstance(self.default, float)

    def to_json(self) -> Any:
        """As a recipe writes it: a number, a list, or {rules: [{pattern or contains, scale}], default}."""
        if not self.rules:
            return _json(self.default)
        return {"rules": [{kind: text, "scale": _json(v)} for kind, text, v in self.rules],
                "default": _json(self.default)}


def _evaluate(value: Value, layer: int | None, layers: int) -> float:
    if isinstance(value, float):
        return value
    t = 0.0 if layer is None else (layer / (layers - 1) if layers > 1 else 1.0)
    scaled = min(t, 1.0) * (len(value) - 1)  # a layer index past the count stays at the end
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]  # mergekit's interpolation, in the same order


def _json(value: Value) -> Any:
    return list(value) if isinstance(value, tuple) else value
