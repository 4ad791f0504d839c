"""Inputs on the Hugging Face Hub, through a token-protected stand-in of its HTTP API on 127.0.0.1
(tests/hub_server.py), with HF_TOKEN and HF_ENDPOINT only in the driver's environment: the local
Ray's workers were started before they were set, so they get them from the driver or not at all."""

from __future__ import annotations

import glob
import json
import os
import secrets
import subprocess
import sys

import pytest

import raymerge
from raymerge.commit.manifest import MANIFEST_NAME
from raymerge.errors import OutputError, ResolveError
from tests.conftest import make_llama_trio
from tests.helpers import assert_bit_identical, chat_vector_reference, load_folder
from tests.hub_server import HubStandIn

ROLES = ("base", "chat", "cp")
TOKEN = "hf_test_" + secrets.token_hex(12)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The stand-in serving org/base, org/chat, org/cp (~4.5 MB each, 3 shards) from `main`."""
    local = make_llama_trio(str(tmp_path_factory.mktemp("hubtrio")), hidden=256, layers=2, vocab=2048,
                            intermediate=512, max_shard_size="2MB", seed=3)
    server = HubStandIn(TOKEN).start()
    shas = {role: server.publish(f"org/{role}", folder) for role, folder in local.items()}
    server.local, server.shas = local, shas
    yield server
    server.stop()


@pytest.fixture
def driver_env(hub, monkeypatch):
    """The token and the endpoint in this process only (never in a token file)."""
    import huggingface_hub.constants

    hub.point_driver_at_it(monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", "/nonexistent/token")


def _urls() -> list[str]:
    return [f"hf://org/{role}" for role in ROLES]


def _needed(local: dict[str, str]) -> int:
    """Bytes a merge needs from the Hub: every shard whole (its header and all its tensors are
    read) and the small files beside them (index, config, tokenizer), each once."""
    return sum(os.path.getsize(p) for folder in local.values() for p in glob.glob(os.path.join(folder, "*")))


def test_merge_from_hub_with_token_only_in_driver(ray_local, hub, driver_env, tmp_path, caplog):
    @ray_local.remote
    def worker_sees() -> tuple[str | None, str | None]:
        return os.environ.get("HF_TOKEN"), os.environ.get("HF_ENDPOINT")

    assert ray_local.get(worker_sees.remote()) == (None, None)  # the cluster's nodes lack them
    caplog.set_level("DEBUG")
    out = str(tmp_path / "out")
    raymerge.merge(*_urls(), out, scale=0.5, item_size="256KiB", workers=2)

    inputs = {role: load_folder(path) for role, path in hub.local.items()}
    assert_bit_identical(load_folder(out), chat_vector_reference(inputs["base"], inputs["chat"], inputs["cp"], 0.5))
    # Exact range reads: within 1.15x of what is needed (speculative header reads are the rest).
    needed = _needed(hub.local)
    assert needed <= hub.total_served <= 1.15 * needed, (hub.total_served, needed)
    # Every file read came from the commit `main` named at resolve.
    assert all(k.split("@")[1].split("/")[0] == hub.shas[k.split("@")[0].split("/")[1]] for k in hub.served)
    manifest = json.load(open(os.path.join(out, MANIFEST_NAME)))
    for entry in manifest["inputs"]:
        sha = hub.shas[entry["role"]]
        assert entry["url"].startswith(f"hf://org/{entry['role']}@{sha}/"), entry
        assert f"version={sha};" in entry["fingerprint"], entry
    # The card names the inputs by repo id at their pinned commits, never by the endpoint's URL.
    card = open(os.path.join(out, "README.md")).read()
    assert card.split("---\n")[1].startswith("base_model:\n- org/cp\n- org/base\n- org/chat\nbase_model_relation: merge\n")
    assert all(f"| {role} | org/{role} | {hub.shas[role]} |" in card for role in ROLES)
    assert os.environ["HF_ENDPOINT"] not in card + open(os.path.join(out, "raymerge_recipe.yaml")).read()
    # The token is in no output file and in no log line (the driver's, and the local Ray's).
    for path in glob.glob(os.path.join(out, "**"), recursive=True):
        if os.path.isfile(path):
            assert TOKEN.encode() not in open(path, "rb").read(), path
    assert TOKEN not in caplog.text
    logs = ray_local._private.worker._global_node.get_logs_dir_path()
    for path in glob.glob(os.path.join(logs, "**"), recursive=True):
        if os.path.isfile(path):
            assert TOKEN.encode() not in open(path, "rb").read(), path


def test_plan_pins_every_file_to_the_commit(hub, driver_env):
    plan = raymerge.plan(*_urls(), scale=0.5)
    assert plan.files and all(f.url.startswith(f"hf://org/{f.role}@{hub.shas[f.role]}/") for f in plan.files)
    assert all(f.version == hub.shas[f.role] for f in plan.files)
    assert plan.aux_files and all(f"@{hub.shas['cp']}/" in a.source or f"@{hub.shas['chat']}/" in a.source
                                  for a in plan.aux_files)
    # An explicit revision resolves to the same commit; an unknown one is refused by name.
    pinned = raymerge.plan("hf://org/base@main", "hf://org/chat", "hf://org/cp", scale=0.5)
    assert pinned.hash == plan.hash
    with pytest.raises(ResolveError, match="revision 'nope' not found"):
        raymerge.plan("hf://org/base@nope", "hf://org/chat", "hf://org/cp", scale=0.5)


def test_moved_branch_is_a_changed_input_on_resume(ray_local, hub, driver_env, tmp_path):
    """A run planned on one commit of cp's `main`, resumed after `main` moved to another."""
    from raymerge.api import make_plan
    from raymerge.config import build_recipe
    from raymerge.execution.journal import Journal, JournalHead
    from raymerge.storage.writers import open_output

    out = str(tmp_path / "out")
    base, chat, cp = _urls()
    recipe, run_options = build_recipe("merge", dict(base=base, chat=chat, cp=cp, out=out, scale=0.5))
    plan = make_plan(recipe, run_options)
    output = open_output(out, {})
    Journal.begin(output, JournalHead.of(plan, output.prepare([(s.name, s.size) for s in plan.shards])))
    moved = make_llama_trio(str(tmp_path / "moved"), hidden=256, layers=2, vocab=2048, intermediate=512,
                            max_shard_size="2MB", seed=4, roles=("cp",))
    old = hub.shas["cp"]
    hub.publish("org/cp", moved["cp"])
    try:
        with pytest.raises(OutputError, match=r"input hf://org/cp/model-\S+ changed"):
            raymerge.merge(base, chat, cp, out, scale=0.5, resume=True)
    finally:
        hub.publish("org/cp", hub.local["cp"])  # main back where the other tests expect it
    assert hub.branches["org/cp"]["main"] == old
    staging = glob.glob(os.path.join(out, "**"), recursive=True)
    assert not any(n.endswith(MANIFEST_NAME) for n in staging)
    for path in staging:
        if os.path.isfile(path):
            assert TOKEN.encode() not in open(path, "rb").read(), path  # nor in the journal


@pytest.mark.parametrize("token", [None, "hf_wrong"])
def test_missing_or_wrong_token_names_hf_token(hub, driver_env, monkeypatch, token):
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(ResolveError, match=r"^--(base|chat|cp) hf://org/\w+: repository not found or not "
                                           r"authorized .*set HF_TOKEN \(or pass --storage-options"):
        raymerge.plan(*_urls(), scale=0.5)


def test_cli_without_token_exits_2_with_one_line(hub, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"))  # no token file there
    r = subprocess.run([sys.executable, "-m", "raymerge", "plan", "--base", "hf://org/base", "--chat",
                        "hf://org/chat", "--cp", "hf://org/cp", "--scale", "0.5"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_TOKEN" in lines[0] and "not found or not authorized" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
