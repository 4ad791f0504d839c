"""mergekit's compute dtype end to end on the session's local Ray: mergekit files whose `dtype` is
bfloat16 or float16 run on float32 checkpoints (the worker casts every input to the dtype, the
method rounds each operation to it, the result is cast to out_dtype), bit for bit against mergekit's
sequence of torch operations (tests.methods.test_sparse_methods.gta_reference); `--compute-dtype
float32` runs the same file in float32 with one rounding; the manifest and the plan say which."""

from __future__ import annotations

import json
import os

import pytest
import torch

from raymerge.api import describe, make_plan
from raymerge.config import load_recipe_file
from tests.conftest import make_llama_trio
from tests.helpers import assert_bit_identical, load_folder
from tests.methods.test_sparse_methods import gta_reference, sparse_reference


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("compute"))
    return make_llama_trio(root, roles=("base", "chat", "chat2"), max_shard_size="100KB", seed=5, dtype="float32")


@pytest.fixture(scope="module")
def tensors(models):
    return {role: load_folder(path) for role, path in models.items()}


def _file(tmp_path, models, method: str, params: str, dtype: str, out_dtype: str) -> str:
    path = tmp_path / f"{method}.yml"
    path.write_text(f"""merge_method: {method}
base_model: {models['base']}
models:
  - model: {models['chat']}
    parameters: {{weight: 0.7, {params}}}
  - model: {models['chat2']}
    parameters: {{weight: 0.45, {params}}}
parameters: {{normalize: true, lambda: 0.9}}
dtype: {dtype}
out_dtype: {out_dtype}
""")
    return str(path)


def _run(main, path: str, out: str, *flags: str) -> dict:
    assert main(["run", path, "--out", out, "--item-size", "4KiB", "--workers", "2", *flags]) == 0
    return json.load(open(os.path.join(out, "raymerge_manifest.json")))


def test_a_bfloat16_file_on_float32_inputs_gives_mergekits_bits(ray_local, models, tensors, tmp_path, cli_main):
    path = _file(tmp_path, models, "task_arithmetic", "", "bfloat16", "float32")
    out = str(tmp_path / "bf16")
    manifest = _run(cli_main, path, out)
    assert manifest["recipe"]["compute_dtype"] == "BF16"
    want = {}
    for name, b in tensors["base"].items():
        vectors = [(w, tensors[c][name].to(torch.bfloat16), b.to(torch.bfloat16), 1.0)
                   for w, c in ((0.7, "chat"), (0.45, "chat2"))]
        want[name] = gta_reference(name, b.to(torch.bfloat16), vectors, "task_arithmetic", normalize=True,
                                        lam=0.9).to(torch.float32)
    assert_bit_identical(load_folder(out), want)
    assert cli_main(["verify", out, "--recompute", "3"]) == 0  # the recorded recipe computes at bfloat16 again

    single = str(tmp_path / "f32")
    manifest = _run(cli_main, path, single, "--compute-dtype", "float32")
    assert manifest["recipe"]["compute_dtype"] == "F32"
    once = {}
    for name, b in tensors["base"].items():
        vectors = [(w, tensors[c][name], b, 1.0) for w, c in ((0.7, "chat"), (0.45, "chat2"))]
        once[name] = sparse_reference(name, b, vectors, "dare_linear", normalize=True, rescale=False, lam=0.9)
    assert_bit_identical(load_folder(single), once)
    assert any(not torch.equal(want[k], once[k]) for k in want)


def test_ties_at_float16_with_rescale(ray_local, models, tensors, tmp_path, cli_main):
    path = _file(tmp_path, models, "ties", "density: 0.4", "float16", "bfloat16")
    path_text = open(path).read().replace("normalize: true, lambda: 0.9", "rescale: true, lambda: 0.9")
    open(path, "w").write(path_text)
    out = str(tmp_path / "ties")
    manifest = _run(cli_main, path, out)
    assert manifest["recipe"]["compute_dtype"] == "F16"
    want = {}
    for name, b in tensors["base"].items():
        vectors = [(w, tensors[c][name].half(), b.half(), 0.4) for w, c in ((0.7, "chat"), (0.45, "chat2"))]
        want[name] = gta_reference(name, b.half(), vectors, "ties", normalize=True, rescale=True,
                                        lam=0.9).to(torch.bfloat16)
    assert_bit_identical(load_folder(out), want)


def test_without_dtype_each_tensor_computes_at_its_inputs_dtype(models, llama_trio, tmp_path):
    for folders, expected in ((llama_trio, "BF16"), (models, "F32")):  # bf16 checkpoints; float32 ones
        path = tmp_path / "noddtype.yml"
        path.write_text(f"""merge_method: task_arithmetic
base_model: {folders['base']}
models:
  - model: {folders['chat']}
    parameters: {{weight: 0.5}}
""")
        recipe, options = load_recipe_file(str(path))
        assert recipe.compute_dtype == "inputs"
        shown = describe(make_plan(recipe, options))
        assert {t["compute_dtype"] for t in shown["tensors"]} == {expected}
