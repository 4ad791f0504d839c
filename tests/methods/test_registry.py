"""The method registry: a method declares its whole surface, and options, recipe kinds, help, the
order of the passes and the mapping of mergekit files are made from the declarations."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import raymerge
from raymerge.config import OPTION
from raymerge.config.mergekit import recipe_values
from raymerge.errors import InputError
from raymerge.methods import (MERGEKIT, METHODS, PASS_ORDER, RECIPES, Method, Parameter, Pass, check_registry,
                              kind_methods, mergekit_kind)


def test_every_parameter_is_one_option_taken_by_the_kinds_whose_methods_declare_it():
    declared = {p.name for m in METHODS.values() for p in m.parameters}
    assert declared <= set(OPTION)
    for name in declared:
        kinds = {k.name for k in RECIPES.values() if k.tunable
                 and any(name in {p.name for p in m.parameters} for m in kind_methods(k))}
        assert set(OPTION[name].kinds) == kinds, name
        for m in METHODS.values():
            for p in m.parameters:
                if p.name == name:
                    assert m.name in OPTION[name].help  # the help names every method that takes it
    assert "off for task_arithmetic" in OPTION["normalize"].help and "on for linear, ties" in OPTION["normalize"].help


def test_the_real_defaults_are_declared_where_the_rule_reads_them():
    defaults = {m.name: {p.name: p.default for p in m.parameters} for m in METHODS.values()}
    assert defaults["ties"]["normalize"] is True and defaults["ties"]["rescale"] is False  # mergekit's
    assert defaults["dare_ties"]["normalize"] is False and defaults["dare_ties"]["rescale"] is True
    assert defaults["linear"]["normalize"] is True and defaults["task_arithmetic"]["normalize"] is False


def test_passes_run_in_their_declared_order_the_elementwise_one_last():
    declared = {p.name: p.order for m in METHODS.values() for p in m.statistics}
    assert list(PASS_ORDER[:-1]) == sorted(declared, key=declared.get) and PASS_ORDER[-1] == "elementwise"


def test_mergekit_files_map_every_method_declaring_a_mergekit_kind():
    assert set(MERGEKIT) == {k.name for k in RECIPES.values() if k.mergekit}
    for name in MERGEKIT:
        method = METHODS[RECIPES[name].method]
        with pytest.raises(InputError) as e:
            recipe_values({"merge_method": name, "base_model": "/b", "models": [{"model": "/m"}],
                           "parameters": {"bogus": 1}}, "f")
        takes = [p.mergekit for p in method.parameters if p.mergekit] + list(method.mergekit_ignores)
        assert str(e.value).endswith(f"it takes {', '.join(takes)}")


class _Stub(Method):
    name = "stub"

    def apply(self, kernel, out, operands, scratch):
        return kernel.weighted_sum(out, operands.anchor, [], scratch)


def _registry_with(**declared):
    return (*METHODS.values(), type("Stub", (_Stub,), declared)())


@pytest.mark.parametrize("declared, problem", [
    ({"parameters": (Parameter("normalize", "", "number", 1.0),)}, "parameter normalize is declared otherwise"),
    ({"statistics": (Pass("l1-norm", 99),)}, "pass l1-norm is declared otherwise"),
    ({"statistics": (Pass("other", 10),)}, "share an order"),
    ({"recipes": METHODS["ties"].recipes}, "recipe kinds declared twice"),
    ({"name": "ties"}, r"methods registered twice: \['ties'\]"),
    ({"recipes": (mergekit_kind("stubby"),)}, "recipe kind stubby computes with stubby, which is not registered"),
])
def test_declarations_that_would_be_half_used_fail_at_import(declared, problem):
    with pytest.raises(TypeError, match=problem):
        check_registry(_registry_with(**declared))


def test_a_parameter_config_could_not_check_is_refused_where_it_is_declared():
    with pytest.raises(TypeError, match="not a parameter config can check"):
        Parameter("t", "", "text", 1.0)
    with pytest.raises(TypeError, match="not a parameter config can check"):
        Parameter("t", "", "number", 1.0, schedulable=True)  # a global value has no schedule
    with pytest.raises(TypeError, match="not a parameter config can check"):
        Parameter("t", "", "fraction", 1.0)  # a fraction (a list of schedules) is one per vector
    with pytest.raises(TypeError, match="not a parameter config can check"):
        Parameter("t", "", "flag", False, per_vector=True)  # a flag is one in all


# A new elementwise method, as a newcomer would write it: one module...
_LERP = '''
"""lerp: out = round(base + reach * sum_i gain_i * scale_i * (model_i - base)). A stand-in."""
from raymerge.methods.base import SCALE, Method, Parameter, mergekit_kind


class Lerp(Method):
    name = "lerp"
    parameters = (SCALE, Parameter("reach", "how far towards the models", "number", 0.5, mergekit="reach"),
                  Parameter("gain", "each model's gain", "weight", 1.0, per_vector=True, schedulable=True,
                            mergekit="gain"))
    recipes = (mergekit_kind("lerp"),)

    def apply(self, kernel, out, operands, scratch):
        t = self.value(operands, "reach")
        terms = [(t * v.param("gain", 1.0) * v.scale, v.a, v.b) for v in operands.vectors]
        return kernel.weighted_sum(out, operands.anchor, terms, scratch)
'''

# ... and what the new method is then asked, through every face that is made from the registry.
_CHECK = '''
import contextlib, io, sys
import torch
from raymerge.cli import main
from raymerge.config import OPTION, load_recipe_file
from raymerge.execution.worker import MergeWorker
from raymerge.planning.build import make_plan
from raymerge.synth import LlamaShape, make_trio
from safetensors.torch import load_file

trio = make_trio(sys.argv[1], LlamaShape(hidden=32, layers=1, vocab=64, intermediate=48))
assert OPTION["reach"].kinds == ("lerp",) and OPTION["gain"].per_vector
with open(sys.argv[1] + "/lerp.yaml", "w") as f:
    f.write(f"merge_method: lerp\\nbase_model: {trio['base']}\\ndtype: float32\\nout_dtype: bfloat16\\n"
            f"parameters: {{reach: 0.25}}\\nmodels:\\n  - model: {trio['chat']}\\n"
            f"    parameters: {{weight: 2.0, gain: [{{filter: mlp, value: 0.5}}, {{value: 1.0}}]}}\\n")
recipe, options = load_recipe_file(sys.argv[1] + "/lerp.yaml")
assert recipe.kind == "lerp" and dict(recipe.params) == {"reach": 0.25} and recipe.per_vector[0][0] == "gain"
plan = make_plan(recipe, options)
worker = MergeWorker(plan, None, {}, {})
out = {item.id: worker.produce(item.id)[0] for item in plan.items}
base = load_file(trio["base"] + "/model.safetensors")
chat = load_file(trio["chat"] + "/model.safetensors")
for t in plan.tensors:
    item = next(i for i in plan.items if i.shard == t.shard and i.start <= t.start < i.end)
    got = bytes(out[item.id][t.start - item.start:t.start - item.start + t.nbytes])
    if not t.terms:
        continue
    gain = 0.5 if "mlp" in t.name else 1.0
    want = (base[t.name].float() + (0.25 * gain * 2.0) * (chat[t.name].float() - base[t.name].float()))
    assert got == want.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes(), t.name
help = io.StringIO()
with contextlib.redirect_stdout(help), contextlib.suppress(SystemExit):
    main(["run", "--help"])
assert "--gain" in help.getvalue() and "--reach REACH" in help.getvalue() and "lerp" in help.getvalue(), help.getvalue()
print("ok")
'''


def test_an_elementwise_method_is_one_new_file_and_one_registry_line(tmp_path):
    """Copy the package, add a module and one line in METHODS, and ask the copy through its faces:
    the options, the mergekit mapping, the plan, the worker and the CLI all know the new method."""
    package = tmp_path / "src" / "raymerge"
    shutil.copytree(os.path.dirname(raymerge.__file__), package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "methods" / "lerp.py").write_text(textwrap.dedent(_LERP))
    registry = package / "methods" / "__init__.py"
    text = registry.read_text()
    line = "_ALL: tuple[Method, ...] = ("
    assert text.count(line) == 1
    registry.write_text(text.replace(line, "from raymerge.methods.lerp import Lerp  # noqa: E402\n" + line + "Lerp(), "))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    done = subprocess.run([sys.executable, "-c", _CHECK, str(tmp_path / "trio")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert "lerp" not in OPTION["scale"].kinds  # the checkout's own registry is untouched
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
