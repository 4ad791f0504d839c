"""End to end on a local Ray: transformers-made trio -> merge -> bit-exact against a float32
reference computed here -> transformers loads it with no missing or unexpected keys."""

from __future__ import annotations

import json
import os

import pytest
import torch

import raymerge
from raymerge.commit.manifest import MANIFEST_NAME
from raymerge.errors import OutputError
from tests.helpers import assert_bit_identical, chat_vector_reference, load_folder


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_merge_is_bit_exact_and_loads(ray_local, llama_trio, tmp_path, scale):
    out = str(tmp_path / "out")
    result = raymerge.merge(llama_trio["base"], llama_trio["chat"], llama_trio["cp"], out, scale=scale,
                            shard_size="100KB", item_size="16KiB", workers=2)
    inputs = {role: load_folder(path) for role, path in llama_trio.items()}
    want = chat_vector_reference(inputs["base"], inputs["chat"], inputs["cp"], scale)
    assert_bit_identical(load_folder(out), want)
    # The vector was not zero: the output differs from cp.
    assert any(not torch.equal(want[k], inputs["cp"][k]) for k in want)

    names = sorted(os.listdir(out))
    assert len(result.shards) > 1 and all(s in names for s in result.shards)
    assert not any(n.startswith(".") for n in names), names  # no staging left behind
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    assert set(index["weight_map"]) == set(want)
    for aux in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert open(os.path.join(out, aux), "rb").read() == open(os.path.join(llama_trio["cp"], aux), "rb").read()
    manifest = json.load(open(os.path.join(out, MANIFEST_NAME)))
    assert manifest["plan_hash"] == result.plan_hash and manifest["recipe"]["scale"] == [scale]

    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.bfloat16)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    for k, v in want.items():
        assert torch.equal(state[k].view(torch.uint8), v.view(torch.uint8)), k


def test_bits_do_not_depend_on_workers_or_item_size(ray_local, llama_trio, tmp_path):
    outs = []
    for workers, item_size, shard_size in ((1, "1MiB", "5GB"), (2, "4KiB", "60KB")):
        out = str(tmp_path / f"out{workers}")
        raymerge.merge(llama_trio["base"], llama_trio["chat"], llama_trio["cp"], out, scale=0.7,
                       workers=workers, item_size=item_size, shard_size=shard_size)
        outs.append(load_folder(out))
    assert_bit_identical(outs[0], outs[1])
    assert os.path.exists(tmp_path / "out1" / "model.safetensors")  # one shard: no index
    assert not os.path.exists(tmp_path / "out1" / "model.safetensors.index.json")


def test_existing_checkpoint_is_refused_then_overwritten(ray_local, llama_trio, tmp_path):
    out = str(tmp_path / "out")
    args = (llama_trio["base"], llama_trio["chat"], llama_trio["cp"], out)
    raymerge.merge(*args, scale=1.0, shard_size="100KB")
    before = sorted(os.listdir(out))
    with pytest.raises(OutputError, match="already holds a checkpoint"):
        raymerge.merge(*args, scale=0.5)
    assert sorted(os.listdir(out)) == before
    raymerge.merge(*args, scale=0.5, overwrite=True)  # one shard now: the old shards must be gone
    assert sorted(n for n in os.listdir(out) if n.endswith(".safetensors")) == ["model.safetensors"]
    inputs = {role: load_folder(path) for role, path in llama_trio.items()}
    assert_bit_identical(load_folder(out), chat_vector_reference(inputs["base"], inputs["chat"], inputs["cp"], 0.5))


@pytest.mark.parametrize("option,match", [
    ({"worker_resource": "merge_nodes"}, "no node of the cluster can hold one worker"),
    ({"gpus_per_worker": 1}, "1 GPU"),
])
def test_placement_the_cluster_cannot_satisfy_fails_fast(ray_local, llama_trio, tmp_path, option, match):
    """A worker resource no node advertises, or GPUs on a CPU-only cluster: an error at once, not a hang."""
    import time

    from raymerge.errors import ExecutionError

    out = str(tmp_path / "out")
    started = time.monotonic()
    with pytest.raises(ExecutionError, match=match):
        raymerge.merge(llama_trio["base"], llama_trio["chat"], llama_trio["cp"], out, **option)
    assert time.monotonic() - started < 60
    assert not os.path.exists(out)  # nothing written


FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("out_dtype", [None, "float16"])
def test_every_float_dtype_is_bit_exact(ray_local, tmp_path, out_dtype):
    """numpy does the arithmetic for BF16/F16/F32/F64 and torch for FP8, in the same run; integer
    tensors are copied from cp."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    trio = {}
    for role in ("base", "chat", "cp"):
        tensors = {f"w.{str(d).split('.')[-1]}": (torch.randn(33, 7, generator=g) * 2).to(d) for d in FLOAT_DTYPES}
        tensors["steps"] = torch.arange(10, dtype=torch.int64) + (role == "cp")
        os.makedirs(tmp_path / role)
        save_file(tensors, str(tmp_path / role / "model.safetensors"))
        trio[role] = tensors
    out = str(tmp_path / "out")
    raymerge.merge(str(tmp_path / "base"), str(tmp_path / "chat"), str(tmp_path / "cp"), out, scale=0.75,
                   dtype=out_dtype, item_size="4KiB", workers=2)
    want = {k: v if not v.is_floating_point() else
            (v.float() + 0.75 * (trio["chat"][k].float() - trio["base"][k].float())).to(
                torch.float16 if out_dtype else v.dtype)
            for k, v in trio["cp"].items()}
    assert_bit_identical(load_folder(out), want)


def test_config_names_the_output_dtype(ray_local, llama_trio, tmp_path):
    """cp's config.json says bfloat16; a float16 output's says float16 (loaders read it), the rest unchanged."""
    out = str(tmp_path / "out")
    raymerge.merge(llama_trio["base"], llama_trio["chat"], llama_trio["cp"], out, scale=0.5, dtype="float16")
    theirs = json.load(open(os.path.join(llama_trio["cp"], "config.json")))
    ours = json.load(open(os.path.join(out, "config.json")))
    key = "dtype" if "dtype" in theirs else "torch_dtype"
    assert theirs[key] == "bfloat16" and ours[key] == "float16"
    assert {k: v for k, v in ours.items() if k != key} == {k: v for k, v in theirs.items() if k != key}
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
