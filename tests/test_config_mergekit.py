"""mergekit configurations mapped onto raymerge recipes: anchor, vectors, schedules, references."""

from __future__ import annotations

import pytest

from raymerge.config import build_recipe
from raymerge.errors import InputError
from raymerge.config.mergekit import recipe_values
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
    assert recipe.vectors == (("hf://org/chat", Scale((0.0, 1.0), (("contains", "mlp.up", 0.2),))),
                              ("s3://b/math", Scale(0.5)))
    assert recipe.vocab == "error"  # mergekit needs the same shapes: no vocabulary overlap rules


def test_ties_and_dare_map_weight_and_density_per_model_and_the_shared_parameters():
    kind, values = recipe_values({
        "merge_method": "dare_ties", "base_model": "/m/base",
        "models": [{"model": "/m/chat", "parameters": {"weight": 0.7, "density": 0.3}},
                   {"model": "/m/math", "parameters": {"weight": 0.5,
                                                       "density": [{"filter": "mlp", "value": 0.2}, {"value": [0.4, 0.8]}]}},
                   {"model": "/m/code", "parameters": {"weight": 0.2}}],  # no density: mergekit keeps everything
        "parameters": {"rescale": False, "normalize": True, "lambda": 0.9, "int8_mask": True}}, "mk.yml")
    recipe, _ = build_recipe(kind, {**values, "out": "/m/out", "seed": 5})
    assert (recipe.kind, recipe.method_name, recipe.base) == ("dare_ties", "dare_ties", "/m/base")
    assert dict(recipe.per_vector)["density"] == (Scale(0.3), Scale((0.4, 0.8), (("contains", "mlp", 0.2),)), Scale(1.0))
    assert dict(recipe.params) == {"normalize": True, "rescale": False, "lambda": 0.9, "seed": 5}
    assert [u for u, _ in recipe.vectors] == ["/m/chat", "/m/math", "/m/code"]


def test_a_dare_recipe_records_its_seed_even_when_none_is_given():
    kind, values = recipe_values({"merge_method": "dare_linear", "base_model": "/m/base",
                                  "models": [{"model": "/m/chat", "parameters": {"weight": 1.0, "density": 0.5}}]},
                                 "mk.yml")
    recipe, _ = build_recipe(kind, {**values, "out": "/m/out"})
    assert dict(recipe.params)["seed"] == 0
    assert recipe.to_mapping()["seed"] == 0


def test_what_the_sparse_methods_cannot_map_is_refused_in_one_line():
    import pytest

    from raymerge.errors import InputError

    base = {"base_model": "/m/base", "models": [{"model": "/m/chat", "parameters": {"weight": 1.0}}]}
    for bad, words in (({"merge_method": "model_soup"}, "model_soup"),
                       ({"merge_method": "ties", "parameters": {"normalize": [0.1]}}, "one value"),
                       ({"merge_method": "ties", "parameters": {"gama": 0.1}}, "gama"),
                       ({"merge_method": "ties", "parameters": {"density": 1.5}}, "from 0 to 1")):
        with pytest.raises(InputError, match=words) as e:
            kind, values = recipe_values({**base, **bad}, "mk.yml")
            build_recipe(kind, {**values, "out": "/m/out"}, where="mk.yml")
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="ties needs a base_model"):
        recipe_values({"merge_method": "ties", "models": base["models"]}, "mk.yml")


def _one_model(weight):
    return {"merge_method": "task_arithmetic", "base_model": "/m/base",
            "models": [{"model": "/m/chat", "parameters": {"weight": weight}}]}


def test_mergekit_filters_are_substrings_never_regexes():
    import string

    punctuation = "a" + string.punctuation + " \u00e9\u4e2d\t"
    kind, values = recipe_values(_one_model([{"filter": "mlp.(up", "value": 0.2}, {"filter": "layers.1.", "value": 0.3},
                                             {"filter": "a.b", "value": 0.4}, {"filter": punctuation, "value": 0.6},
                                             {"value": 0.5}]), "mk.yml")
    recipe, _ = build_recipe(kind, {**values, "out": "/m/out"})
    scale = recipe.vectors[0][1]
    assert scale == Scale(0.5, (("contains", "mlp.(up", 0.2), ("contains", "layers.1.", 0.3), ("contains", "a.b", 0.4),
                                ("contains", punctuation, 0.6)))
    assert [scale.at(n, 1) for n in ("m.mlp.(up.w", "m.mlpx(up.w", "model.layers.1.attn", "model.layers.10.attn",
                                     "axb", "x.a.b", f"x{punctuation}x")] == [0.2, 0.5, 0.3, 0.5, 0.5, 0.4, 0.6]
    again, _ = build_recipe(kind, {k: v for k, v in recipe.to_mapping().items() if k != "kind"})
    assert again == recipe  # what the manifest records plans the same again (raymerge verify --recompute)


@pytest.mark.parametrize("config,key", [
    (_one_model({"rules": [{"pattern": "mlp", "scale": 0.2}], "default": 1.0}), r"models\[0\]\.parameters\.weight"),
    ({**_one_model(0.5), "parameters": {"weight": {"default": 0.3}}}, r"parameters\.weight"),
    ({**_one_model(0.5), "merge_method": "ties", "parameters": {"density": {"rules": []}}}, r"parameters\.density"),
    (_one_model([{"filter": "mlp", "value": {"rules": []}}]), r"models\[0\]\.parameters\.weight: value"),
])
def test_raymerge_schedules_in_a_mergekit_file_are_refused_naming_the_key(config, key):
    with pytest.raises(InputError, match=rf"^mk.yml: {key}: a mapping \(keys \[.*\]\) is raymerge's own syntax; in a "
                                         r"mergekit file write a number, a gradient \(a list of numbers\) or a list of "
                                         r"\{filter: SUBSTRING, value: X\}$"):
        recipe_values(config, "mk.yml")


@pytest.mark.parametrize("config,match", [
    ({"merge_method": "slerp", "base_model": "/a", "models": [{"model": "/a"}, {"model": "/b"}]},
     r"models\[1\].parameters.t: missing; mergekit's slerp needs a t"),
    ({"merge_method": "slerp", "base_model": "/a", "parameters": {"t": 0.5},
      "models": [{"model": "/b"}, {"model": "/c"}]}, "slerp takes exactly 1 --model input .*got 2"),
    ({"merge_method": "nuslerp", "models": [{"model": "/b", "parameters": {"weight": 1}}]},
     "nuslerp takes exactly 2 --model inputs .*got 1"),
    ({"merge_method": "model_stock", "base_model": "/a", "models": [{"model": "/b"}]},
     "model_stock takes at least 2 --model inputs"),
    ({"merge_method": "nuslerp", "parameters": {"nuslerp_row_wise": True, "nuslerp_flatten": False},
      "models": [{"model": "/b", "parameters": {"weight": 1}}, {"model": "/c", "parameters": {"weight": 1}}]},
     "nuslerp_row_wise: true .* is not supported"),
    ({"merge_method": "karcher", "parameters": {"max_iter": 101}, "models": [{"model": "/b"}, {"model": "/c"}]},
     "max_iter 101: karcher runs a whole number of iterations, from 0 to 100"),
    ({"merge_method": "karcher", "parameters": {"max_iter": 2.5}, "models": [{"model": "/b"}, {"model": "/c"}]},
     "max_iter 2.5: karcher runs a whole number"),
    ({"merge_method": "slerp", "base_model": "/a", "dtype": "int8", "parameters": {"t": 0.5},
      "models": [{"model": "/b"}]}, "dtype 'int8': mergekit's compute dtype"),
])
def test_the_geometric_methods_refuse_what_mergekit_refuses_in_one_line(config, match):
    with pytest.raises(InputError, match=match):
        kind, values = recipe_values(config, "recipe f.yml")
        build_recipe(kind, {**values, "out": "/o"}, where="recipe f.yml")


def test_a_file_without_dtype_computes_at_its_inputs_dtype_and_float64_in_float32():
    base = {"merge_method": "slerp", "base_model": "/a", "parameters": {"t": 0.5}, "models": [{"model": "/b"}]}
    assert recipe_values(base, "f")[1]["compute_dtype"] == "inputs"
    assert recipe_values({**base, "dtype": "bfloat16"}, "f")[1]["compute_dtype"] == "BF16"
    assert recipe_values({**base, "dtype": "float64"}, "f")[1]["compute_dtype"] == "F32"


def test_another_methods_parameter_is_ignored_with_a_warning_as_mergekit_ignores_it(caplog):
    """mergekit's tokenizer tests give every model a weight, slerp too: mergekit runs without it, and
    so does raymerge, warning; a name no method takes (a typo) is still refused."""
    config = {"merge_method": "slerp", "base_model": "/a", "parameters": {"t": 0.5},
              "models": [{"model": "/a", "parameters": {"weight": 1.0}}, {"model": "/b", "parameters": {"weight": 1.0}}]}
    with caplog.at_level("WARNING", logger="raymerge"):
        _, values = recipe_values(config, "f")
    assert "models[0].parameters.weight: slerp takes no weight; ignored, as mergekit ignores it" in caplog.text
    assert values["model"] == ["/b"] and "weight" not in values and "scale" not in values
    config["models"][1]["parameters"] = {"wieght": 1.0}
    with pytest.raises(InputError, match="wieght': not a slerp parameter raymerge can map; it takes t"):
        recipe_values(config, "f")


def test_karchers_base_model_is_one_of_its_models_and_weights_change_nothing():
    """mergekit's karcher weighs every model of its group 1/N, the base model one of them: appended
    after the models where they do not list it (its config and tokenizer are the output's)."""
    config = {"merge_method": "karcher", "base_model": "/m/c", "parameters": {"max_iter": 5, "tol": 1e-5},
              "models": [{"model": "/m/a", "parameters": {"weight": 0.6}}, {"model": "/m/b", "parameters": {"weight": 0.4}}]}
    kind, values = recipe_values(config, "f")
    recipe, _ = build_recipe(kind, {**values, "out": "/o"})
    assert [url for url, _ in recipe.vectors] == ["/m/a", "/m/b", "/m/c"] and recipe.base == "/m/c"
    assert dict(recipe.params) == {"max_iter": 5, "tol": 1e-5}
    listed = {**config, "models": [{"model": "/m/c"}, {"model": "/m/a"}]}
    assert recipe_values(listed, "f")[1]["model"] == ["/m/c", "/m/a"]  # listed: where the file puts it


def test_slices_map_each_source_to_a_model_with_its_layer_range_and_parameters():
    """A source's parameters over its slice's over the file's (mergekit's precedence); the base
    model's range is the slice's base, not a model."""
    config = {"merge_method": "task_arithmetic", "base_model": "/m/base", "parameters": {"weight": 0.1},
              "slices": [{"sources": [{"model": "/m/base", "layer_range": [0, 4]},
                                      {"model": "/m/a", "layer_range": [4, 8], "parameters": {"weight": 0.9}},
                                      {"model": "/m/b", "layer_range": [0, 4]}],
                          "parameters": {"weight": 0.5}},
                         {"sources": [{"model": "/m/b", "layer_range": [4, 6]}, {"model": "/m/base", "layer_range": [2, 4]}]}]}
    kind, values = recipe_values(config, "f")
    recipe, _ = build_recipe(kind, {**values, "out": "/o"})
    assert [u for u, _ in recipe.vectors] == ["/m/a", "/m/b", "/m/b"]
    assert [s.default for _, s in recipe.vectors] == [0.9, 0.5, 0.1]
    assert recipe.slices == ((((4, 8), (0, 4)), (0, 4)), (((4, 6),), (2, 4)))
    assert recipe.to_mapping()["slices"][1] == {"layers": [[4, 6]], "base": [2, 4]}


@pytest.mark.parametrize("config,match", [
    ({"merge_method": "task_arithmetic", "base_model": "/m/base",
      "slices": [{"sources": [{"model": "/m/a", "layer_range": [0, 2], "parameters": {"weight": 1}}]}]},
     r"slices\[0\]: the base model is not among its sources"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "/m/a", "layer_range": [0, 2]},
                                                             {"model": "/m/b", "layer_range": [0, 2]}]}]},
     r"slices\[0\]: passthrough takes exactly 1 --model input"),
    ({"merge_method": "passthrough", "models": [{"model": "/m/a"}],
      "slices": [{"sources": [{"model": "/m/a", "layer_range": [0, 2]}]}]}, "give models .* or slices"),
    ({"merge_method": "ties", "base_model": "/m/base", "slices": [{"parameters": {"normalize": True}, "sources": [
        {"model": "/m/base", "layer_range": [0, 2]}, {"model": "/m/a", "layer_range": [0, 2],
                                                       "parameters": {"weight": 1}}]}]},
     r"slices\[0\].parameters.normalize: one value for the whole merge"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "/m/a", "layer_range": [2, 2]}]}]},
     r"^f: slices\[0\].sources\[0\].layer_range: \[2, 2\]; write layer_range: \[FIRST, END\]"),
])
def test_slices_refuse_what_cannot_map_in_one_line(config, match):
    with pytest.raises(InputError, match=match):
        kind, values = recipe_values(config, "f")
        build_recipe(kind, {**values, "out": "/o"}, where="f")


def test_filters_that_match_no_tensor_fall_back_to_the_lower_scope_as_in_mergekit():
    """mergekit resolves a parameter scope by scope: where a scope's filters match no tensor's name,
    the next scope's setting applies (a model's, then its slice's, then the file's)."""
    kind, values = recipe_values({
        "merge_method": "task_arithmetic", "base_model": "/m/base", "parameters": {"weight": 0.8},
        "models": [{"model": "/m/a", "parameters": {"weight": [{"filter": "self_attn", "value": 0.5}]}}]}, "f")
    recipe, _ = build_recipe(kind, {**values, "out": "/o"})
    scale = recipe.vectors[0][1]
    assert scale.at("model.layers.0.self_attn.q_proj.weight", 2) == 0.5
    assert scale.at("model.layers.0.mlp.up_proj.weight", 2) == 0.8  # the file's, not 1.0
    config = {"merge_method": "task_arithmetic", "base_model": "/m/base",
              "parameters": {"weight": [{"filter": "mlp", "value": 0.3}]},
              "slices": [{"parameters": {"weight": [{"filter": "self_attn", "value": 0.6}, {"value": 0.9}]},
                          "sources": [{"model": "/m/base", "layer_range": [0, 2]},
                                      {"model": "/m/a", "layer_range": [0, 2],
                                       "parameters": {"weight": [{"filter": "q_proj", "value": 0.1}]}}]}]}
    kind, values = recipe_values(config, "f")
    scale = build_recipe(kind, {**values, "out": "/o"})[0].vectors[0][1]
    assert [scale.at(f"model.layers.0.{n}", 2) for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                          "mlp.up_proj.weight")] == [0.1, 0.6, 0.9]
    with pytest.raises(InputError, match=r"models\[0\].parameters.weight: its filters leave other tensors without a "
                                         r"weight, which mergekit refuses; end the list with \{value: X\}"):
        recipe_values({"merge_method": "task_arithmetic", "base_model": "/m/base",
                       "models": [{"model": "/m/a", "parameters": {"weight": [{"filter": "mlp", "value": 1}]}}]}, "f")
