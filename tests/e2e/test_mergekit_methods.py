"""ram, ramplus_tl, sce and arcee_fusion end to end on the session's local Ray: mergekit files cut
into many 4 KiB items and S3 runs, bit for bit against the whole-tensor references of
tests.methods.test_ram, test_sce and test_arcee_fusion."""

from __future__ import annotations

import json
import os

import boto3
import pytest
import torch

from raymerge.api import run
from raymerge.config import build_recipe
from tests.conftest import make_llama_trio
from tests.helpers import assert_bit_identical, load_folder, mergekit_file
from tests.methods.test_arcee_fusion import fusion_reference
from tests.methods.test_ram import ram_reference
from tests.methods.test_sce import sce_reference

BUCKET = "ram-merges"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ram"))
    return make_llama_trio(root, roles=("base", "chat", "chat2"), max_shard_size="100KB", seed=23)


@pytest.fixture(scope="module")
def tensors(models):
    return {role: load_folder(path) for role, path in models.items()}


@pytest.fixture(scope="module")
def epsilon(tensors):
    """The median change of one tensor: elements where no model's change counts, one's, or both."""
    name = "model.layers.0.mlp.up_proj.weight"
    return float((tensors["chat"][name].float() - tensors["base"][name].float()).abs().median())


def test_ramplus_tl_file_in_bf16_with_a_float32_output(ray_local, models, tensors, epsilon, tmp_path, cli_main):
    """mergekit's boost is float32: the result is float32 (not rounded to bf16) before out_dtype."""
    path = mergekit_file(tmp_path, f"""merge_method: ramplus_tl
base_model: {models['base']}
models:
  - model: {models['chat']}
  - model: {models['chat2']}
parameters: {{epsilon: {epsilon}, r: 0.5, alpha: 0.9}}
dtype: bfloat16
out_dtype: float32
""")
    out = str(tmp_path / "ramplus")
    assert cli_main(["run", path, "--out", out, "--item-size", "4KiB", "--workers", "2"]) == 0
    want = {name: ram_reference(b, [tensors["chat"][name], tensors["chat2"][name]], epsilon, 0.5, 0.9)
            for name, b in tensors["base"].items()}
    assert all(w.dtype == torch.float32 for w in want.values())
    assert any(not torch.equal(w, w.to(torch.bfloat16).float()) for w in want.values())  # not bf16 values
    assert_bit_identical(load_folder(out), want)
    manifest = json.load(open(os.path.join(out, "raymerge_manifest.json")))
    facts = manifest["facts"]["model.layers.0.mlp.up_proj.weight"][0]
    assert min(facts["shared"]) > 0 and min(facts["unique"]) > 0
    assert cli_main(["verify", out, "--recompute", "4"]) == 0


def test_sce_file_with_a_selection(ray_local, models, tensors, tmp_path, cli_main):
    path = mergekit_file(tmp_path, f"""merge_method: sce
base_model: {models['base']}
models:
  - model: {models['chat']}
  - model: {models['chat2']}
parameters: {{select_topk: 0.3}}
dtype: bfloat16
""")
    out = str(tmp_path / "sce")
    assert cli_main(["run", path, "--out", out, "--item-size", "4KiB", "--workers", "2"]) == 0
    want = {name: sce_reference(b, [tensors["chat"][name], tensors["chat2"][name]], 0.3)
            for name, b in tensors["base"].items()}
    assert_bit_identical(load_folder(out), want)
    manifest = json.load(open(os.path.join(out, "raymerge_manifest.json")))
    assert set(manifest["facts"]["model.layers.0.mlp.up_proj.weight"][0]) >= {"k", "threshold", "w"}
    assert cli_main(["verify", out, "--recompute", "4"]) == 0


def test_arcee_fusion_file(ray_local, models, tensors, tmp_path, cli_main):
    """Rows whole in every item (the planner cuts there); the mask is float32: one rounding to bf16."""
    path = mergekit_file(tmp_path, f"""merge_method: arcee_fusion
base_model: {models['base']}
models:
  - model: {models['base']}
  - model: {models['chat']}
dtype: bfloat16
""")
    out = str(tmp_path / "fusion")
    assert cli_main(["run", path, "--out", out, "--item-size", "4KiB", "--workers", "2"]) == 0
    want = {name: fusion_reference(b, tensors["chat"][name]).to(b.dtype) for name, b in tensors["base"].items()}
    assert any(not torch.equal(w, tensors["base"][n]) for n, w in want.items())
    assert_bit_identical(load_folder(out), want)
    assert cli_main(["verify", out, "--recompute", "4"]) == 0


@pytest.fixture(scope="module")
def on_s3(s3_server, models):
    """The three checkpoints uploaded to a bucket of moto's."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    for role in ("base", "chat", "chat2"):
        for name in os.listdir(models[role]):
            s3.upload_file(os.path.join(models[role], name), BUCKET, f"{role}/{name}")
    return s3


@pytest.mark.parametrize("method", ["ram", "sce", "arcee_fusion"])
def test_on_s3(ray_local, on_s3, tensors, epsilon, method):
    s3 = on_s3
    values = {"ram": {"ram_epsilon": epsilon}, "sce": {"select_topk": 0.6}, "arcee_fusion": {}}[method]
    models = ["chat"] if method == "arcee_fusion" else ["chat", "chat2"]
    recipe, options = build_recipe(method, {"base": f"s3://{BUCKET}/base",
                                            "model": [f"s3://{BUCKET}/{m}" for m in models],
                                            "out": f"s3://{BUCKET}/{method}", "workers": 2, "item_size": "5MiB",
                                            "shard_size": "100KB", **values})
    run(recipe, options)
    got = {}
    for key in (o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{method}/")["Contents"]):
        if key.endswith(".safetensors"):
            from safetensors.torch import load

            got.update(load(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()))

    def reference(base: torch.Tensor, ms: list) -> torch.Tensor:  # raymerge's own recipes compute in float32
        if method == "ram":
            return ram_reference(base, ms, epsilon)
        return sce_reference(base, ms, 0.6) if method == "sce" else fusion_reference(base, ms[0])

    want = {name: reference(b.float(), [tensors[m][name].float() for m in models]).to(b.dtype)
            for name, b in tensors["base"].items()}
    assert_bit_identical(got, want)
