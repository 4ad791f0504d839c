"""mergekit configurations mapped onto raymerge recipes: anchor, vectors, schedules, references."""

from __future__ import annotations

from raymerge.config import build_recipe
from raymerge.mergekit_recipe import recipe_values
from raymerge.planning.schedule import Scale


def test_task_arithmetic_maps_base_to_the_anchor_and_the_others_to_vectors():
    kind, values = recipe_values({
        "merge_method": "task_arithmetic", "base_model": "/m/base/",
        "models": [{"model": "/m/base", "parameters": {"weight": 0.9}},  # the base itself: no change, no weight
                   {"model": "org/chat", "parameters": {"weight": [{"filter": "mlp.up", "value": 0.2},
                                                                   {"value": [0.0, 1.0]}]}},
                   {"model": "s3://b/math"}],
        "parameters": {"weight": 0.5, "lambda": 0.8}, "dtype": "float32", "out_dtype": "bfloat16",
        "tokenizer_source": "base"}, "mk.yml")
    recipe, _ = build_recipe(kind, {**values, "out": "/m/out"})
    assert (recipe.kind, recipe.base, recipe.dtype, recipe.params) == ("task_arithmetic", "/m/base/", "BF16",
                                                                       (("lambda", 0.8),))
    assert recipe.vectors == (("hf://org/chat", Scale((0.0, 1.0), ((r"mlp\.up", 0.2),))), ("s3://b/math", Scale(0.5)))
    assert recipe.vocab == "error"  # mergekit needs the same shapes: no vocabulary overlap rules
