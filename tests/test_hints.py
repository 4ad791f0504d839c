"""Every hint raymerge can print names flags the command that prints it accepts.

Hints are collected from the source itself: every string literal (f-strings included) that tells
the user to pass, use, rerun with or drop a `--flag`. A message from the planner, the runner or
the recipe checks can be printed by every command that runs or plans a recipe, `raymerge run
FILE` included (a mergekit file's run is where `--vocab overlap` once failed), so each flag a
hint names must be accepted by `run` and by every recipe command whose kind takes it, with the
value the hint gives.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import os
import re

import pytest

import raymerge
from raymerge import cli
from raymerge.config import OPTIONS
from raymerge.methods import RECIPES

HINT = re.compile(r"\b(?:pass|passing|rerun with|run the same command with|use|drop|with|add|give|change|set|"
                  r"try)\b[^.;]*?"
                  r"(--[a-z][a-z0-9-]*)(?: ([a-z0-9_.]+))?")
# Flags of the commands that inspect checkpoints rather than run recipes, and who takes them.
OWN = {"--recompute": ("verify",), "--plot": ("inspect",), "--recipe": ("plan",), "--json": ("plan",),
       "--debug": ("run", "merge", "verify", "inspect", "plan"), "--report": ("run", "merge")}


def _strings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            yield "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


@functools.cache
def _hints() -> dict[tuple[str, str | None], str]:
    """(flag, value given or None) -> the first source file whose hint names it."""
    root = os.path.dirname(raymerge.__file__)
    found: dict[tuple[str, str | None], str] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                for text in _strings(ast.parse(open(path).read())):
                    for m in HINT.finditer(text):
                        found.setdefault((m.group(1), m.group(2)), os.path.relpath(path, root))
    return found


def _sample(option, value: str | None) -> list[str]:
    """Arguments that give `option` a valid value: the hint's own, else one of its choices."""
    cli_extra = option.cli
    if cli_extra.get("action") in ("store_true", "store_false") or "flag" in cli_extra or \
            cli_extra.get("action") is not None and "Boolean" in str(cli_extra.get("action")):
        return []
    if value in (cli_extra.get("choices") or ()):
        return [value]
    return [cli_extra["choices"][0]] if cli_extra.get("choices") else ["1"]


def _accepts(command: list[str], flag: str, value: list[str]) -> bool:
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.build_parser().parse_args([*command, flag, *value])
        except SystemExit:
            return False
    return True


BY_FLAG = {(o.cli.get("flag") or o.flag): o for o in OPTIONS}
REQUIRED = {"merge": ["--base", "b", "--chat", "c", "--cp", "p", "--out", "o"],
            "apply": ["--cp", "p", "--vector", "v", "--out", "o"], "extract": ["--base", "b", "--chat", "c", "--out", "o"],
            "run": ["recipe.yaml"], "verify": ["ckpt"], "inspect": ["ckpt"], "plan": []}


def test_hints_are_found():
    hints = _hints()
    assert ("--overwrite", None) in hints or any(f == "--overwrite" for f, _ in hints)
    assert any(f == "--vocab" for f, _ in hints)  # the planner's vocabulary hint


@pytest.mark.parametrize("flag,value", sorted(_hints(), key=str))
def test_every_hint_names_a_flag_its_commands_accept(flag, value):
    hints = _hints()
    option = BY_FLAG.get(flag)
    if option is None:
        commands = OWN.get(flag)
        assert commands, f"{hints[(flag, value)]}: a hint names {flag}, which no command has"
        for command in commands:
            assert _accepts([command, *REQUIRED[command]], flag, ["1"] if flag == "--recompute" else
                            ["x.png"] if flag == "--plot" else ["f"] if flag in ("--recipe", "--report") else [])
        return
    if option.key in cli.INPUT_KEYS:
        return  # names an input, as a location ("--chat X: ..."), not a flag to add
    args = _sample(option, value)
    commands = ["run"] + [k for k, how in RECIPES.items() if how.command and option.takes(k)]
    refused = [c for c in commands if not _accepts([c, *REQUIRED[c]], flag, args)]
    assert not refused, f"{hints[(flag, value)]}: a hint says {flag} {' '.join(args)}, which " \
                        f"`raymerge {' / '.join(refused)}` refuses"


def test_a_mergekit_files_vocabulary_hint_works_from_run_and_plan(tmp_path, capsys):
    """Inputs whose vocabularies differ: the refusal says --vocab overlap, and that flag is taken."""
    from tests.conftest import make_llama_trio

    trio = make_llama_trio(str(tmp_path / "trio"), roles=("base", "cp"), cp_extra_rows=16, layers=1)
    recipe = tmp_path / "mergekit.yml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {trio['base']}\nmodels:\n"
                      f"  - model: {trio['cp']}\n    parameters: {{weight: 0.5}}\n")
    assert cli.main(["plan", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "--vocab overlap" in err
    assert cli.main(["plan", "--recipe", str(recipe), "--vocab", "overlap"]) == 0
    assert _accepts(["run", str(recipe)], "--vocab", ["overlap"])
