"""Every option of the paper's recipe, end to end on a local Ray, bit for bit against the plain
float32 reference in tests/helpers.py."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import pytest
import torch

import raymerge
from raymerge.errors import PlanError
from tests.conftest import make_llama_trio
from tests.helpers import assert_bit_identical, load_folder, mergekit_file, weighted_reference

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base, two chat models, a cp; and a cp with 16 extra vocabulary rows."""
    root = str(tmp_path_factory.mktemp("recipes"))
    folders = make_llama_trio(root, roles=("base", "chat", "chat2", "cp"), max_shard_size="120KB", seed=3)
    folders["cpx"] = make_llama_trio(os.path.join(root, "x"), roles=("cp",), cp_extra_rows=16, seed=3)["cp"]
    with open(os.path.join(folders["chat"], "tokenizer_config.json"), "w") as f:
        json.dump({"from": "chat", "chat_template": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}",
                   "eos_token": "<|end|>"}, f)
    with open(os.path.join(folders["chat"], "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 7, "bos_token_id": 1}, f)
    return folders


@pytest.fixture(scope="module")
def tensors(models):
    return {role: load_folder(path) for role, path in models.items()}


def test_extract_then_apply_two_vectors_equals_direct_merge(ray_local, models, tensors, tmp_path):
    v1, v2 = str(tmp_path / "v1"), str(tmp_path / "v2")
    raymerge.extract(models["base"], models["chat"], v1)
    raymerge.extract(models["base"], models["chat2"], v2)
    vec1 = load_folder(v1)
    assert_bit_identical(vec1, weighted_reference(None, [(1.0, tensors["chat"], tensors["base"])]))
    assert all(t.dtype == torch.float32 for t in vec1.values())
    manifest = json.load(open(os.path.join(v1, "raymerge_manifest.json")))
    assert manifest["kind"] == "chat vector" and manifest["recipe"]["kind"] == "extract"
    assert {i["role"] for i in manifest["inputs"]} == {"base", "chat"}

    applied = str(tmp_path / "applied")
    raymerge.apply(models["cp"], [v1, v2], applied, scale=[0.5, 0.5])
    want = weighted_reference(tensors["cp"], [(0.5, vec1, None), (0.5, load_folder(v2), None)])
    assert_bit_identical(load_folder(applied), want)

    direct = str(tmp_path / "direct")
    raymerge.merge(models["base"], [models["chat"], models["chat2"]], models["cp"], direct, scale=[0.5, 0.5])
    assert_bit_identical(load_folder(direct), want)
    assert_bit_identical(load_folder(direct), weighted_reference(
        tensors["cp"], [(0.5, tensors["chat"], tensors["base"]), (0.5, tensors["chat2"], tensors["base"])]))


def test_scale_count_must_match_vector_count(models, tmp_path):
    from raymerge.errors import InputError

    with pytest.raises(InputError, match="2 --scale values for 1 --vector"):
        raymerge.apply(models["cp"], [models["chat"]], str(tmp_path / "o"), scale=[0.5, 0.5])
    with pytest.raises(InputError, match="1 --scale values for 2 --chat"):
        raymerge.merge(models["base"], [models["chat"], models["chat2"]], models["cp"], str(tmp_path / "o"), scale=[0.5])
    assert not os.path.exists(tmp_path / "o")


def test_expanded_vocabulary_overlap(ray_local, models, tensors, tmp_path):
    out = str(tmp_path / "out")
    raymerge.merge(models["base"], models["chat"], models["cpx"], out, scale=1.0)
    got = load_folder(out)
    want = weighted_reference(tensors["cpx"], [(1.0, tensors["chat"], tensors["base"])])
    assert_bit_identical(got, want)
    shared = tensors["base"][VOCAB[0]].shape[0]
    for name in VOCAB:
        assert got[name].shape[0] == shared + 16
        assert torch.equal(got[name][shared:], tensors["cpx"][name][shared:])  # new rows kept as in cp
        assert not torch.equal(got[name][:shared], tensors["cpx"][name][:shared])  # shared rows got the vector
    from transformers import LlamaForCausalLM

    _, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_larger_vocabulary_in_the_chat_model_reads_the_shared_rows(ray_local, models, tensors, tmp_path):
    """cp has fewer rows than the chat model: the output is cp's shape, and the vector is taken
    over the rows they share (the chat model's extra rows are not read)."""
    out = str(tmp_path / "out")
    raymerge.merge(models["base"], models["cpx"], models["cp"], out, scale=0.5)
    rows = tensors["cp"][VOCAB[0]].shape[0]
    chat = {n: t[:rows] if n in VOCAB else t for n, t in tensors["cpx"].items()}
    assert_bit_identical(load_folder(out), weighted_reference(tensors["cp"], [(0.5, chat, tensors["base"])]))


def test_anchorless_vocabulary_mismatch_names_the_order_that_runs(ray_local, models, tensors, tmp_path, cli_main,
                                                                   capsys):
    """linear has no anchor to keep a larger first model's extra rows: refused in one line naming
    the model to list first; in that order it runs over the shared rows."""
    def linear(first: str, second: str) -> str:
        return mergekit_file(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models[first]}\n    parameters: "
                                       f"{{weight: 0.7}}\n  - model: {models[second]}\n    parameters: {{weight: 0.6}}\n"
                                       "dtype: float32\n")
    out = str(tmp_path / "linear")
    rc, err = _cli(cli_main, capsys, "run", linear("cpx", "chat"), "--out", out, "--vocab", "overlap")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "528 rows in --model but 512 in --model[2]" in err and "list --model[2]'s model first" in err
    assert not os.path.exists(out)
    rc, err = _cli(cli_main, capsys, "run", linear("chat", "cpx"), "--out", out, "--vocab", "overlap")
    assert rc == 0, err
    rows = tensors["chat"][VOCAB[0]].shape[0]
    shared = {n: t[:rows] if n in VOCAB else t for n, t in tensors["cpx"].items()}
    assert_bit_identical(load_folder(out), _mergekit_linear(tensors["chat"], shared, 0.7, 0.6))


def test_expanded_vocabulary_skip(ray_local, models, tensors, tmp_path):
    out = str(tmp_path / "out")
    raymerge.merge(models["base"], models["chat"], models["cpx"], out, scale=0.5, vocab="skip")
    want = weighted_reference(tensors["cpx"], [(0.5, tensors["chat"], tensors["base"])], skip=lambda n: n in VOCAB)
    assert_bit_identical(load_folder(out), want)


def test_expanded_vocabulary_error_names_tensors_and_rows(models, tmp_path):
    r = subprocess.run([sys.executable, "-m", "raymerge", "merge", "--base", models["base"], "--chat", models["chat"],
                        "--cp", models["cpx"], "--out", str(tmp_path / "out"), "--vocab", "error"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    for name in VOCAB:
        assert f"{name}: 528 rows in --cp but 512 in --chat" in r.stderr
    assert not os.path.exists(tmp_path / "out")


def test_skip_regex_copies_from_cp(ray_local, models, tensors, tmp_path):
    out = str(tmp_path / "out")
    raymerge.merge(models["base"], models["chat"], models["cp"], out, scale=1.0, skip=[r"norm\.weight$", r"\.v_proj\."])
    skipped = lambda n: n.endswith("norm.weight") or ".v_proj." in n  # noqa: E731
    assert_bit_identical(load_folder(out), weighted_reference(tensors["cp"], [(1.0, tensors["chat"], tensors["base"])],
                                                              skip=skipped))
    assert any(skipped(n) for n in tensors["cp"])
    with pytest.raises(Exception, match="not a valid regular expression"):
        raymerge.merge(models["base"], models["chat"], models["cp"], str(tmp_path / "o2"), skip=["(unclosed"])


def test_special_token_rows_come_from_the_chat_model(ray_local, models, tensors, tmp_path):
    out = str(tmp_path / "out")
    raymerge.merge(models["base"], models["chat"], models["cpx"], out, scale=0.5, special_tokens="520:2,515:1")
    got = load_folder(out)
    want = weighted_reference(tensors["cpx"], [(0.5, tensors["chat"], tensors["base"])])
    for name in VOCAB:
        for cp_row, chat_row in ((520, 2), (515, 1)):
            want[name][cp_row] = tensors["chat"][name][chat_row]
            # the paper's code takes the base model's row: this would catch it
            assert not torch.equal(tensors["chat"][name][chat_row], tensors["base"][name][chat_row])
    assert_bit_identical(got, want)
    with pytest.raises(PlanError, match="rows"):
        raymerge.merge(models["base"], models["chat"], models["cpx"], str(tmp_path / "o2"), special_tokens="999:1")


def test_chat_template_and_eos_come_from_the_chat_model(ray_local, models, tmp_path):
    out = str(tmp_path / "out")
    raymerge.merge(models["base"], models["chat"], models["cp"], out)
    tok = json.load(open(os.path.join(out, "tokenizer_config.json")))
    chat_tok = json.load(open(os.path.join(models["chat"], "tokenizer_config.json")))
    assert tok["from"] == "cp" and tok["chat_template"] == chat_tok["chat_template"] and tok["eos_token"] == "<|end|>"
    assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == 7
    assert open(os.path.join(out, "config.json"), "rb").read() == open(os.path.join(models["cp"], "config.json"), "rb").read()

    kept = str(tmp_path / "kept")
    raymerge.merge(models["base"], models["chat"], models["cp"], kept, chat_template=False)
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert open(os.path.join(kept, name), "rb").read() == open(os.path.join(models["cp"], name), "rb").read()


def test_chat_template_jinja_file_is_carried(ray_local, models, tmp_path):
    import shutil

    chat = str(tmp_path / "chat")
    shutil.copytree(models["chat"], chat)
    with open(os.path.join(chat, "chat_template.jinja"), "w") as f:
        f.write("{{ messages }}")
    out = str(tmp_path / "out")
    raymerge.merge(models["base"], chat, models["cp"], out)
    assert open(os.path.join(out, "chat_template.jinja")).read() == "{{ messages }}"
    assert "chat_template" not in json.load(open(os.path.join(out, "tokenizer_config.json")))


def test_recipe_file_equals_its_flags(ray_local, models, tmp_path, cli_main, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""kind: merge
base: {models['base']}
chat: [{models['chat']}, {models['chat2']}]
scale: [0.7, 0.3]
cp: {models['cpx']}
out: {tmp_path / 'from_file'}
vocab: overlap
skip: ['norm\\.weight$']
special_tokens: "520:2"
shard_size: 200KB
""")
    rc, err = _cli(cli_main, capsys, "run", str(recipe))
    assert rc == 0, err
    raymerge.merge(models["base"], [models["chat"], models["chat2"]], models["cpx"], str(tmp_path / "from_api"),
                   scale=[0.7, 0.3], skip=[r"norm\.weight$"], special_tokens="520:2", shard_size="200KB")
    a = json.load(open(tmp_path / "from_file" / "raymerge_manifest.json"))
    b = json.load(open(tmp_path / "from_api" / "raymerge_manifest.json"))
    assert a["plan_hash"] == b["plan_hash"]
    assert {**a["recipe"], "out": None} == {**b["recipe"], "out": None}
    assert_bit_identical(load_folder(str(tmp_path / "from_file")), load_folder(str(tmp_path / "from_api")))


@pytest.mark.parametrize("text,match", [
    ("kind: merge\nbase: a\nchat: b\ncp: c\nscales: [1]\n", "unknown key 'scales' for merge; did you mean 'scale'"),
    ("kind: mix\n", "kind 'mix': must be one of merge, extract, apply"),
    ("base: a\n", "needs 'kind: merge'"),
    ("kind: merge\nbase: a\ncp: c\n", "merge needs --chat"),
    ("kind: merge\nbase: a\nchat: b\ncp: c\nvocab: maybe\n", "--vocab 'maybe': must be one of overlap, skip, error"),
    ("kind: apply\ncp: a\nvector: [b]\nscale: x\n", "--scale 'x': not a number"),
    ("kind: [oops\n", "not valid YAML"),
])
def test_bad_recipe_files_say_what_to_write(tmp_path, text, match):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    r = subprocess.run([sys.executable, "-m", "raymerge", "run", str(recipe)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_stats_and_inspect(ray_local, models, tensors, tmp_path):
    import pyarrow.parquet as pq

    out = str(tmp_path / "out")
    raymerge.merge(models["base"], models["chat"], models["cp"], out, scale=0.5, item_size="8KiB")
    rows = {r["tensor"]: r for r in pq.read_table(os.path.join(out, "raymerge_stats.parquet")).to_pylist()}
    for name in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight"):
        cp = tensors["cp"][name].float()
        delta = 0.5 * (tensors["chat"][name].float() - tensors["base"][name].float())
        assert rows[name]["anchor_norm"] == pytest.approx(float(cp.norm()), rel=1e-4)
        assert rows[name]["delta_norm"] == pytest.approx(float(delta.norm()), rel=1e-3)
        assert rows[name]["relative"] == pytest.approx(float(delta.norm() / cp.norm()), rel=1e-3)
    png = str(tmp_path / "change.png")
    r = subprocess.run([sys.executable, "-m", "raymerge", "inspect", out, "--plot", png], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "chat vector merge" in r.stdout and "mean rel" in r.stdout
    assert len([line for line in r.stdout.splitlines() if line.strip().startswith(("0 ", "1 "))]) == 2
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_scale_schedules_give_each_tensor_its_own_scale(ray_local, models, tensors, tmp_path):
    """Rules (first match wins) over a gradient default for one chat model, a gradient for the other:
    each tensor against its own scales, written out here independently of raymerge's schedule code."""
    import re

    def scales(name: str) -> tuple[float, float]:
        m = re.search(r"\.layers\.(\d+)\.", name)
        layer = int(m.group(1)) if m else None  # the trio has 2 layers: t = 0 and t = 1
        first = 0.25 if "mlp" in name else (0.0 if layer is None else [0.0, 1.0][layer])
        second = 1.0 if layer is None else [1.0, 0.5][layer]
        return first, second

    out = str(tmp_path / "scheduled")
    raymerge.merge(models["base"], [models["chat"], models["chat2"]], models["cp"], out, scale=[
        {"rules": [{"pattern": "mlp", "scale": 0.25}], "default": [0.0, 0.5, 1.0]}, [1.0, 0.5]])
    base, chat, chat2, cp = (tensors[r] for r in ("base", "chat", "chat2", "cp"))
    want = {}
    for name in cp:
        s1, s2 = scales(name)
        acc = cp[name].float()
        acc = acc + torch.tensor(s1, dtype=torch.float32) * (chat[name].float() - base[name].float())
        acc = acc + torch.tensor(s2, dtype=torch.float32) * (chat2[name].float() - base[name].float())
        want[name] = acc.to(cp[name].dtype)
    assert_bit_identical(load_folder(out), want)
    manifest = json.load(open(os.path.join(out, "raymerge_manifest.json")))
    assert manifest["recipe"]["scale"][1] == [1.0, 0.5]  # recorded as given, so verify plans it again
    r = subprocess.run([sys.executable, "-m", "raymerge", "verify", out, "--recompute", "2"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_plan_shows_each_tensors_resolved_scale(models):
    r = subprocess.run([sys.executable, "-m", "raymerge", "plan", "--base", models["base"], "--chat", models["chat"],
                        "--scale", "0.5", "--scale-rule", r"layers\.1\.=0.125", "--cp", models["cp"], "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    tensors = json.loads(r.stdout)["tensors"]
    assert {t["name"]: t["scales"] for t in tensors} == {
        t["name"]: [0.125 if ".layers.1." in t["name"] else 0.5] for t in tensors}
    r = subprocess.run([sys.executable, "-m", "raymerge", "plan", "--base", models["base"], "--chat", models["chat"],
                        "--scale", "0.5", "--scale-rule", r"layers\.1\.=0.125", "--cp", models["cp"]],
                       capture_output=True, text=True)
    assert "layer   0: 0.5\n" in r.stdout and "layer   1: 0.125\n" in r.stdout and "other    : 0.5\n" in r.stdout


def test_mergekit_task_arithmetic_runs_in_mergekits_order(ray_local, models, tensors, tmp_path, cli_main, capsys):
    """A mergekit file: the weighted deltas summed first, divided by the weights' sum, times lambda,
    then added to the base; the reference is mergekit's own sequence of torch operations."""
    path = mergekit_file(tmp_path, f"""merge_method: task_arithmetic
base_model: {models['base']}
models:
  - model: {models['base']}
  - model: {models['chat']}
    parameters: {{weight: 0.7}}
  - model: {models['chat2']}
    parameters:
      weight: [{{filter: mlp, value: 0.2}}, {{value: 0.3}}]
parameters: {{normalize: true, lambda: 0.9}}
dtype: float32
out_dtype: bfloat16
tokenizer_source: base
""")
    out = str(tmp_path / "ta")
    rc, err = _cli(cli_main, capsys, "run", path, "--out", out)
    assert rc == 0, err
    base, chat, chat2 = (tensors[k] for k in ("base", "chat", "chat2"))
    want = {}
    for name in base:
        b = base[name].float()
        deltas = torch.stack([chat[name].float() - b, chat2[name].float() - b])
        weights = torch.tensor([0.7, 0.2 if "mlp" in name else 0.3], dtype=torch.float32)
        while deltas.dim() > weights.dim():
            weights.unsqueeze_(-1)
        deltas.mul_(weights)
        mixed = deltas.sum(dim=0)
        mixed /= weights.sum(dim=0)
        mixed *= 0.9
        want[name] = (b + mixed).to(torch.bfloat16)
    assert_bit_identical(load_folder(out), want)
    manifest = json.load(open(os.path.join(out, "raymerge_manifest.json")))
    assert manifest["kind"] == "mergekit task_arithmetic" and manifest["recipe"]["lambda"] == 0.9
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        assert json.load(f) == {"from": "base"}  # tokenizer_source: base
    r = subprocess.run([sys.executable, "-m", "raymerge", "verify", out, "--recompute", "3"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr  # the recorded recipe plans the same again, in mergekit's order
    r = subprocess.run([sys.executable, "-m", "raymerge", "plan", "--recipe", path, "--json"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["methods"] == {"task_arithmetic": {"passes": ["elementwise"],
                                                    "parameters": ["scale", "normalize", "lambda"],
                                                    "given": {"normalize": True, "lambda": 0.9}}}
    assert all(t["scales"] == [0.7, 0.2 if "mlp" in t["name"] else 0.3] for t in shown["tensors"])


def test_mergekit_linear_averages_the_models(ray_local, models, tensors, tmp_path, cli_main, capsys):
    path = mergekit_file(tmp_path, f"""merge_method: linear
models:
  - model: {models['chat']}
    parameters: {{weight: 0.7}}
  - model: {models['chat2']}
    parameters: {{weight: 0.6}}
dtype: float32
""")
    out = str(tmp_path / "linear")
    rc, err = _cli(cli_main, capsys, "run", path, "--out", out)
    assert rc == 0, err
    assert_bit_identical(load_folder(out), _mergekit_linear(tensors["chat"], tensors["chat2"], 0.7, 0.6))


def _cli(cli_main, capsys, *args: str) -> tuple[int, str]:
    """`raymerge ARGS` in this process, on the session's Ray: (exit status, what it wrote to stderr)."""
    capsys.readouterr()
    rc = cli_main(list(args))
    return rc, capsys.readouterr().err


def _mergekit_linear(firsts: dict, seconds: dict, w1: float, w2: float) -> dict:
    """mergekit's linear of two models at dtype float32 (float32 out), as its torch operations run."""
    want = {}
    for name, first in firsts.items():
        weight = torch.tensor([[w1, w2]], dtype=torch.float32)  # mergekit's: a batch of one
        result = torch.zeros_like(first, dtype=torch.float32)
        for t, c in zip((first.float(), seconds[name].float()), weight.unbind(1)):
            result.addcmul_(t, c.reshape(()))  # a fused multiply-add on the CPU
        result.div_(weight.sum(dim=1).reshape(()))
        want[name] = result
    return want


@pytest.mark.parametrize("text,match", [
    ("merge_method: model_soup\nmodels: [{model: a}]\n", "merge_method 'model_soup': raymerge runs mergekit's "
                                                          "task_arithmetic, linear, ties, dare_linear, dare_ties, slerp"),
    ("merge_method: linear\nslices: []\nmodels: [{model: a}]\n", "give models .* or slices .*, one of them"),
    ("merge_method: linear\nslices: []\n", r"slices: a list of \{sources: "),
    ("merge_method: linear\ntokenizer: {source: union, pad_to_multiple_of: -64}\nmodels: [{model: a, parameters: "
     "{weight: 1}}]\n", "tokenizer.pad_to_multiple_of: a whole number of rows"),
    ("merge_method: linear\ntokenizer: {source: union, tokens: {x: {source: {kind: one}}}}\nmodels: [{model: a, "
     "parameters: {weight: 1}}]\n", r"tokenizer.tokens.\"x\".source: a model, \{kind: zero\}"),
    ("merge_method: linear\ntokenizer_source: 7\nmodels: [{model: a, parameters: {weight: 1}}]\n",
     "tokenizer_source: source: base, union or a model reference"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {densty: 0.5}}]\n", "densty.*takes weight, normalize"),
    ("merge_method: task_arithmetic\nmodels: [{model: a, parameters: {weight: 1}}]\n", "needs a base_model"),
    ("merge_method: linear\nmodels: [{model: a}]\n", r"models\[0\].parameters.weight: missing"),
    ("merge_method: linear\nparameters: {normalize: [{filter: mlp, value: true}]}\nmodels: [{model: a}]\n",
     "one value for the whole merge"),
])
def test_mergekit_files_it_cannot_map_are_refused_in_one_line(tmp_path, text, match):
    r = subprocess.run([sys.executable, "-m", "raymerge", "run", mergekit_file(tmp_path, text), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert re.search(match, r.stderr), r.stderr
    assert not (tmp_path / "o").exists()
