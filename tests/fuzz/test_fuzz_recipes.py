"""Fuzzing what a user or a checkpoint's config hands the resolver and the planner: recipes as
mappings (the API, the CLI's flags) and as YAML files, mergekit configurations, config.json's
fields, and the tensor names a scale schedule reads layer numbers from."""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raymerge.config import mergekit as mergekit_recipe
from raymerge.config import OPTIONS, build_recipe, load_recipe_file
from raymerge.errors import InputError
from raymerge.methods import COMBINING, MERGEKIT, RECIPES
from raymerge.ops.rules import VOCAB_MODES, is_tied, is_vocab_tensor, tied_embedding, vocab_size
from raymerge.planning.schedule import Scale, count_layers, layer_of
from tests.fuzz.strategies import (
    CONTROL,
    ODD_DIGITS,
    REFUSED,
    attempt,
    big_values,
    fuzz,
    hostile_values,
    json_values,
    keys,
    mostly,
    odd_text,
    pick,
    python_values,
    rarely,
)

# -- recipes as mappings --------------------------------------------------------------------------

# Strings that look like numbers, sizes, seeds or token ids to someone: digits of other scripts,
# superscripts (isdigit() but not int()), runs past Python's int-to-str limit, regexes that are
# costly or invalid to compile.
CONFIG_WORDS = ["\uff11\uff12", "\u0661\u0662", "\u00b2", "\u00b9:\u00b2", "\u0661:\u0662", "9" * 5000, "9" * 40,
                "1e39", "1e-50", "nan", "-inf", "5GB", "5 GiB", "0.5", "-1", "0", "0x10", "1_000", "1:2,1:3", ":",
                "(" * 1000, "(?P<a>", "[", "a{99999999999}", "\\", "auto", "", "merge", "yes", "\U0001d7d7GB"]
config_values = st.one_of(python_values, big_values, pick(CONFIG_WORDS),
                          st.lists(pick(CONFIG_WORDS), max_size=3))

urls = st.sampled_from(["/m/a", "/m/b", "s3://bucket/m", "hf://org/name", "./m"])
f32 = st.one_of(st.floats(-4.0, 4.0), st.sampled_from([0.0, 1.0, 3.4e38, -3.4e38, 1e-45]))
schedules = st.one_of(
    f32, st.lists(f32, min_size=1, max_size=4),
    st.fixed_dictionaries({"rules": st.lists(st.fixed_dictionaries(
        {"pattern": st.sampled_from(["mlp", r"\.bias$", "^model", "(", "a{2,1}"]), "scale": f32}), max_size=2)},
        optional={"default": f32}))
PLAUSIBLE = {
    "base": urls, "cp": urls, "out": urls, "chat": st.lists(urls, min_size=1, max_size=3),
    "vector": st.lists(urls, min_size=1, max_size=3), "model": st.lists(urls, min_size=1, max_size=3),
    "scale": st.lists(schedules, min_size=1, max_size=3),
    "density": st.lists(st.one_of(st.floats(0, 1), st.lists(st.floats(0, 1), min_size=1, max_size=3)), max_size=3),
    "method": st.sampled_from(COMBINING), "normalize": st.booleans(), "rescale": st.booleans(), "lambda": f32,
    "seed": st.integers(0, 2**63 - 1), "vocab": st.sampled_from(VOCAB_MODES),
    "skip": st.lists(st.sampled_from(["mlp", r"\.bias$", "lm_head"]), max_size=2),
    "special_tokens": st.sampled_from(["1:2", "32000:2,32001:1", {1: 2}, ["1:2", "3:4"]]),
    "chat_template": st.booleans(), "dtype": st.sampled_from(["bf16", "float32", "F16", "fp16"]),
    "shard_size": st.sampled_from(["5GB", 10**9, "64MiB"]), "item_size": st.sampled_from(["32MiB", 4096]),
    "storage_options": st.sampled_from([{}, '{"anon": true}']), "address": st.just("auto"),
    "workers": st.integers(1, 8), "cpus_per_worker": st.sampled_from([1, 0.5]), "in_flight": st.integers(1, 4),
    "gpus_per_worker": st.sampled_from([0, 0.5, 1]), "worker_resource": st.just("merge"),
    "overwrite": st.booleans(), "resume": st.booleans(), "allow_nonfinite": st.booleans(),
}
KEYS = [o.key for o in OPTIONS]


@st.composite
def recipe_mappings(draw: st.DrawFn, values: st.SearchStrategy = config_values) -> tuple[object, dict]:
    """(kind, values): a recipe kind and the keys it needs with plausible values, some other
    options, then a few of the values made hostile, some keys spelled with '-', some unknown."""
    kind = draw(values) if rarely(draw) else draw(st.sampled_from(list(RECIPES)))
    needed = [o.key for o in OPTIONS if isinstance(kind, str) and o.needed(kind)]
    takes = [o.key for o in OPTIONS if isinstance(kind, str) and o.takes(kind) and not o.flag_only] or KEYS
    chosen = needed + draw(st.lists(st.sampled_from(takes), max_size=5))
    if rarely(draw):
        chosen.append(draw(st.sampled_from(KEYS)))  # one the kind may not take
    out: dict = {}
    for key in chosen:
        hostile = rarely(draw, 6) or key not in PLAUSIBLE
        out[key] = draw(values) if hostile else draw(PLAUSIBLE[key])
    out = {k.replace("_", "-") if rarely(draw) else k: v for k, v in out.items()}
    if rarely(draw):
        out[draw(st.one_of(keys, st.integers(), st.none()))] = draw(values)
    return kind, out


@fuzz(1500)
@given(recipe_mappings())
def test_recipe_mappings_raise_only_input_errors(recipe):
    """Guards against a recipe value of the wrong type or range (huge integers, non-ASCII
    digits, NaN, nested lists and dicts, bad regexes, bools for numbers) escaping build_recipe
    as anything but one InputError line: the API and the CLI hand it whatever they were given."""
    kind, values = recipe
    attempt(InputError, build_recipe, kind, values)


# -- recipes as YAML files ------------------------------------------------------------------------

def _bomb(levels: int) -> str:
    """A YAML flow list whose aliases expand to 10 ** (levels + 1) leaves (a 'billion laughs'):
    cheap to parse, costly to print whole."""
    text = "&a0 [x, x, x, x, x, x, x, x, x, x]"
    for k in range(1, levels + 1):
        text = f"&a{k} [{text}, " + ", ".join([f"*a{k - 1}"] * 9) + "]"
    return text


YAML_VALUES = ["2001-13-45", "2001-02-30 25:61:00", "0x" + "f" * 4000, "9" * 5000, "-" + "9" * 4400, "0b" + "1" * 20000,
               "1:2:3:4:5:6:7:8:9", ".nan", "-.inf", "!!binary 'AAAA'", "!!binary '%%%'",
               "!!python/object:os.system {}",
               "!!python/name:os.system", "!!timestamp nope", "!!int x", "!!float x", "!!set {a, b}", "!!omap [a: 1]",
               "!!str", "~", "&r [*r]", "[" * 100 + "]" * 100, "[" * 400, "{" * 50, "'\\x00'", '"\\ud800"',
               '"\\x1b[2J"',
               "yes", "on", "No", "|\n  multi\n  line", "*undefined", "? [a]\n: b", "{[1]: 2}", "{a: 1, a: 2}",
               "@reserved", "`x`", "%YAML 1.1", "\t1", '"\u0661\u0662"', "\u00b2", "1e39", "1_000"]
yaml_values = st.one_of(
    pick(YAML_VALUES),
    st.builds(_bomb, st.sampled_from([2, 4, 5])),
    st.builds(lambda v: json.dumps(v, ensure_ascii=False), json_values))


@st.composite
def yaml_files(draw: st.DrawFn) -> bytes:
    """A near-valid recipe file: a raymerge recipe or a mergekit configuration written as YAML
    (JSON flow values, one key a line), some values replaced by hostile YAML (aliases that
    expand exponentially, impossible dates, integers past Python's limit, unsafe tags, deep
    nesting), some bytes broken (non-UTF-8, BOMs, control characters)."""
    if rarely(draw, 4):
        data = draw(mergekit_configs())
    else:
        kind, data = draw(recipe_mappings(st.one_of(json_values, big_values)))
        data = data if rarely(draw) else {"kind": kind, **data}
    lines = []
    for key, value in data.items():
        if rarely(draw, 6):
            text = draw(yaml_values)
        else:
            text = json.dumps(value, ensure_ascii=False, allow_nan=True, default=str)
        lines.append(f"{json.dumps(key, default=str)}: {text}")
    if rarely(draw):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(
            ["---", "...", "%TAG ! tag:x,2000:", "- list item", "  indented: 1", "key without value", ":", "\t",
             "&anchor", "*alias"])))
    raw = "\n".join(lines).encode("utf-8", "surrogatepass")
    how = draw(st.sampled_from(["same"] * 8 + ["bom", "bad", "control", "empty"]))
    if how == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif how == "bad" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])) + raw[at:]
    elif how == "control":
        raw += draw(st.sampled_from(CONTROL)).encode("utf-8", "surrogatepass")
    elif how == "empty":
        raw = draw(st.sampled_from([b"", b"~", b"[]", b"3", b"kind:", b"kind: [merge]"]))
    return raw


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-recipes") / "recipe.yaml"


@fuzz(500)
@given(raw=yaml_files())
def test_recipe_files_raise_only_input_errors(recipe_path, raw):
    """Guards against a recipe file's YAML (aliases expanding exponentially, dates that do not
    exist, integers Python will not convert, tags of unsafe types, non-UTF-8 bytes, deep nesting)
    escaping load_recipe_file as anything but one InputError line, within the time bound."""
    recipe_path.write_bytes(raw)
    attempt(InputError, load_recipe_file, str(recipe_path))


# -- mergekit configurations ----------------------------------------------------------------------

refs = mostly(urls, st.one_of(
    pick(["org/name", "org/name@main", "/models/a", "./a", "~/a", "s3://b/a", "hf://org/a", "a+lora", "org/a+org/lora",
          "", "a b", "org/na\x00me", "x" * 5000, "org/" + "n" * 700, "C:\\models\\a"]),
    odd_text, hostile_values), odds=2)
mk_numbers = mostly(st.one_of(st.floats(-2, 2), st.integers(-2, 3)),
                    st.one_of(st.sampled_from([True, "0.5", 1e39, 10**39]), hostile_values), odds=3)
mk_settings = st.one_of(
    mk_numbers, st.lists(mk_numbers, max_size=4),
    st.lists(st.fixed_dictionaries({"value": mk_numbers},
                                   optional={"filter": st.one_of(st.sampled_from(["mlp", "self_attn", "*", ".*"]),
                                                                 st.none(), odd_text, hostile_values)}), max_size=3),
    st.lists(st.dictionaries(st.sampled_from(["filter", "value", "other"]), mk_numbers, max_size=3), max_size=2))
mk_parameters = mostly(
    st.fixed_dictionaries({"weight": mk_settings}, optional={"density": mk_settings}),
    st.one_of(st.dictionaries(st.sampled_from(["weight", "density", "normalize", "rescale", "lambda", "int8_mask",
                                               "epsilon", "t", "gamma", "select_topk", "r"]), mk_settings, max_size=4),
              hostile_values), odds=2)
mk_models = mostly(st.fixed_dictionaries({"model": refs, "parameters": mk_parameters}),
                   st.one_of(st.fixed_dictionaries({"model": refs}), st.dictionaries(keys, hostile_values, max_size=2)))
MK_OPTIONAL = {"parameters": mk_parameters,
               "dtype": st.sampled_from(["bfloat16", "float16", "float32", "f32", "int8", 5]),
               "out_dtype": st.sampled_from(["bfloat16", "float32", "bogus", None, ["bf16"]]),
               "tokenizer_source": st.sampled_from(["base", "base", "union", None, 5]), "name": odd_text}


@st.composite
def mergekit_configs(draw: st.DrawFn) -> dict:
    """A near-valid mergekit configuration: a supported method, a base model, models with weights
    and densities that are numbers, gradients or filters, each part now and then hostile."""
    data = {"merge_method": draw(mostly(st.sampled_from(MERGEKIT), st.one_of(st.sampled_from(
                ["slerp", "model_soup", "della_ties", "TIES", "passthrough"]), hostile_values))),
            "models": draw(mostly(st.lists(mk_models, min_size=1, max_size=3), hostile_values))}
    if not rarely(draw, 6):
        data["base_model"] = draw(refs)
    for key, strategy in MK_OPTIONAL.items():
        if draw(st.booleans()):
            data[key] = draw(strategy)
    if rarely(draw):
        data[draw(st.one_of(st.sampled_from(["slices", "extra", "base"]), keys))] = draw(hostile_values)
    return data


@fuzz(1500)
@given(mergekit_configs())
def test_mergekit_configs_raise_only_input_errors(data):
    """Guards against a mergekit configuration (unsupported methods, models that are not
    references, parameters that are numbers, gradients, filters or none of them) escaping
    recipe_values, or the recipe it maps to escaping build_recipe, as anything but one
    InputError line."""
    where = "recipe /m/merge.yaml"
    got = attempt(InputError, mergekit_recipe.recipe_values, data, where)
    if got is not REFUSED:
        kind, values = got
        attempt(InputError, build_recipe, kind, values, where)


# -- config.json and tensor names -----------------------------------------------------------------

CONFIG_KEYS = ["vocab_size", "text_config", "tie_word_embeddings", "num_hidden_layers", "n_layer", "num_layers"]
config_numbers = st.one_of(hostile_values, st.sampled_from([0, 1, -1, 32000, 2**62, 10**39, True, 1.5, "32000"]))
config_jsons = st.one_of(
    st.dictionaries(st.sampled_from(CONFIG_KEYS), st.one_of(
        config_numbers, st.dictionaries(st.sampled_from(CONFIG_KEYS), config_numbers, max_size=3)), max_size=5),
    st.dictionaries(keys, hostile_values, max_size=4), st.none())
plain_names = st.lists(st.sampled_from(["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.weight",
                                        "model.layers.31.self_attn.q_proj.weight", "model.norm.weight"]), max_size=4)


@fuzz(2000)
@given(config_jsons, plain_names, st.integers(0, 2**40))
def test_config_json_fields_never_raise(config, names, rows):
    """Guards against a config.json of any shape (vocab_size or layer counts of the wrong type,
    a text_config that is not an object, a tie flag of any type) making the resolver's or the
    planner's use of it raise: every one of these reads has a sound answer for any object."""
    v = vocab_size(config)
    assert v is None or (type(v) is int and v > 0)
    assert is_tied(config) in (True, False)
    n = count_layers(names, config)
    assert type(n) is int and n >= 1
    assert is_vocab_tensor("model.layers.0.mlp.weight", (rows, 8), config) in (True, False)
    embed = "model.embed_tokens.weight"
    assert tied_embedding("lm_head.weight", {embed: 0}, config) in (None, embed)


_SURROGATE = re.compile("[\ud800-\udfff]")
digit_runs = st.one_of(st.integers(0, 200).map(str), pick(
    ["0" * 50, "1" * 309, "1" * 310, "9" * 400, "9" * 4400, "0" * 5000, "\u0661" * 400, "\u0661" * 5000, "\U0001d7d7",
     "\u00b2", *ODD_DIGITS]))
layer_names = st.one_of(
    st.builds(lambda pre, digits, post: pre + digits + post,
              st.sampled_from(["model.layers.", "h.", "transformer.h.", "blocks.", "layer.", "x.layers.", "layers.",
                               ""]),
              digit_runs, st.sampled_from([".mlp.weight", ".", "", "\n.x", ".\x00", ".layers.7."])),
    odd_text).filter(lambda s: not _SURROGATE.search(s))  # names come from parse_json, which refuses lone ones
# What parse_scale keeps: 0, or a magnitude float32 holds (neither overflows nor rounds to 0).
f32_values = st.one_of(st.floats(-3.4e38, 3.4e38).filter(lambda x: x == 0 or abs(x) >= 1e-37),
                       st.sampled_from([0.0, -0.0, 1.0, 1e-45, -3.4e38]))
values = st.one_of(f32_values, st.lists(f32_values, min_size=1, max_size=5))
schedule_jsons = st.one_of(values, st.fixed_dictionaries(
    {"rules": st.lists(st.fixed_dictionaries({"pattern": st.sampled_from(["mlp", r"\.bias$", "^model", r"layers\.1"]),
                                              "scale": values}), max_size=3), "default": values}))


def scale_of(schedule: object) -> Scale:
    """The Scale a recipe's `scale: [schedule]` makes (built as the planner gets it, whatever its
    fields are); every generated schedule is a valid one."""
    recipe, _ = build_recipe("merge", {"base": "/m/b", "chat": ["/m/c"], "cp": "/m/p", "scale": [schedule]})
    return recipe.vectors[0][1]


layer_counts = st.one_of(st.integers(1, 200), st.sampled_from([1, 2, 2**62, 10**39]))


@fuzz(2000)
@given(layer_names, schedule_jsons, layer_counts, st.lists(layer_names, max_size=3))
def test_schedules_read_any_tensor_name_without_raising(name, schedule, layers, names):
    """Guards against a tensor name from an untrusted header (a layer number of thousands of
    digits, digits of other scripts, control characters) making layer_of, count_layers or a
    scale schedule raise (int() past its digit limit, an int too large to divide as a float)."""
    layer = layer_of(name)
    assert layer is None or (type(layer) is int and layer >= 0)
    assert type(count_layers([name, *names], None)) is int
    x = scale_of(schedule).at(name, layers)
    assert isinstance(x, float) and math.isfinite(x)
