"""Where each output tensor's inputs lie: the same tensor of every input (a whole-model merge), or,
for a frankenmerge (mergekit's `slices`), the layers of a slice's sources stacked one slice after
another, tensors renamed and renumbered.

A slice takes `count` layers from each of its sources (terms of the recipe) and from the base
model, each from its own first layer; output layer o of a slice that starts at output layer s is
made from each source's layer first + (o - s). The tensors outside the numbered layers come from
the first slice's sources (the embedding) or the last one's (the final norm and the head), as
mergekit's `pre_weights` and `post_weights`. A gradient is spread over each slice's own layers
(t = i / (count - 1); a slice of one layer sits at t = 1); the tensors outside the layers sit at
t = 0, as in mergekit. A slice may take the base model's layers alone (no other source): they are
copied as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from raymerge.errors import PlanError
from raymerge.ops.rules import is_head_name, is_vocab_tensor
from raymerge.planning.inputs import Checkpoint
from raymerge.planning.schedule import NAMED, count_layers, layer_of

# A numbered layer's tensor name: (prefix, layer, suffix), e.g. model.layers. 7 .mlp.up_proj.weight
_LAYER_NAME = re.compile(r"^(|.*?\.)((?:layers|h|blocks|layer)\.)([0-9]{1,9})(\..*)$")
# Tensors before the layers by name: Llama's embed_tokens, GPT-2's wte and wpe, OPT's embed_positions,
# Bloom's word_embeddings and word_embeddings_layernorm.
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|embed_positions|wte|wpe|word_embeddings\w*|embeddings?)\.")


@dataclass(frozen=True, slots=True)
class LayerSlice:
    """One slice of a frankenmerge: `count` layers from each of its terms (consecutive terms of the
    recipe, from `terms[0]` on), each from its first layer, and from the base model's `base` on
    (None: the recipe has no base model)."""

    terms: tuple[int, ...]  # the recipe's terms (indices) this slice is made of
    firsts: tuple[int, ...]  # each term's first input layer
    count: int
    base: int | None = None


@dataclass(frozen=True, slots=True)
class Origin:
    """What one output tensor is made from: the base model's tensor of that name (the anchor's,
    and what each term is taken minus), each term taking part with the name of its tensor, and the
    layer a schedule evaluates at (NAMED: the name's, in a model of `layers` layers)."""

    anchor: str
    terms: tuple[tuple[int, str], ...]
    layer: int | None = NAMED
    layers: int = 1


def whole_model(names: list[str], term_count: int) -> list[tuple[str, Origin]]:
    """A whole-model merge: every tensor from the same tensor of every input."""
    return [(n, Origin(n, tuple((j, n) for j in range(term_count)))) for n in names]


def stacked(slices: tuple[LayerSlice, ...], anchor: Checkpoint | None, term_ckpts: list[Checkpoint]) -> tuple[
        list[tuple[str, Origin]], tuple[tuple[tuple[str, int], ...], ...]]:
    """A frankenmerge's output tensors in order (the embedding, the layers, the head) with their
    origins, and the layer map: per output layer, (role, input layer) of the base model and each
    source. PlanError where a range lies past a model's layers."""
    _check_ranges(slices, anchor, term_ckpts)
    _check_one_stack(slices, anchor, term_ckpts)
    out: list[tuple[str, Origin]] = []
    layer_map = []
    first, last = slices[0], slices[-1]
    out += [(n, Origin(n, tuple((j, n) for j in first.terms), None))
            for n in _outside(_reference(first, anchor, term_ckpts), pre=True)]
    o = 0
    for s in slices:
        templates = _templates(_reference(s, anchor, term_ckpts))
        for i in range(s.count):
            source = (s.base if anchor is not None else s.firsts[0]) + i
            for at in templates.get(source, ()):
                base = at.format(s.base + i) if s.base is not None else at.format(source)
                out.append((at.format(o), Origin(base, tuple((j, at.format(f + i)) for j, f in zip(s.terms, s.firsts)),
                                                 i, s.count)))
            roles = [(anchor.role, s.base + i)] if anchor is not None and s.base is not None else []
            layer_map.append(tuple(roles + [(term_ckpts[j].role, f + i) for j, f in zip(s.terms, s.firsts)]))
            o += 1
    out += [(n, Origin(n, tuple((j, n) for j in last.terms), None))
            for n in _outside(_reference(last, anchor, term_ckpts), pre=False)]
    return out, tuple(layer_map)


def _templates(ckpt: Checkpoint) -> dict[int, list[str]]:
    """A checkpoint's numbered layers' tensor names, by layer, with "{}" for the layer number."""
    out: dict[int, list[str]] = {}
    for m in filter(None, map(_LAYER_NAME.match, ckpt.tensors)):
        out.setdefault(int(m.group(3)), []).append(m.group(1) + m.group(2) + "{}" + m.group(4))
    return out


def _reference(s: LayerSlice, anchor: Checkpoint | None, term_ckpts: list[Checkpoint]) -> Checkpoint:
    """The checkpoint whose tensor names a slice's output takes: the base model's, else its first source's."""
    return anchor if anchor is not None else term_ckpts[s.terms[0]]


def _outside(ckpt: Checkpoint, pre: bool) -> list[str]:
    """The tensors outside the numbered layers before them (pre: the embeddings, of tokens and of
    positions, and their norm: mergekit's pre_weights) or after them (the rest: the final norm, the head)."""
    names = [n for n in ckpt.tensors if layer_of(n) is None]
    before = [n for n in names if not is_head_name(n) and (
        _EMBEDDING.search(n) or is_vocab_tensor(n, ckpt.tensors[n].shape, ckpt.config, tuple(ckpt.tensors)))]
    return before if pre else [n for n in names if n not in before]


def _check_ranges(slices: tuple[LayerSlice, ...], anchor: Checkpoint | None, term_ckpts: list[Checkpoint]) -> None:
    for k, s in enumerate(slices):
        ranges = [(term_ckpts[j], f) for j, f in zip(s.terms, s.firsts)]
        if anchor is not None and s.base is not None:
            ranges.append((anchor, s.base))
        for ckpt, f in ranges:
            have = count_layers(list(ckpt.tensors), ckpt.config)
            if f + s.count > have:
                raise PlanError(f"plan: slices[{k}]: --{ckpt.role} layer_range [{f}, {f + s.count}] lies past its "
                                f"{have} layers; give a layer_range within [0, {have}]")


def _check_one_stack(slices: tuple[LayerSlice, ...], anchor: Checkpoint | None, term_ckpts: list[Checkpoint]) -> None:
    """A frankenmerge stacks one sequence of numbered layers: a model with two (a vision tower's
    beside its language model's) would have both renumbered as one, which mergekit refuses too."""
    for s in slices:
        ckpt = _reference(s, anchor, term_ckpts)
        stacks = sorted({m.group(1) + m.group(2) for m in map(_LAYER_NAME.match, ckpt.tensors) if m})
        if len(stacks) > 1:
            raise PlanError(f"plan: slices: --{ckpt.role} has {len(stacks)} stacks of numbered layers "
                            f"({', '.join(x + 'N' for x in stacks[:3])}); raymerge stacks the slices of one: "
                            "merge such a model whole (models: instead of slices:)")
