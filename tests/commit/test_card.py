"""The model card and recipe copy (commit.card), from a recipe and the plan's pinned inputs."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import yaml

from raymerge.commit.card import CARD, MERGEKIT_COPY, RECIPE_COPY, card_files, card_names
from raymerge.config import build_recipe
from raymerge.planning.build import input_roles
from raymerge.planning.plan import InputFile

SHA = "0123456789abcdef0123456789abcdef01234567"


def _front(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _merge_recipe():
    recipe, _ = build_recipe("merge", dict(base="hf://org/base", chat=["hf://org/chat@main"],
                                           cp="s3://user:secret@bucket/cp?X-Amz-Signature=abc", scale=[0.5],
                                           out="/data/out/llama-ko-chat/", method="ties", density=[0.3]))
    return recipe


def _plan(recipe) -> SimpleNamespace:
    """What the card reads of a plan: each input's pinned file URLs (a Hub input's at its commit)."""
    pinned = {"base": f"hf://org/base@{SHA}/model.safetensors", "chat": f"hf://org/chat@{SHA[::-1]}/model.safetensors",
              "cp": "s3://bucket/cp/model.safetensors"}
    return SimpleNamespace(files=[InputFile(role, url, 10, "f") for role, url in pinned.items()])


def test_card_front_matter_lists_hub_inputs_by_repo_id():
    recipe = _merge_recipe()
    files = card_files(recipe, _plan(recipe), input_roles(recipe))
    assert sorted(files) == sorted(card_names(recipe)) == sorted([CARD, RECIPE_COPY])
    card = files[CARD].decode()
    front = _front(card)
    assert front == {"base_model": ["org/base", "org/chat"], "base_model_relation": "merge",
                     "library_name": "transformers", "tags": ["merge", "raymerge"]}
    assert card.splitlines()[front_end(card) + 1] == "# llama-ko-chat"
    # Each Hub input with its pinned commit; the S3 input by its URL without credentials or query.
    assert f"| base | org/base | {SHA} |" in card and f"| chat | org/chat | {SHA[::-1]} |" in card
    assert "| cp | s3://***@bucket/cp | - |" in card
    assert "secret" not in card and "Signature" not in card and "huggingface.co" not in card
    assert '- `method`: "ties"' in card and "- `density`: [0.3]" in card


def front_end(card: str) -> int:
    return card.splitlines().index("---", 1)


def test_recipe_copy_is_the_recipe_raymerge_runs_again():
    recipe = _merge_recipe()
    copy = yaml.safe_load(card_files(recipe, _plan(recipe), input_roles(recipe))[RECIPE_COPY])
    want = recipe.to_mapping()
    want["cp"] = "s3://***@bucket/cp"
    assert copy == want
    again, _ = build_recipe(copy.pop("kind"), copy)
    assert again.method == "ties" and again.vectors == recipe.vectors and again.per_vector == recipe.per_vector


def test_mergekit_file_is_copied_as_given_and_tagged():
    text = "merge_method: slerp\nbase_model: org/base\n# ``` a comment with a fence\nmodels:\n  - model: org/chat\n"
    recipe, _ = build_recipe("slerp", dict(base="hf://org/base", model=["hf://org/chat"], t=0.5,
                                           out="./out", compute_dtype="bfloat16"))
    recipe = replace(recipe, mergekit_text=text)
    files = card_files(recipe, _plan(recipe), input_roles(recipe))
    assert sorted(files) == sorted([MERGEKIT_COPY, CARD])
    assert files[MERGEKIT_COPY] == text.encode()
    card = files[CARD].decode()
    assert _front(card)["tags"] == ["merge", "raymerge", "mergekit"]
    assert "mergekit's `slerp` merge method, computed in bf16" in card
    # The recipe is fenced by more backticks than it holds: the comment's fence cannot close it.
    assert "````yaml\n" + text.rstrip("\n") + "\n````" in card


def test_local_inputs_leave_base_model_out():
    recipe, _ = build_recipe("merge", dict(base="/m/base", chat=["/m/chat"], cp="/m/cp", out="/m/out"))
    plan = SimpleNamespace(files=[InputFile(r, f"/m/{r}/model.safetensors", 1, "f") for r in ("cp", "base", "chat")])
    front = _front(card_files(recipe, plan, input_roles(recipe))[CARD].decode())
    assert "base_model" not in front and front["tags"] == ["merge", "raymerge"]
