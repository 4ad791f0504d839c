"""Options and recipes at the boundary: scales float32 can use, strict booleans, typed values;
every wrong value is one InputError, never a TypeError."""

import struct

import pytest

from raymerge.config import RunOptions, build_recipe, parse_number, parse_scale, parse_storage_options
from raymerge.errors import InputError

TRIO = {"base": "/m/base", "chat": "/m/chat", "cp": "/m/cp", "out": "/m/out"}


@pytest.mark.parametrize("value", ["1e39", 1e39, -3.5e38, "1e-50", 1e-50, "-1e-46", 5e-324])
def test_scales_float32_cannot_hold_are_refused(value):
    with pytest.raises(InputError, match=r"float32, in which raymerge computes; use 0 or a magnitude between"):
        parse_scale(value)


@pytest.mark.parametrize("value,expected", [("0.5", 0.5), (0, 0.0), ("-0.0", 0.0), ("3.4e38", 3.4e38),
                                            ("1e-45", 1e-45), (-2, -2.0)])
def test_scales_float32_can_hold_are_kept_as_given(value, expected):
    x = parse_scale(value)
    assert x == expected
    assert (struct.unpack("<f", struct.pack("<f", x))[0] != 0) == (x != 0)


@pytest.mark.parametrize("value,match", [(True, "not a number"), ([1], "not a number"), ("half", "not a number"),
                                         ("nan", "finite"), ("inf", "finite"), (10**400, "finite")],
                         ids=["bool", "list", "word", "nan", "inf", "huge int"])
def test_scales_that_are_not_numbers_are_refused(value, match):
    with pytest.raises(InputError, match=match):
        parse_scale(value)


def test_worker_resources_keep_their_parser_without_float32_limits():
    # GPUs and CPUs per worker are counts of resources, not float32 factors.
    assert parse_number("1e-50", "--gpus-per-worker") == 1e-50
    assert RunOptions.parse(cpus_per_worker=0.5, gpus_per_worker="0.25").gpus_per_worker == 0.25
    with pytest.raises(InputError, match="--cpus-per-worker"):
        RunOptions.parse(cpus_per_worker=0)


@pytest.mark.parametrize("value", [[1], "[1]", 5, {1: "x"}, '"text"'])
def test_storage_options_must_be_a_mapping_with_string_keys(value):
    with pytest.raises(InputError, match="--storage-options .*must be a JSON object"):
        parse_storage_options(value)


def test_storage_options_json_is_parsed_as_untrusted():
    assert parse_storage_options('{"anon": true}') == {"anon": True}
    assert parse_storage_options({"anon": True}) == {"anon": True}
    with pytest.raises(InputError, match="--storage-options: nested deeper"):
        parse_storage_options('{"a": ' + "[" * 10_000 + "]" * 10_000 + "}")


@pytest.mark.parametrize("key", ["overwrite", "resume", "allow_nonfinite"])
@pytest.mark.parametrize("value", ["false", "true", 0, 1, "no"])
def test_run_booleans_are_strict(key, value):
    with pytest.raises(InputError, match=rf"recipe r.yaml: {key}: expected true or false, got {value!r}"):
        build_recipe("merge", {**TRIO, key: value}, where="recipe r.yaml")


def test_run_booleans_take_real_bools():
    _, run = build_recipe("merge", {**TRIO, "overwrite": True, "allow_nonfinite": True})
    assert (run.overwrite, run.resume, run.allow_nonfinite) == (True, False, True)
    _, run = build_recipe("merge", {**TRIO, "resume": True, "allow_nonfinite": False})
    assert (run.overwrite, run.resume, run.allow_nonfinite) == (False, True, False)
    assert RunOptions().allow_nonfinite is False


@pytest.mark.parametrize("kind", ["merge", "extract", "apply"])
def test_allow_nonfinite_is_a_key_of_every_recipe(kind):
    values = {"merge": TRIO, "extract": {"base": "/b", "chat": "/c", "out": "/o"},
              "apply": {"cp": "/cp", "vector": "/v", "out": "/o"}}[kind]
    assert build_recipe(kind, {**values, "allow-nonfinite": True})[1].allow_nonfinite is True


@pytest.mark.parametrize("values,match", [
    ({"workers": "4"}, "--workers '4': must be an integer"),
    ({"workers": 4.0}, "--workers 4.0: must be an integer"),
    ({"in_flight": [2]}, "--in-flight"),
    ({"item_size": [1]}, "--item-size"),
    ({"shard_size": {"a": 1}}, "--shard-size"),
    ({"shard_size": "9" * 400}, "--shard-size .*too large"),
    ({"address": 5}, "--address 5: a Ray address"),
    ({"worker_resource": 1}, "--worker-resource 1: a Ray resource name"),
    ({"storage_options": [1]}, "--storage-options"),
    ({"scale": True}, "--scale True: not a number"),
    ({"scale": {"a": 1}}, "--scale"),
    ({"scale": "1e39"}, "--scale '1e39': overflows float32"),
    ({"dtype": 5}, "--dtype 5: not a dtype name"),
    ({"cpus_per_worker": [1]}, "--cpus-per-worker"),
    ({"skip": ["(" * 100_000]}, "--skip"),
    ({"vocab": ["overlap"]}, "--vocab"),
    ({"chat_template": "no"}, "chat_template: expected true or false"),
    ({"special_tokens": [[1, 2]]}, "CP_ID:CHAT_ID"),
    ({"out": 5}, "--out: expected a URL string"),
    ({1: "x"}, "key 1: keys are option names"),
])
def test_recipe_values_of_the_wrong_type_are_one_input_error(values, match):
    with pytest.raises(InputError, match=match):
        build_recipe("merge", {**TRIO, **values})


@pytest.mark.parametrize("kind", [["merge"], None, 5])
def test_recipe_kind_must_be_a_name(kind):
    with pytest.raises(InputError, match="kind .*: must be one of merge, extract, apply"):
        build_recipe(kind, TRIO)


def test_one_table_holds_every_option_of_runs_recipes_and_flags():
    import dataclasses

    from raymerge.cli import build_parser
    from raymerge.config import OPTIONS

    assert sorted(o.key for o in OPTIONS if o.run) == sorted(f.name for f in dataclasses.fields(RunOptions))
    merge = build_parser()._subparsers._group_actions[0].choices["merge"]
    dests = {a.dest for a in merge._actions} - {"help", "verbose", "quiet", "debug", "report"}
    assert dests == {o.key for o in OPTIONS if o.takes("merge")}


@pytest.mark.parametrize("value", [2, "1.5"])
def test_more_than_one_gpu_per_worker_is_refused_with_what_works(value):
    with pytest.raises(InputError, match=r"--gpus-per-worker .*: a worker computes on one GPU; to use more GPUs run "
                                         r"more workers \(--gpus-per-worker 1"):
        build_recipe("merge", {**TRIO, "gpus_per_worker": value})
    assert build_recipe("merge", {**TRIO, "gpus_per_worker": 1})[1].gpus_per_worker == 1.0


def test_command_line_flags_win_over_a_recipe_files_keys(tmp_path):
    from raymerge.config import load_recipe_file

    path = tmp_path / "r.yaml"
    path.write_text("kind: merge\nbase: /m/base\nchat: /m/chat\ncp: /m/cp\nout: /m/out\nitem-size: 8MiB\nworkers: 2\n")
    recipe, run = load_recipe_file(str(path), {"out": "/m/elsewhere", "workers": 6, "resume": True})
    assert (recipe.out, run.workers, run.resume, run.item_size) == ("/m/elsewhere", 6, True, 8 * 2**20)
    recipe, run = load_recipe_file(str(path))
    assert (recipe.out, run.workers, run.resume) == ("/m/out", 2, False)


def test_run_takes_out_and_run_flags_checked_like_the_commands(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "r.yaml"
    path.write_text("kind: merge\nbase: /m/base\nchat: /m/chat\ncp: /m/cp\n")
    r = subprocess.run([sys.executable, "-m", "raymerge", "run", str(path), "--out", str(tmp_path / "o"),
                        "--item-size", "10"], capture_output=True, text=True)
    assert r.returncode == 2 and f"recipe {path}: --item-size 10: must be between 4KiB and 2GiB" in r.stderr
    assert not (tmp_path / "o").exists()


def test_a_method_takes_its_own_parameters_and_refuses_the_others():
    import pytest

    from raymerge.errors import InputError

    values = {"base": "b", "chat": ["c1", "c2"], "cp": "cp", "out": "o"}
    recipe, _ = build_recipe("merge", {**values, "method": "ties", "density": [0.3, [0.1, 0.9]], "normalize": False})
    assert (recipe.method_name, dict(recipe.params)) == ("ties", {"normalize": False})
    assert [d.to_json() for d in recipe.density] == [0.3, [0.1, 0.9]]
    for bad, words in (({"density": [0.5, 0.5]}, "with method sum takes no density; use --method ties"),
                       ({"method": "ties", "seed": 3}, "takes no seed"),
                       ({"method": "ties", "density": [0.5]}, "1 --density values for 2 --chat"),
                       ({"method": "dare_ties", "density": [0.5, -0.1]}, "from 0 to 1"),
                       ({"method": "dare_ties", "seed": -1}, "integer from 0"),
                       ({"method": "slerp"}, "must be one of sum, ties")):
        with pytest.raises(InputError, match=words):
            build_recipe("merge", {**values, **bad})
    dare, _ = build_recipe("apply", {"cp": "cp", "vector": ["v"], "out": "o", "method": "dare_linear", "seed": 9})
    assert dict(dare.params) == {"seed": 9}
    with pytest.raises(InputError, match="unknown key 'method' for extract"):
        build_recipe("extract", {"base": "b", "chat": "c", "out": "o", "method": "ties"})
