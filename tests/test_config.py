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
    ({"workers": "\u0664"}, "--workers '\u0664': not an integer in ASCII digits 0-9"),  # '4' in Arabic-Indic digits
    ({"workers": 4.0}, "--workers 4.0: not an integer"),
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
    assert [d.to_json() for d in dict(recipe.per_vector)["density"]] == [0.3, [0.1, 0.9]]
    for bad, words in (({"density": [0.5, 0.5]}, "with method sum takes no density; use --method ties"),
                       ({"method": "ties", "seed": 3}, "takes no seed"),
                       ({"method": "ties", "density": [0.5]}, "1 --density values for 2 --chat"),
                       ({"method": "dare_ties", "density": [0.5, -0.1]}, "from 0 to 1"),
                       ({"method": "dare_ties", "seed": -1}, "must be an integer >= 0"),
                       ({"method": "slerp"}, "must be one of sum, ties")):
        with pytest.raises(InputError, match=words):
            build_recipe("merge", {**values, **bad})
    dare, _ = build_recipe("apply", {"cp": "cp", "vector": ["v"], "out": "o", "method": "dare_linear", "seed": 9})
    assert dict(dare.params) == {"seed": 9}
    with pytest.raises(InputError, match="unknown key 'method' for extract"):
        build_recipe("extract", {"base": "b", "chat": "c", "out": "o", "method": "ties"})


# Strict integers: int() and str.isdigit() take '١٢' (Arabic-Indic), '１２' (fullwidth) and '1_000'.
@pytest.mark.parametrize("seed,words", [("\u0661\u0662", "'\u0661\u0662': not an integer in ASCII digits 0-9; write"),
                                        ("\uff11\uff12", "'\uff11\uff12': not an integer in ASCII digits 0-9; write"),
                                        ("1_000", "'1_000': not an integer in ASCII digits 0-9; write"),
                                        ("9" * 5000, "'9999.*: 5000 digits, more than 20; write"),
                                        (2**63, f"{2**63}: must be")])
def test_a_seed_is_ascii_digits_in_range(seed, words):
    with pytest.raises(InputError, match=f"^--seed {words} an integer >= 0 and <= {2**63 - 1}$"):
        build_recipe("apply", {"cp": "cp", "vector": ["v"], "out": "o", "method": "dare_linear", "seed": seed})
    recipe, _ = build_recipe("apply", {"cp": "cp", "vector": ["v"], "out": "o", "method": "dare_linear", "seed": "12"})
    assert dict(recipe.params)["seed"] == 12


def test_a_non_ascii_seed_on_the_command_line_exits_2_in_one_line(tmp_path, capsys):
    from raymerge.cli import main

    path = tmp_path / "r.yaml"  # inputs that do not exist: nothing could run even if the seed passed
    path.write_text(f"kind: apply\ncp: {tmp_path / 'cp'}\nvector: [{tmp_path / 'v'}]\nmethod: dare_linear\n")
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--seed", "\u0661\u0662"]) == 2
    err = capsys.readouterr().err
    assert err == f"raymerge: error: recipe {path}: --seed '\u0661\u0662': not an integer in ASCII digits 0-9; " \
                  f"write an integer >= 0 and <= {2**63 - 1}\n"


@pytest.mark.parametrize("flags,message", [
    (["--workers", "1_0"], "--workers '1_0': not an integer in ASCII digits 0-9; write an integer >= 1 and <= 100000"),
    (["--in-flight", "\u0662"], "--in-flight '\u0662': not an integer in ASCII digits 0-9; write an integer >= 1 and "
                                "<= 1000"),
    (["--workers", "0"], "--workers 0: must be an integer >= 1 and <= 100000"),
    (["--method", "dare_ties", "--seed", "-1"], f"--seed -1: must be an integer >= 0 and <= {2**63 - 1}"),
])
def test_integer_flags_exit_2_in_one_line(tmp_path, flags, message, capsys):
    from raymerge.cli import main

    missing = [str(tmp_path / role) for role in ("base", "chat", "cp")]  # nothing could run even if the flag passed
    argv = ["merge", "--base", missing[0], "--chat", missing[1], "--cp", missing[2], "--out", str(tmp_path / "o")]
    assert main([*argv, *flags]) == 2
    assert capsys.readouterr().err == f"raymerge: error: {message}\n"


def test_the_demos_workers_flag_is_checked_as_merges(tmp_path):
    from raymerge.cli import build_parser
    from raymerge.demo import run_demo

    assert build_parser().parse_args(["demo", "--workers", "\uff14"]).workers == "\uff14"  # text, for merge to check
    with pytest.raises(InputError, match="^--workers '\uff14': not an integer in ASCII digits 0-9"):
        run_demo(str(tmp_path), "\uff14")  # refused before any Ray starts


def test_verify_recompute_is_a_strict_count(tmp_path, capsys):
    from raymerge.cli import main

    assert main(["verify", str(tmp_path / "nothing"), "--recompute", "\u0663"]) == 2
    assert capsys.readouterr().err == "raymerge: error: --recompute '\u0663': not an integer in ASCII digits 0-9; " \
                                      f"write an integer >= 0 and <= {2**31 - 1}\n"


def test_counts_take_their_digits_and_stay_in_their_range():
    assert RunOptions.parse(workers="3", in_flight=4) == RunOptions(workers=3, in_flight=4)
    for values, words in (({"workers": 100_001}, "--workers 100001: must be an integer >= 1 and <= 100000"),
                          ({"in_flight": 0}, "--in-flight 0: must be an integer >= 1 and <= 1000"),
                          ({"in_flight": True}, "--in-flight True: not an integer")):
        with pytest.raises(InputError, match=words):
            RunOptions.parse(**values)


@pytest.mark.parametrize("value,words", [("\uff15GB", "not a size"), ("5\u2003GB", "not a size"),
                                         ("1" * 2000, "not a size"), (10**5000, "too large"),
                                         (-(10**5000), "must be a positive size")],
                         ids=["fullwidth digit", "em space", "2000 digits", "huge int", "huge negative int"])
def test_sizes_are_ascii_and_bounded(value, words):
    from raymerge.config import parse_size

    with pytest.raises(InputError, match=f"^--shard-size .*: {words}"):
        parse_size(value, "--shard-size")
    assert parse_size(" 64MiB ", "--shard-size") == 64 * 2**20


@pytest.mark.parametrize("value", ["\uff11.5", "1_0.5", "\u0661", "0x1p3"])
def test_numbers_are_ascii(value):
    with pytest.raises(InputError, match="not a number"):
        parse_number(value, "--scale")
    assert parse_number(" -1.5e3 ", "--scale") == -1500.0


@pytest.mark.parametrize("value,words", [
    ("\u0661:2", r"--special-tokens '\u0661:2': token id '\u0661': not an integer in ASCII digits"),
    ("2147483648:1", r"--special-tokens '2147483648:1': token id 2147483648: must be an integer >= 0 and "
                     r"<= 2147483647"),
    ("9" * 5000 + ":1", "token id '9999.*: 5000 digits"),
    ({10**5000: 1}, r"token id '<an integer of [0-9]+ [a-z]+>': not an integer"),
], ids=["arabic-indic digit", "2**31", "5000 digits", "huge int key"])
def test_special_token_ids_are_ascii_and_below_2_to_the_31(value, words):
    with pytest.raises(InputError, match=words):
        build_recipe("merge", {**TRIO, "special_tokens": value})
    assert build_recipe("merge", {**TRIO, "special_tokens": {32000: 2}})[0].special_tokens == ((32000, 2),)


def _recipe_file(tmp_path, text: bytes) -> str:
    path = tmp_path / "r.yaml"
    path.write_bytes(text)
    return str(path)


def test_a_recipe_whose_aliases_expand_past_the_bound_is_refused_quickly(tmp_path):
    import time

    from raymerge.config import load_recipe_file

    # A million strings when expanded: small enough that a walk of it (old code's repr) ends.
    lists = b"".join(f"{c}: &{c} [{','.join(['*' + p] * 10)}]\n".encode() for p, c in zip("abcde", "bcdef"))
    path = _recipe_file(tmp_path, b"kind: merge\na: &a [x,x,x,x,x,x,x,x,x,x]\n" + lists + b"skip: *f\n")
    started = time.perf_counter()
    with pytest.raises(InputError, match=f"^recipe {path}: more than 100000 nodes with its aliases expanded"):
        load_recipe_file(path)
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize("text,words", [
    (b"kind: merge\nscale: " + b"[" * 100 + b"]" * 100 + b"\n", "nested deeper than 64 levels"),
    (b"kind: merge\nseed: " + b"9" * 5000 + b"\n", "an integer of 5000 characters"),
    (b"kind: merge\nbase: &b [*b]\n", r"alias \*'b' names no complete node"),
])
def test_recipe_files_are_bounded_yaml(tmp_path, text, words):
    from raymerge.config import load_recipe_file

    path = _recipe_file(tmp_path, text)
    with pytest.raises(InputError, match=f"^recipe {path}: {words}"):
        load_recipe_file(path)


def test_a_fifo_as_the_recipe_is_refused_without_blocking(tmp_path):
    import os

    from raymerge.config import load_recipe_file
    from tests.test_bounds import assert_refused_without_blocking

    fifo = str(tmp_path / "r.yaml")
    os.mkfifo(fifo)
    assert_refused_without_blocking(lambda: load_recipe_file(fifo), fifo,
                                    f"recipe {fifo}: is a FIFO, not a regular file; give the path of a recipe file")
