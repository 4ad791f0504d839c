"""Every output's model card and recipe copy, end to end: written at commit and named by the
manifest, the copy runs the same checkpoint again, --no-card leaves both out, and a user's own
README.md at --out is never written over unasked."""

from __future__ import annotations

import json
import os

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


@pytest.fixture
def cli(cli_main, capsys):
    """The CLI in this process, on the session's Ray: (exit status, stderr)."""
    def run(*args: str) -> tuple[int, str]:
        rc = cli_main(list(args))
        return rc, capsys.readouterr().err
    return run


def _manifest_files(out: str) -> list[str]:
    return json.load(open(os.path.join(out, MANIFEST_NAME)))["files"]


def test_recipe_copy_runs_the_same_checkpoint_again(ray_local, models, tmp_path, cli):
    out, again = str(tmp_path / "out"), str(tmp_path / "again")
    raymerge.merge(models["base"], models["chat"], models["cp"], out, scale=0.7, method="ties", density=[0.4])
    assert {"README.md", "raymerge_recipe.yaml"} <= set(_manifest_files(out))
    card = open(os.path.join(out, "README.md")).read()
    assert yaml.safe_load(card.split("---\n")[1])["tags"] == ["merge", "raymerge"]
    assert f"| cp | {models['cp']} | - |" in card and '- `method`: "ties"' in card
    rc, err = cli("run", os.path.join(out, "raymerge_recipe.yaml"), "--out", again)
    assert rc == 0, err
    assert shard_bytes(again) == shard_bytes(out)


def test_mergekit_file_is_copied_as_given(ray_local, models, tmp_path, cli):
    text = (f"merge_method: linear\nmodels:\n  - model: {models['chat']}\n    parameters: {{weight: 0.3}}\n"
            f"  - model: {models['cp']}\n    parameters: {{weight: 0.7}}\ndtype: bfloat16\n")
    out = str(tmp_path / "out")
    rc, err = cli("run", mergekit_file(tmp_path, text), "--out", out)
    assert rc == 0, err
    assert open(os.path.join(out, "mergekit_config.yml")).read() == text
    assert not os.path.exists(os.path.join(out, "raymerge_recipe.yaml"))
    card = open(os.path.join(out, "README.md")).read()
    assert yaml.safe_load(card.split("---\n")[1])["tags"] == ["merge", "raymerge", "mergekit"]
    assert "mergekit's `linear` merge method, computed in bf16" in card
    assert {"README.md", "mergekit_config.yml"} <= set(_manifest_files(out))


def test_no_card_leaves_both_out(ray_local, models, tmp_path, cli):
    out = str(tmp_path / "out")
    rc, err = cli("merge", "--base", models["base"], "--chat", models["chat"], "--cp", models["cp"], "--out", out,
             "--no-card")
    assert rc == 0, err
    assert not {"README.md", "raymerge_recipe.yaml"} & set(os.listdir(out))
    assert not {"README.md", "raymerge_recipe.yaml"} & set(_manifest_files(out))


def test_users_readme_at_out_needs_overwrite(ray_local, models, tmp_path, cli):
    """A README.md no manifest names: refused in one line (exit 2), untouched; --no-card runs
    beside it; --overwrite replaces it with the card."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    args = ("merge", "--base", models["base"], "--chat", models["chat"], "--cp", models["cp"], "--out", str(out))
    rc, err = cli(*args)
    assert rc == 2 and "README.md, which the model card would replace" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert os.listdir(out) == ["README.md"] and (out / "README.md").read_text() == "my notes\n"
    rc, err = cli(*args, "--no-card")
    assert rc == 0, err
    assert (out / "README.md").read_text() == "my notes\n"
    rc, err = cli(*args, "--overwrite")
    assert rc == 0, err
    assert (out / "README.md").read_text().startswith("---\n")
