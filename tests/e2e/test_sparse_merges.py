"""TIES, DARE and breadcrumbs end to end on the session's local Ray: tensors cut into many 4 KiB items, two
independent chat vectors whose signs disagree, bit for bit against the whole-tensor torch
reference in mergekit's order (tests.methods.test_sparse_methods.sparse_reference); through the
API, the command line, a mergekit file, S3, verify's recomputation and a resumed run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import boto3
import pytest
import torch

import raymerge
from raymerge.planning.passes import pass_items
from tests.conftest import make_llama_trio
from tests.helpers import assert_bit_identical, load_folder
from tests.methods.test_sparse_methods import sparse_reference

SCALES = [0.7, 0.5]
STAGING = ".raymerge-staging"
BUCKET = "sparse-merges"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base, two chat models with their own noise each (independent vectors), and a cp; sharded."""
    root = str(tmp_path_factory.mktemp("sparse"))
    return make_llama_trio(root, roles=("base", "chat", "chat2", "cp"), max_shard_size="100KB", seed=7)


@pytest.fixture(scope="module")
def tensors(models):
    return {role: load_folder(path) for role, path in models.items()}


def reference(tensors, method, densities, scales=SCALES, anchor="cp", per_vector=None, **kw):
    """Every tensor's whole-tensor reference: anchor + the two vectors chat_i - base. A density or
    scale may be a function of the tensor name (a mergekit filter); `per_vector`: other per-vector
    parameters by name (breadcrumbs' gamma, della's epsilon)."""
    def at(v, name):
        return v(name) if callable(v) else v

    want = {}
    for name, a in tensors[anchor].items():
        vectors = [(at(s, name), tensors[chat][name], tensors["base"][name],
                    {"density": at(d, name), **{k: v[i] for k, v in per_vector.items()}} if per_vector
                    else at(d, name))
                   for i, (s, chat, d) in enumerate(zip(scales, ("chat", "chat2"), densities))]
        want[name] = sparse_reference(name, a, vectors, method, **kw)
    return want


def shard_bytes(folder: str) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if n.endswith(".safetensors") or n == "model.safetensors.index.json"}


def test_inputs_exercise_the_sign_election_and_ties(tensors):
    """The inputs are what the bit-exact tests need: signs that disagree, ties at the threshold."""
    name = "model.layers.0.mlp.up_proj.weight"
    d1, d2 = (tensors[c][name].float() - tensors["base"][name].float() for c in ("chat", "chat2"))
    assert ((d1 * d2) < 0).float().mean() > 0.3
    mags = d1.abs().flatten()
    kth = torch.sort(mags, descending=True).values[int(0.3 * mags.numel()) - 1]
    assert int((mags == kth).sum()) > 1  # the 30% threshold is tied


@pytest.mark.parametrize("method,densities,options", [
    ("ties", [0.3, 0.6], {}),
    ("dare_ties", [0.5, 0.4], {"seed": 3}),
    ("dare_linear", [0.3, 0.7], {"normalize": True, "lambda": 0.9}),
    ("breadcrumbs_ties", [0.3, 0.6], {"gamma": [0.05, 0.2], "rescale": True}),
    ("della", [0.3, 0.6], {"epsilon": [0.15, 0.1], "seed": 4}),
])
def test_sparse_merge_is_bit_exact_against_the_whole_tensor_reference(ray_local, models, tensors, tmp_path, method,
                                                                      densities, options):
    out = str(tmp_path / "out")
    result = raymerge.merge(models["base"], [models["chat"], models["chat2"]], models["cp"], out, scale=SCALES,
                            method=method, density=densities, workers=2, item_size="4KiB", shard_size="100KB",
                            **options)
    got = load_folder(out)
    want = reference(tensors, method, densities, seed=options.get("seed", 0), normalize=options.get("normalize"),
                     lam=options.get("lambda", 1.0), rescale=options.get("rescale"),
                     per_vector={k: options[k] for k in ("gamma", "epsilon") if k in options})
    assert_bit_identical(got, want)
    assert result.items > 40  # tensors cut into many items
    assert any(not torch.equal(want[k], tensors["cp"][k]) for k in want)
    manifest = json.load(open(os.path.join(out, "raymerge_manifest.json")))
    assert manifest["recipe"]["method"] == method and manifest["recipe"]["density"] == densities
    facts = manifest["facts"]
    assert set(facts) == set(want)  # every tensor needed statistics (a threshold, or a norm)
    if method == "ties":
        from transformers import LlamaForCausalLM

        model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.bfloat16)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        state = model.state_dict()
        for k, v in want.items():
            assert torch.equal(state[k].view(torch.uint8), v.view(torch.uint8)), k
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_ties_output_verifies_with_recomputation(ray_local, models, tmp_path, cli_main, capsys):
    out = str(tmp_path / "ties")
    raymerge.merge(models["base"], [models["chat"], models["chat2"]], models["cp"], out, scale=SCALES,
                   method="ties", density=[0.3, 0.6], rescale=True, workers=2, item_size="4KiB", shard_size="100KB")
    capsys.readouterr()
    assert cli_main(["verify", out, "--recompute", "3"]) == 0
    assert "3 items recomputed" in capsys.readouterr().out
    # the recorded facts are what recomputation uses: another threshold gives other bytes
    path = os.path.join(out, "raymerge_manifest.json")
    manifest = json.load(open(path))
    for f in manifest["facts"].values():
        for term in f:
            if "threshold" in term:
                term["threshold"] = 0  # keep every nonzero element
    json.dump(manifest, open(path, "w"))
    assert cli_main(["verify", out, "--recompute", "20"]) == 1
    assert "differ from the bytes computed again from the inputs" in capsys.readouterr().out


@pytest.mark.parametrize("method,options", [("dare_ties", {}), ("della", {"epsilon": [0.15, 0.1]})])
def test_random_bits_depend_on_the_seed_alone(ray_local, models, tensors, tmp_path, method, options):
    """The same seed on 1 or 2 workers, with 4 KiB or 16 KiB items: the same bytes; another seed: others."""
    outs = {}
    for workers, item_size, seed in ((1, "4KiB", 11), (2, "4KiB", 11), (2, "16KiB", 11), (2, "4KiB", 12)):
        out = str(tmp_path / f"w{workers}-{item_size}-{seed}")
        raymerge.merge(models["base"], [models["chat"], models["chat2"]], models["cp"], out, scale=SCALES,
                       method=method, density=[0.4, 0.6], seed=seed, workers=workers, item_size=item_size,
                       shard_size="100KB", **options)
        outs[(workers, item_size, seed)] = shard_bytes(out)
    first = outs[(1, "4KiB", 11)]
    assert outs[(2, "4KiB", 11)] == first and outs[(2, "16KiB", 11)] == first
    other = outs[(2, "4KiB", 12)]
    assert other.keys() == first.keys() and all(other[n] != first[n] for n in first if n.endswith(".safetensors"))
    want = reference(tensors, method, [0.4, 0.6], seed=11, per_vector=options or None)
    assert_bit_identical(load_folder(str(tmp_path / "w1-4KiB-11")), want)


def test_mergekit_ties_file_runs_in_mergekits_order(ray_local, models, tensors, tmp_path, cli_main):
    """A mergekit ties file: base_model is the anchor; normalize defaults to true; a density filter."""
    path = tmp_path / "ties.yml"
    path.write_text(f"""merge_method: ties
base_model: {models['base']}
models:
  - model: {models['base']}
  - model: {models['chat']}
    parameters: {{weight: 0.8, density: 0.4}}
  - model: {models['chat2']}
    parameters:
      weight: 0.6
      density: [{{filter: mlp, value: 0.7}}, {{value: 0.25}}]
parameters: {{int8_mask: true}}
dtype: float32
out_dtype: bfloat16
""")
    out = str(tmp_path / "merged")
    assert cli_main(["run", str(path), "--out", out, "--item-size", "4KiB", "--workers", "2"]) == 0
    want = reference(tensors, "ties", [0.4, lambda n: 0.7 if "mlp" in n else 0.25], scales=[0.8, 0.6], anchor="base")
    assert_bit_identical(load_folder(out), want)
    manifest = json.load(open(os.path.join(out, "raymerge_manifest.json")))
    assert manifest["kind"] == "mergekit ties"
    without_normalize = reference(tensors, "ties", [0.4, lambda n: 0.7 if "mlp" in n else 0.25], scales=[0.8, 0.6],
                                  anchor="base", normalize=False)
    assert any(not torch.equal(want[k], without_normalize[k]) for k in want)  # normalize was on


def test_plan_shows_the_passes_and_densities(models, cli_main, capsys):
    assert cli_main(["plan", "--base", models["base"], "--chat", models["chat"], "--chat", models["chat2"],
                     "--cp", models["cp"], "--method", "ties", "--density", "0.3", "--density", "0.6",
                     "--item-size", "4KiB", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in shown["passes"]] == ["magnitude-high", "magnitude-low", "elementwise"]
    assert all(p["items"] > 40 and p["read_bytes"] > 0 for p in shown["passes"])
    high, low, elementwise = shown["passes"]
    assert high["items"] == low["items"] == elementwise["items"]  # every tensor is sparsified
    assert high["read_bytes"] == low["read_bytes"] < elementwise["read_bytes"]  # the vectors, not the anchor
    assert "BF16" in low["only"] and not high["only"]  # in BF16 the high pass settles the threshold
    assert all(t["vector_parameters"] == [{"density": 0.3}, {"density": 0.6}]
               and t["passes"] == ["magnitude-high", "magnitude-low", "elementwise"]
               for t in shown["tensors"])


def test_ties_and_dare_merges_on_s3(ray_local, s3_server, models, tensors, tmp_path):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    for role in ("base", "chat", "chat2", "cp"):
        for name in os.listdir(models[role]):
            s3.upload_file(os.path.join(models[role], name), BUCKET, f"{role}/{name}")
    url = {role: f"s3://{BUCKET}/{role}" for role in ("base", "chat", "chat2", "cp")}
    gammas = [0.02, 0.1]
    for method in ("ties", "dare_linear", "dare_ties", "breadcrumbs", "della_linear"):  # rescaled: an l1-norm pass
        options = {"gamma": gammas} if method == "breadcrumbs" else {"epsilon": [0.1, 0.1]} if method == "della_linear" \
            else {}
        raymerge.merge(url["base"], [url["chat"], url["chat2"]], url["cp"], f"s3://{BUCKET}/{method}", scale=SCALES,
                       method=method, density=[0.3, 0.6], workers=2, shard_size="100KB", **options)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{method}/")["Contents"]]
        dest = tmp_path / method
        dest.mkdir()
        for key in keys:
            s3.download_file(BUCKET, key, str(dest / key.rsplit("/", 1)[1]))
        assert "raymerge_manifest.json" in os.listdir(dest)
        assert_bit_identical(load_folder(str(dest)), reference(tensors, method, [0.3, 0.6], per_vector=options))
    assert not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")


def _journal(out: str) -> dict[str, set[int]]:
    """The statistics passes' items a journal holds, by pass."""
    folder = os.path.join(out, STAGING)
    done: dict[str, set[int]] = {}
    for n in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        if re.fullmatch(r"journal-\d{6,9}\.json", n):
            with contextlib.suppress(ValueError):  # not expected (batches are written whole), but harmless
                for p in json.load(open(os.path.join(folder, n)))["passes"]:
                    done.setdefault(p["pass"], set()).add(p["id"])
    return done


@pytest.mark.parametrize("method,gammas", [("ties", None), ("breadcrumbs_ties", [0.05, 0.1])])
def test_resumed_after_the_driver_is_killed_between_passes(ray_local, models, tensors, tmp_path, cli_main, capsys,
                                                           method, gammas):
    """Breadcrumbs' two selections journal their facts (top_k ...) as TIES's one does."""
    out = str(tmp_path / "out")
    extra = [a for g in gammas for a in ("--gamma", str(g))] if gammas else []
    args = ["merge", "--base", models["base"], "--chat", models["chat"], "--chat", models["chat2"], "--cp",
            models["cp"], "--out", out, "--method", method, "--density", "0.3", "--density", "0.6", "--scale", "0.7",
            "--scale", "0.5", "--rescale", "--lambda", "0.9", "--item-size", "4KiB", "--shard-size", "100KB",
            "--workers", "2", "-v", *extra]
    plan = raymerge.plan(models["base"], [models["chat"], models["chat2"]], models["cp"], out=out, scale=SCALES,
                         method=method, density=[0.3, 0.6], rescale=True, item_size="4KiB", shard_size="100KB",
                         **{"lambda": 0.9}, **({"gamma": gammas} if gammas else {}))
    total = {name: set(pass_items(plan, name)) for name in ("magnitude-high", "magnitude-low", "l1-norm")}
    # A driver of its own joins the session's Ray; its workers are slowed so that it can be killed
    # once the first pass is journaled whole.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "RAYMERGE_TEST_ITEM_DELAY": "0.1"}
    stderr = open(tmp_path / "killed.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "raymerge", *args], stdout=subprocess.DEVNULL, stderr=stderr,
                            env=env)
    try:
        deadline = time.monotonic() + 120
        while _journal(out).get("magnitude-high", set()) != total["magnitude-high"] and proc.poll() is None:
            assert time.monotonic() < deadline, "the first pass was not journaled in time"
            time.sleep(0.05)
        assert proc.poll() is None, open(tmp_path / "killed.log").read()[-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stderr.close()
    journaled = _journal(out)
    assert journaled.get("l1-norm", set()) != total["l1-norm"], "killed too late: the last pass was done"
    assert not [n for n in os.listdir(out) if n.endswith(".safetensors")]

    capsys.readouterr()
    assert cli_main([*args, "--resume"]) == 0
    log = capsys.readouterr().err
    assert "magnitude-high:" not in log  # journaled whole: not run again
    for name in ("magnitude-low", "l1-norm"):
        left = len(total[name] - journaled.get(name, set()))
        if left:
            assert f"{name}: 2 workers, {left} items to do" in log, log
        else:
            assert f"{name}:" not in log, log
    assert f"execute: 2 workers, {len(plan.items)} items to do" in log, log
    want = reference(tensors, method, [0.3, 0.6], rescale=True, lam=0.9, normalize=method == "ties",
                     per_vector={"gamma": gammas} if gammas else None)
    assert_bit_identical(load_folder(out), want)
    assert not os.path.exists(os.path.join(out, STAGING))


@pytest.mark.parametrize("extra,match", [
    (["--density", "0.5"], "--density: merge with method sum takes no density"),
    (["--rescale"], "--rescale: merge with method sum takes no rescale"),
    (["--method", "ties", "--density", "1.5"], "density is a fraction, from 0 to 1"),
    (["--method", "ties", "--density", "-0.1"], "from 0 to 1"),
    (["--method", "ties", "--density", "0.5", "--density", "0.5"], "2 --density values for 1 --chat inputs"),
    (["--method", "dare_ties", "--seed", "-1"], "--seed -1: must be an integer >= 0"),
    (["--method", "della", "--density", "0.3", "--epsilon", "0.3"], "give an epsilon below 0.3"),
])
def test_bad_sparse_options_exit_2_with_one_line(models, tmp_path, cli_main, capsys, extra, match):
    out = str(tmp_path / "out")
    code = cli_main(["merge", "--base", models["base"], "--chat", models["chat"], "--cp", models["cp"], "--out", out,
                     *extra])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err
    assert not os.path.exists(out)
