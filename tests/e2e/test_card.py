"""Every output's model card and recipe copy, end to end: written at commit and named by the
manifest, the copy runs the same checkpoint again, --no-card leaves both out, and a user's own
README.md at --out is never written over unasked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

import raymerge
from raymerge.commit.manifest import MANIFEST_NAME
from tests.conftest import make_llama_trio
from tests.e2e.test_sparse_merges import shard_bytes
from tests.helpers import mergekit_file


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_llama_trio(str(tmp_path_factory.mktemp("card")), roles=("base", "chat", "cp"),
                           max_shard_size="120KB", seed=5)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raymerge", *args], capture_output=True, text=True, timeout=300)


def _manifest_files(out: str) -> list[str]:
    return json.load(open(os.path.join(out, MANIFEST_NAME)))["files"]


def test_recipe_copy_runs_the_same_checkpoint_again(ray_local, models, tmp_path):
    out, again = str(tmp_path / "out"), str(tmp_path / "again")
    raymerge.merge(models["base"], models["chat"], models["cp"], out, scale=0.7, method="ties", density=[0.4])
    assert {"README.md", "raymerge_recipe.yaml"} <= set(_manifest_files(out))
    card = open(os.path.join(out, "README.md")).read()
    assert yaml.safe_load(card.split("---\n")[1])["tags"] == ["merge", "raymerge"]
    assert f"| cp | {models['cp']} | - |" in card and '- `method`: "ties"' in card
    r = _cli("run", os.path.join(out, "raymerge_recipe.yaml"), "--out", again)
    assert r.returncode == 0, r.stderr
    assert shard_bytes(again) == shard_bytes(out)


def test_mergekit_file_is_copied_as_given(ray_local, models, tmp_path):
    text = (f"merge_method: linear\nmodels:\n  - model: {models['chat']}\n    parameters: {{weight: 0.3}}\n"
            f"  - model: {models['cp']}\n    parameters: {{weight: 0.7}}\ndtype: bfloat16\n")
    out = str(tmp_path / "out")
    r = _cli("run", mergekit_file(tmp_path, text), "--out", out)
    assert r.returncode == 0, r.stderr
    assert open(os.path.join(out, "mergekit_config.yml")).read() == text
    assert not os.path.exists(os.path.join(out, "raymerge_recipe.yaml"))
    card = open(os.path.join(out, "README.md")).read()
    assert yaml.safe_load(card.split("---\n")[1])["tags"] == ["merge", "raymerge", "mergekit"]
    assert "mergekit's `linear` merge method, computed in bf16" in card
    assert {"README.md", "mergekit_config.yml"} <= set(_manifest_files(out))


def test_no_card_leaves_both_out(ray_local, models, tmp_path):
    out = str(tmp_path / "out")
    r = _cli("merge", "--base", models["base"], "--chat", models["chat"], "--cp", models["cp"], "--out", out,
             "--no-card")
    assert r.returncode == 0, r.stderr
    assert not {"README.md", "raymerge_recipe.yaml"} & set(os.listdir(out))
    assert not {"README.md", "raymerge_recipe.yaml"} & set(_manifest_files(out))


def test_users_readme_at_out_needs_overwrite(ray_local, models, tmp_path):
    """A README.md no manifest names: refused in one line (exit 2), untouched; --no-card runs
    beside it; --overwrite replaces it with the card."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    args = ("merge", "--base", models["base"], "--chat", models["chat"], "--cp", models["cp"], "--out", str(out))
    r = _cli(*args)
    assert r.returncode == 2 and "README.md, which the model card would replace" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert os.listdir(out) == ["README.md"] and (out / "README.md").read_text() == "my notes\n"
    r = _cli(*args, "--no-card")
    assert r.returncode == 0, r.stderr
    assert (out / "README.md").read_text() == "my notes\n"
    r = _cli(*args, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (out / "README.md").read_text().startswith("---\n")
