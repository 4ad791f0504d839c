"""Frankenmerges (mergekit's `slices`) end to end on the session's local Ray: layers stacked from
ranges of the inputs' layers, tensors renamed and renumbered, the config's layer count the
output's; loaded with transformers and compared bit for bit with references built here from the
inputs' tensors by name."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from tests.conftest import make_llama_trio
from tests.helpers import assert_bit_identical, load_folder, mergekit_file
from tests.methods.test_geometric import slerp_reference

LAYER = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("franken"))
    return make_llama_trio(root, roles=("base", "chat", "cp"), layers=3, max_shard_size="100KB", seed=17)


@pytest.fixture(scope="module")
def tensors(models):
    return {role: load_folder(path) for role, path in models.items()}


def stacked(tensors: dict, slices: list[list[tuple[str, int]]], rule) -> dict[str, torch.Tensor]:
    """The output of a frankenmerge by name: each slice a list of (role, first layer) of its sources,
    all of `count` layers (`rule(name, [source tensors], layer index in the slice, count)` makes an
    output tensor from its sources' tensors); the embedding from the first slice's sources, the
    final norm and the head from the last one's."""
    out = {}
    first = slices[0][0]
    names = list(tensors[first[0][0]])
    o = 0
    for sources, count in [(s[0], s[1]) for s in slices]:
        for i in range(count):
            for name in names:
                m = LAYER.match(name)
                if m and m.group(2) == "0":
                    at = m.group(1) + "{}" + m.group(3)
                    out[at.format(o)] = rule(at.format(o), [tensors[r][at.format(f + i)] for r, f in sources], i, count)
            o += 1
    for name in names:
        if not LAYER.match(name):
            sources = first if "embed" in name else slices[-1][0]
            out[name] = rule(name, [tensors[r][name] for r, _ in sources], None, 1)
    return out


def _check_config(out: str, layers: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    assert AutoConfig.from_pretrained(out).num_hidden_layers == layers
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.bfloat16)
    assert len(model.model.layers) == layers


def test_a_passthrough_frankenmerge_stacks_renamed_layers(ray_local, models, tensors, tmp_path, cli_main, capsys):
    path = mergekit_file(tmp_path, f"""merge_method: passthrough
slices:
  - sources:
      - model: {models['chat']}
        layer_range: [0, 3]
  - sources:
      - model: {models['cp']}
        layer_range: [1, 3]
  - sources:
      - model: {models['chat']}
        layer_range: [1, 2]
        parameters: {{scale: 0.5}}
dtype: bfloat16
tokenizer_source: base
""")  # tokenizer_source: base, as community frankenmerge files say: the base model's files as they are
    assert cli_main(["plan", "--recipe", path, "--out", str(tmp_path / "planned")]) == 0
    shown = capsys.readouterr().out
    for line in ("layers 0-2 <- model 0-2", "layers 3-4 <- model[2] 1-2", "layers 5 <- model 1"):
        assert line in shown, shown
    out = str(tmp_path / "franken")
    assert cli_main(["run", path, "--out", out, "--item-size", "4KiB", "--workers", "2"]) == 0

    def rule(name, sources, i, count):
        x = sources[0]
        return (x * 0.5).to(x.dtype) if name.startswith("model.layers.5.") or name in ("model.norm.weight",
                                                                                    "lm_head.weight") else x

    want = stacked(tensors, [([("chat", 0)], 3), ([("cp", 1)], 2), ([("chat", 1)], 1)], rule)
    assert_bit_identical(load_folder(out), want)
    _check_config(out, 6)
    manifest = json.load(open(os.path.join(out, "raymerge_manifest.json")))
    assert manifest["recipe"]["slices"][1] == {"layers": [[1, 3]], "base": None}
    assert cli_main(["verify", out, "--recompute", "4"]) == 0


def test_slerp_slices_spread_t_over_each_slice(ray_local, models, tensors, tmp_path, cli_main):
    """The classic SLERP file: slices of two sources with the base among them; a gradient of t runs
    over each slice's own layers (a one-layer slice sits at t = 1, as in mergekit)."""
    path = mergekit_file(tmp_path, f"""merge_method: slerp
base_model: {models['base']}
slices:
  - sources:
      - model: {models['base']}
        layer_range: [0, 2]
      - model: {models['chat']}
        layer_range: [1, 3]
  - sources:
      - model: {models['base']}
        layer_range: [2, 3]
      - model: {models['chat']}
        layer_range: [0, 1]
parameters:
  t:
    - filter: self_attn
      value: [0.2, 0.9]
    - value: 0.4
dtype: bfloat16
""")
    out = str(tmp_path / "slerp")
    assert cli_main(["run", path, "--out", out, "--item-size", "4KiB", "--workers", "2"]) == 0

    def rule(name, sources, i, count):
        t = 0.4
        if "self_attn" in name:
            at = 0.0 if i is None else (i / (count - 1) if count > 1 else 1.0)
            t = 0.2 + at * 0.7
        return slerp_reference(sources[0], sources[1], t)

    want = stacked(tensors, [([("base", 0), ("chat", 1)], 2), ([("base", 2), ("chat", 0)], 1)], rule)
    assert_bit_identical(load_folder(out), want)
    _check_config(out, 3)


def test_task_arithmetic_slices_take_each_vector_from_the_base_layers_of_its_slice(ray_local, models, tensors, tmp_path,
                                                                                   cli_main):
    path = mergekit_file(tmp_path, f"""merge_method: task_arithmetic
base_model: {models['base']}
slices:
  - sources:
      - model: {models['chat']}
        layer_range: [2, 3]
        parameters: {{weight: 0.7}}
      - model: {models['base']}
        layer_range: [0, 1]
  - sources:
      - model: {models['base']}
        layer_range: [0, 2]
      - model: {models['cp']}
        layer_range: [1, 3]
      - model: {models['chat']}
        layer_range: [0, 2]
  - sources:
      - model: {models['base']}
        layer_range: [2, 3]
parameters: {{weight: 0.5}}
dtype: float32
out_dtype: bfloat16
""")
    out = str(tmp_path / "ta")
    assert cli_main(["run", path, "--out", out, "--item-size", "4KiB", "--workers", "2"]) == 0
    weights = {0: [0.7], 1: [0.5, 0.5]}

    def rule(name, sources, i, count):
        base, vectors = sources[0], sources[1:]
        w = weights[0] if len(vectors) == 1 else weights[1] if vectors else []
        acc = base.float()
        for s, v in zip(w, vectors):
            acc = acc + s * (v.float() - base.float())
        return acc.to(torch.bfloat16)

    want = stacked(tensors, [([("base", 0), ("chat", 2)], 1), ([("base", 0), ("cp", 1), ("chat", 0)], 2),
                             ([("base", 2)], 1)], rule)  # the base's layer alone: as it is, as mergekit returns it
    assert_bit_identical(load_folder(out), want)
    _check_config(out, 4)


@pytest.mark.parametrize("slices,match", [
    ("  - sources:\n      - model: {chat}\n        layer_range: [0, 4]\n",
     r"slices\[0\]: --model layer_range \[0, 4\] lies past its 3 layers; give a layer_range within \[0, 3\]"),
    ("  - sources:\n      - model: {chat}\n        layer_range: [0, 2]\n      - model: {cp}\n        layer_range: [0, 1]\n",
     r"slices\[0\]: its layer ranges span \[1, 2\] layers"),
    ("  - sources:\n      - model: {chat}\n", r"slices\[0\].sources\[0\].layer_range: None; write layer_range: "),
    ("  - sources:\n      - model: {chat}\n        layer_range: [0, 1]\n      - model: {chat}\n        layer_range: [1, 2]\n",
     r"slices\[0\].sources\[1\].model: .* is in this slice twice"),
])
def test_bad_slices_exit_2_with_one_line(models, tmp_path, cli_main, capsys, slices, match):
    path = mergekit_file(tmp_path, "merge_method: passthrough\nslices:\n" + slices.format(**models))
    out = str(tmp_path / "out")
    code = cli_main(["run", path, "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert not os.path.exists(out)
