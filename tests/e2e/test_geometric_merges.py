"""The geometric and elementwise mergekit methods end to end on the session's local Ray: mergekit
files (gradients and filters included) cut into many 4 KiB items, local and on S3, bit for bit
against the whole-tensor references of tests.methods.test_geometric."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import boto3
import pytest

from raymerge.api import run
from raymerge.config import build_recipe
from raymerge.planning.schedule import Scale
from tests.conftest import make_llama_trio
from tests.e2e.test_sparse_merges import _journal
from tests.helpers import assert_bit_identical, load_folder, mergekit_file
from tests.methods.test_geometric import slerp_reference

BUCKET = "geometric-merges"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("geometric"))
    return make_llama_trio(root, roles=("base", "chat", "chat2", "cp"), max_shard_size="100KB", seed=13)


@pytest.fixture(scope="module")
def tensors(models):
    return {role: load_folder(path) for role, path in models.items()}


def test_slerp_with_gradients_by_filter(ray_local, models, tensors, tmp_path, cli_main):
    path = mergekit_file(tmp_path, f"""merge_method: slerp
base_model: {models['cp']}
models:
  - model: {models['cp']}
  - model: {models['chat']}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.35
dtype: bfloat16
""")
    out = str(tmp_path / "slerp")
    assert cli_main(["run", path, "--out", out, "--item-size", "4KiB", "--workers", "2"]) == 0
    layers = 2

    def t_of(name: str) -> float:
        g = (0, 0.5, 0.3, 0.7, 1) if "self_attn" in name else (1, 0.5, 0.7, 0.3, 0) if "mlp" in name else 0.35
        return Scale(g).at(name, layers)

    want = {name: slerp_reference(v0, tensors["chat"][name], t_of(name)) for name, v0 in tensors["cp"].items()}
    assert_bit_identical(load_folder(out), want)
    manifest = json.load(open(os.path.join(out, "raymerge_manifest.json")))
    assert manifest["kind"] == "mergekit slerp" and manifest["recipe"]["compute_dtype"] == "BF16"
    assert cli_main(["verify", out, "--recompute", "4"]) == 0


def test_slerp_on_s3(ray_local, s3_server, models, tensors):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    for role in ("base", "chat"):
        for name in os.listdir(models[role]):
            s3.upload_file(os.path.join(models[role], name), BUCKET, f"{role}/{name}")
    recipe, options = build_recipe("slerp", {"base": f"s3://{BUCKET}/base", "model": [f"s3://{BUCKET}/chat"],
                                             "t": [0.6], "out": f"s3://{BUCKET}/slerp", "workers": 2,
                                             "item_size": "5MiB", "shard_size": "100KB"})
    run(recipe, options)
    got = {}
    for key in (o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="slerp/")["Contents"]):
        if key.endswith(".safetensors"):
            from safetensors.torch import load

            got.update(load(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()))
    want = {name: slerp_reference(v0, tensors["chat"][name], 0.6) for name, v0 in tensors["base"].items()}
    assert_bit_identical(got, want)


def test_nearswap_and_passthrough_files(ray_local, models, tensors, tmp_path, cli_main):
    from tests.methods.test_elementwise import nearswap_reference

    path = mergekit_file(tmp_path, f"""merge_method: nearswap
base_model: {models['base']}
models:
  - model: {models['base']}
  - model: {models['chat']}
parameters: {{t: 0.004}}
dtype: bfloat16
""")
    out = str(tmp_path / "nearswap")
    assert cli_main(["run", path, "--out", out, "--item-size", "4KiB", "--workers", "2"]) == 0
    want = {name: nearswap_reference(b, tensors["chat"][name], 0.004) for name, b in tensors["base"].items()}
    assert_bit_identical(load_folder(out), want)

    path = mergekit_file(tmp_path, f"""merge_method: passthrough
models:
  - model: {models['chat2']}
    parameters: {{scale: 0.8}}
dtype: float16
out_dtype: bfloat16
""")
    out = str(tmp_path / "passthrough")
    assert cli_main(["run", path, "--out", out, "--item-size", "4KiB", "--workers", "2"]) == 0
    want = {name: (m.half() * 0.8).to(m.dtype) for name, m in tensors["chat2"].items()}
    assert_bit_identical(load_folder(out), want)


def test_nuslerp_with_and_without_a_base(ray_local, models, tensors, tmp_path, cli_main):
    from tests.methods.test_geometric import nuslerp_reference

    for base, flatten in ((True, True), (False, False)):
        path = mergekit_file(tmp_path, f"""merge_method: nuslerp
{f"base_model: {models['base']}" if base else ""}
models:
  - model: {models['chat']}
    parameters: {{weight: 0.7}}
  - model: {models['chat2']}
    parameters: {{weight: 0.4}}
parameters: {{nuslerp_flatten: {str(flatten).lower()}}}
dtype: bfloat16
""")
        out = str(tmp_path / f"nuslerp-{base}")
        assert cli_main(["run", path, "--out", out, "--item-size", "4KiB", "--workers", "2"]) == 0
        want = {name: nuslerp_reference(m0, tensors["chat2"][name], tensors["base"][name] if base else None, 0.7, 0.4,
                                        flatten) for name, m0 in tensors["chat"].items()}
        assert_bit_identical(load_folder(out), want)


def test_model_stock_file(ray_local, models, tensors, tmp_path, cli_main):
    from tests.methods.test_geometric import model_stock_reference

    path = mergekit_file(tmp_path, f"""merge_method: model_stock
base_model: {models['base']}
models:
  - model: {models['chat']}
  - model: {models['chat2']}
  - model: {models['cp']}
parameters: {{filter_wise: true}}
dtype: bfloat16
""")
    out = str(tmp_path / "model_stock")
    assert cli_main(["run", path, "--out", out, "--item-size", "4KiB", "--workers", "2"]) == 0
    want = {name: model_stock_reference(b, [tensors[r][name] for r in ("chat", "chat2", "cp")], True)
            for name, b in tensors["base"].items()}
    assert_bit_identical(load_folder(out), want)


def test_multislerp_file_verifies_with_recomputation(ray_local, models, tensors, tmp_path, cli_main):
    from tests.methods.test_geometric import multislerp_reference

    path = mergekit_file(tmp_path, f"""merge_method: multislerp
base_model: {models['base']}
models:
  - model: {models['chat']}
    parameters: {{weight: 0.5}}
  - model: {models['chat2']}
    parameters: {{weight: 0.3}}
  - model: {models['cp']}
    parameters: {{weight: 0.4}}
dtype: bfloat16
""")
    out = str(tmp_path / "multislerp")
    assert cli_main(["run", path, "--out", out, "--item-size", "4KiB", "--workers", "2"]) == 0
    want = {name: multislerp_reference([tensors[r][name] for r in ("chat", "chat2", "cp")], b, [0.5, 0.3, 0.4])
            for name, b in tensors["base"].items()}
    assert_bit_identical(load_folder(out), want)
    assert cli_main(["verify", out, "--recompute", "4"]) == 0  # the recorded facts read back and recompute


def _karcher_file(tmp_path, models, max_iter: int) -> str:
    """mergekit's test's karcher: the base model joins the two models (every one weighs 1/3, the
    weights the file gives change nothing, as in mergekit)."""
    return mergekit_file(tmp_path, f"""merge_method: karcher
base_model: {models['base']}
models:
  - model: {models['chat']}
    parameters: {{weight: 0.6}}
  - model: {models['chat2']}
    parameters: {{weight: 0.4}}
parameters: {{max_iter: {max_iter}, tol: 1.0e-5}}
dtype: bfloat16
""")


def _karcher_want(tensors, max_iter: int) -> dict:
    from tests.methods.test_karcher import karcher_reference

    return {name: karcher_reference([tensors[r][name] for r in ("chat", "chat2", "base")], max_iter)
            for name in tensors["base"]}


def test_karcher_file_verifies_with_recomputation(ray_local, models, tensors, tmp_path, cli_main):
    out = str(tmp_path / "karcher")
    assert cli_main(["run", _karcher_file(tmp_path, models, 3), "--out", out, "--item-size", "4KiB",
                     "--workers", "2"]) == 0
    assert_bit_identical(load_folder(out), _karcher_want(tensors, 3))
    manifest = json.load(open(os.path.join(out, "raymerge_manifest.json")))
    assert manifest["recipe"]["model"][-1] == models["base"] and manifest["recipe"]["max_iter"] == 3
    assert cli_main(["verify", out, "--recompute", "4"]) == 0


def test_karcher_kept_means_lost_between_passes_are_computed_again(ray_local, models, tensors, tmp_path, cli_main,
                                                                  monkeypatch, capsys):
    """What each pass keeps rides in Ray's object store from one pass of an item to its next: here
    what the first passes kept is swapped for objects whose owner has died (as a lost node loses
    them), so the items of the next passes fail to get them and run again, computing the mean anew;
    the bits are the reference's. Another run keeps nothing at all (no room in the object store):
    the same bits."""
    from raymerge.execution import kept

    @ray_local.remote(num_cpus=0)
    class Owner:
        def put(self) -> list:
            return [ray_local.put({})]

    owner = Owner.remote()
    [dead] = ray_local.get(owner.put.remote())
    ray_local.kill(owner)
    with pytest.raises(ray_local.exceptions.RayActorError):  # the kill is asynchronous: wait for it
        for _ in range(200):
            ray_local.get(owner.put.remote())
            time.sleep(0.05)
    lost = []
    finished = kept.KeptValues.finished

    def finish_and_lose(self, item, names=(), spent=()):
        finished(self, item, names, spent)
        if len(lost) < 20 and self._refs.get(item):
            lost.append(item)
            self._refs[item] = [(dead, live) for _, live in self._refs[item]]

    monkeypatch.setattr(kept.KeptValues, "finished", finish_and_lose)
    out = str(tmp_path / "lost")
    args = ["run", _karcher_file(tmp_path, models, 2), "--item-size", "4KiB", "--workers", "2"]
    capsys.readouterr()
    assert cli_main([*args, "--out", out, "-v"]) == 0
    log = capsys.readouterr().err
    assert lost and "lost what an earlier pass kept (RayTaskError(OwnerDiedError))" in log, log
    assert "Unhandled error" not in log  # each failed pass's kept object was looked at
    want = _karcher_want(tensors, 2)
    assert_bit_identical(load_folder(out), want)
    monkeypatch.setattr(kept.KeptValues, "finished", finished)
    monkeypatch.setattr(kept, "BUDGET_SHARE", 0.0)
    assert cli_main([*args, "--out", str(tmp_path / "recomputed"), "-v"]) == 0
    assert "each pass computes them again" in capsys.readouterr().err
    assert_bit_identical(load_folder(str(tmp_path / "recomputed")), want)


def test_karcher_resumed_after_the_driver_is_killed_between_iterations(ray_local, models, tensors, tmp_path,
                                                                       cli_main, capsys):
    """Killed once the first iteration's dots are journaled: the resumed run does not run the
    passes journaled whole again, and gives the same bits."""
    path = _karcher_file(tmp_path, models, 2)
    out = str(tmp_path / "out")
    args = ["run", path, "--out", out, "--item-size", "4KiB", "--workers", "2", "-v"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "RAYMERGE_TEST_ITEM_DELAY": "0.05"}
    proc = subprocess.Popen([sys.executable, "-m", "raymerge", *args], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "killed.log", "w"), env=env)
    first = "karcher-dots-1"
    try:
        deadline = time.monotonic() + 180
        while first not in _journal(out) and proc.poll() is None:
            assert time.monotonic() < deadline, "the first iteration was not journaled in time"
            time.sleep(0.05)
        time.sleep(0.3)  # a few items of the next passes, maybe
        assert proc.poll() is None, open(tmp_path / "killed.log").read()[-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    journaled = _journal(out)
    assert "karcher-unit-2" not in journaled and not [n for n in os.listdir(out) if n.endswith(".safetensors")]
    capsys.readouterr()
    assert cli_main([*args, "--resume"]) == 0
    log = capsys.readouterr().err
    for name in ("karcher-norms", "karcher-mean"):
        assert f"{name}:" not in log, log  # journaled whole before the kill: not run again
    assert "karcher-unit-2: 2 workers" in log, log
    assert_bit_identical(load_folder(out), _karcher_want(tensors, 2))
