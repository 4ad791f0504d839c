"""planning.slices: which input tensor each output tensor of a frankenmerge comes from."""

from __future__ import annotations

import pytest

from raymerge.errors import PlanError
from raymerge.planning.inputs import Checkpoint, TensorRef
from raymerge.planning.slices import LayerSlice, stacked


def _ckpt(role: str, layers: int, extra: tuple[str, ...] = (), tied: bool = False) -> Checkpoint:
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.{p}" for i in range(layers) for p in ("self_attn.q_proj.weight", "mlp.up_proj.weight")]
    names += ["model.norm.weight"] + ([] if tied else ["lm_head.weight"]) + list(extra)
    shapes = {"model.embed_tokens.weight": (32, 8), "lm_head.weight": (32, 8), "model.norm.weight": (8,)}
    tensors = {n: TensorRef(0, "BF16", shapes.get(n, (8, 8)), 0, 2 * 64) for n in names}
    return Checkpoint(role, f"/m/{role}", (), tensors, (), {"num_hidden_layers": layers, "vocab_size": 32})


def test_slices_stack_layers_renumbered_with_embedding_first_and_head_last():
    a, b = _ckpt("model", 4), _ckpt("model[2]", 6)
    out, layer_map = stacked((LayerSlice((0,), (1,), 2), LayerSlice((1,), (3,), 3)), None, [a, b])
    names = [n for n, _ in out]
    assert names[0] == "model.embed_tokens.weight" and names[-2:] == ["model.norm.weight", "lm_head.weight"]
    origins = dict(out)
    assert origins["model.embed_tokens.weight"].terms == ((0, "model.embed_tokens.weight"),)  # the first slice's
    assert origins["lm_head.weight"].terms == ((1, "lm_head.weight"),)  # the last slice's
    assert origins["model.layers.1.mlp.up_proj.weight"].terms == ((0, "model.layers.2.mlp.up_proj.weight"),)
    o = origins["model.layers.4.self_attn.q_proj.weight"]
    assert (o.terms, o.layer, o.layers) == (((1, "model.layers.5.self_attn.q_proj.weight"),), 2, 3)
    assert layer_map == ((("model", 1),), (("model", 2),), (("model[2]", 3),), (("model[2]", 4),), (("model[2]", 5),))


def test_a_slice_with_a_base_takes_the_anchor_from_the_base_range():
    base, m = _ckpt("base", 4), _ckpt("model", 4, tied=True)
    out, layer_map = stacked((LayerSlice((0,), (3,), 1, base=0),), base, [m])
    o = dict(out)["model.layers.0.mlp.up_proj.weight"]
    assert o.anchor == "model.layers.0.mlp.up_proj.weight" and o.terms == ((0, "model.layers.3.mlp.up_proj.weight"),)
    assert layer_map == ((("base", 0), ("model", 3)),)


def test_a_range_past_the_layers_or_two_layer_stacks_are_refused():
    with pytest.raises(PlanError, match=r"slices\[0\]: --model layer_range \[2, 6\] lies past its 4 layers"):
        stacked((LayerSlice((0,), (2,), 4),), None, [_ckpt("model", 4)])
    vision = _ckpt("model", 2, extra=("vision.encoder.layers.0.fc.weight",))
    with pytest.raises(PlanError, match=r"2 stacks of numbered layers \(model.layers.N, vision.encoder.layers.N\)"):
        stacked((LayerSlice((0,), (0,), 2),), None, [vision])
