"""Scale schedules: numbers, gradients over the layers (mergekit's interpolation), rules."""

from __future__ import annotations

import numpy as np
import pytest

from raymerge.config import build_recipe, recipe_from_flags
from raymerge.errors import InputError
from raymerge.planning.schedule import Scale, count_layers, layer_of

TRIO = {"base": "/m/base", "chat": "/m/chat", "cp": "/m/cp", "out": "/m/out"}


@pytest.mark.parametrize("name,layer", [("model.layers.12.mlp.up_proj.weight", 12), ("transformer.h.3.attn.c_attn.weight", 3),
                                        ("blocks.0.ln.weight", 0), ("model.embed_tokens.weight", None),
                                        ("lm_head.weight", None), ("model.norm.weight", None)])
def test_layer_of_reads_the_layer_index_of_common_architectures(name, layer):
    assert layer_of(name) == layer


def test_layers_come_from_the_config_else_the_names():
    names = ["model.layers.0.a", "model.layers.6.a", "lm_head.weight"]
    assert count_layers(names, {"num_hidden_layers": 32}) == 32
    assert count_layers(names, None) == 7


def test_a_gradient_spreads_over_the_layers_as_mergekit_interpolates():
    g = Scale((0.0, 0.5, 1.0))
    got = [g.at(f"model.layers.{i}.mlp.up_proj.weight", 32) for i in range(32)]
    assert got[0] == 0.0 and got[31] == 1.0
    assert np.allclose(got, np.interp(np.arange(32) / 31, [0, 0.5, 1], [0.0, 0.5, 1.0]), rtol=0, atol=1e-15)
    assert g.at("model.embed_tokens.weight", 32) == 0.0  # outside the layers: the first value (mergekit's t = 0)


def test_rules_match_in_order_and_the_default_takes_the_rest():
    s = Scale(0.5, (("pattern", "mlp", 0.25), ("pattern", r"layers\.1\.", 0.1), ("contains", "embed", (1.0, 3.0))))
    assert s.at("model.layers.1.mlp.down_proj.weight", 4) == 0.25  # the first match wins
    assert s.at("model.layers.1.self_attn.q_proj.weight", 4) == 0.1
    assert s.at("model.layers.2.self_attn.q_proj.weight", 4) == 0.5
    assert s.at("model.embed_tokens.weight", 4) == 1.0  # a rule's gradient, outside the layers
    assert s.at("lm_head.weight", 4) == 0.5


def test_recipes_take_numbers_gradients_and_rules_per_vector():
    recipe, _ = build_recipe("merge", {**TRIO, "chat": ["/m/a", "/m/b", "/m/c"], "scale": [
        0.5, [0.0, 1.0], {"rules": [{"pattern": "mlp", "scale": 0.25}], "default": [1.0, 0.0]}]})
    assert [s for _, s in recipe.vectors] == [Scale(0.5), Scale((0.0, 1.0)),
                                              Scale((1.0, 0.0), (("pattern", "mlp", 0.25),))]
    assert recipe.to_mapping()["scale"] == [0.5, [0.0, 1.0], {"rules": [{"pattern": "mlp", "scale": 0.25}],
                                                            "default": [1.0, 0.0]}]
    again, _ = build_recipe("merge", {k: v for k, v in recipe.to_mapping().items() if k != "kind"})
    assert again == recipe  # what the manifest records plans the same again


@pytest.mark.parametrize("scale,match", [
    ([0.0, 0.5, 1.0], r"3 --scale values for 1 --chat .*scale: \[\[0.0, 0.5, 1.0\]\]"),
    ([[]], "a gradient needs at least one number"),
    ([{"rules": [{"pattern": "(", "scale": 1}]}], "not a valid regular expression"),
    ([{"rules": [{"regex": "mlp", "scale": 1}]}], r"write \{pattern: REGEX, scale: X\}"),
    ([{"rules": "mlp"}], "a list of"),
    ([{"default": 1, "sclae": 2}], "the keys rules and default"),
    ([[0.5, "x"]], "--scale 'x': not a number"),
])
def test_bad_schedules_are_one_input_error(scale, match):
    with pytest.raises(InputError, match=match):
        build_recipe("merge", {**TRIO, "scale": scale})


def test_scale_rule_flags_become_the_rules_of_the_vector_before_them():
    values = recipe_from_flags({"chat": ["/a", "/b"], "scale": ["0.5", "0.7"],
                                "scale_rule": [(0, "mlp", "0.25"), (1, "attn", "0.1"), (0, "norm", "0")]})
    assert values["scale"] == [{"rules": [{"pattern": "mlp", "scale": "0.25"}, {"pattern": "norm", "scale": "0"}],
                                "default": "0.5"},
                               {"rules": [{"pattern": "attn", "scale": "0.1"}], "default": "0.7"}]
    recipe, _ = build_recipe("merge", {**TRIO, **values})
    assert recipe.vectors[0][1] == Scale(0.5, (("pattern", "mlp", 0.25), ("pattern", "norm", 0.0)))


def test_a_layer_number_of_thousands_of_digits_is_outside_the_layers():
    name = "model.layers." + "9" * 5000 + ".mlp.weight"
    assert layer_of(name) is None and layer_of("model.layers.123456789.mlp.weight") == 123456789
    assert Scale((0.0, 1.0)).at(name, 4) == 0.0  # a gradient's first value, as outside the layers
    assert count_layers([name, "model.layers.3.mlp.weight"], None) == 4


@pytest.mark.parametrize("digits", ["\u0661\u0662", "\uff11\uff12", "1_2", "\u00b2"])
def test_layer_numbers_are_ascii_digits(digits):
    assert layer_of(f"model.layers.{digits}.mlp.weight") is None


def test_catastrophic_patterns_match_in_linear_time():
    import subprocess
    import sys

    # In a child with a timeout: a backtracking matcher would block this test for hours, not fail it.
    code = """if True:
        import time
        from raymerge.ops.rules import compile_patterns
        from raymerge.planning.schedule import Scale
        name = "a" * 10_000 + "!"
        patterns = ["(a+)+$", "(x+x+)+y", "(a|aa)+$", "(a*)*b", "^(a|a?)+$", "(((a+)+)+)+$"]
        worst = 0.0
        for p in patterns:
            started = time.perf_counter()
            assert Scale(0.5, (("pattern", p, 1.0),)).at(name, 1) == 0.5
            assert compile_patterns([p])[0].search(name) is None  # --skip's matcher
            worst = max(worst, time.perf_counter() - started)
        print(worst)
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) < 1.0


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?P<x>a)(?P=x)", r"mlp(?=\.up)", r"(?<!self_)attn", r"(?!x)y"])
def test_patterns_re2_cannot_run_are_refused_in_one_line(pattern, capfd):
    for values in ({"skip": [pattern]}, {"scale": [{"rules": [{"pattern": pattern, "scale": 0.5}]}]}):
        with pytest.raises(InputError, match=r"^--(skip|scale) .*: not supported \(.*\); patterns run on RE2, in time "
                                             r"linear in the name, so backreferences, lookarounds") as e:
            build_recipe("merge", {**TRIO, **values})
        assert "\n" not in str(e.value)
    assert capfd.readouterr().err == ""  # RE2 logs nothing of its own


@pytest.mark.parametrize("values,words", [
    ({"skip": ["mlp"] * 257}, "--skip: 257 patterns; at most 256"),
    ({"skip": ["a" * 1001]}, "--skip 'aaaa.*: 1001 characters; a pattern has at most 1000"),
    ({"scale": [{"rules": [{"contains": "a", "scale": 1}] * 257}]}, "--scale: 257 patterns; at most 256"),
    ({"scale": [{"rules": [{"contains": "a" * 1001, "scale": 1}]}]}, "1001 characters"),
    ({"scale": [{"rules": [{"pattern": "x{1001}", "scale": 1}]}]}, r"'x\{1001\}': not supported \(invalid repetition"),
    ({"scale": [{"rules": [{"pattern": "a", "contains": "a", "scale": 1}]}]}, r"or \{contains: SUBSTRING, scale: X\}"),
])
def test_patterns_are_bounded_in_number_and_length(values, words):
    with pytest.raises(InputError, match=words):
        build_recipe("merge", {**TRIO, **values})


def test_contains_rules_are_substrings_and_survive_the_recorded_recipe():
    recipe, _ = build_recipe("merge", {**TRIO, "scale": [{"rules": [{"contains": "a.b", "scale": 0.25},
                                                                    {"pattern": "a.c", "scale": 0.5}]}]})
    s = recipe.vectors[0][1]
    assert s == Scale(1.0, (("contains", "a.b", 0.25), ("pattern", "a.c", 0.5)))
    assert (s.at("x.a.b.y", 1), s.at("axb", 1), s.at("axc", 1)) == (0.25, 1.0, 0.5)
    again, _ = build_recipe("merge", {k: v for k, v in recipe.to_mapping().items() if k != "kind"})
    assert again == recipe


def test_a_schedule_compiles_its_patterns_once(monkeypatch):
    import raymerge.planning.schedule as schedule

    calls = []
    compile_patterns = schedule.compile_patterns
    monkeypatch.setattr(schedule, "compile_patterns", lambda *a: calls.append(a) or compile_patterns(*a))
    s = Scale(0.5, (("pattern", r"mlp\.", 0.25), ("contains", "attn", 0.1)))
    got = [s.at(f"model.layers.{i}.{part}.weight", 8) for i in range(8) for part in ("mlp.up", "attn.q", "norm")]
    assert got == [0.25, 0.1, 0.5] * 8
    assert calls == [([r"mlp\."], "--scale-rule")]
