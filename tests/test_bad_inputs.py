"""The bad-input matrix: every case exits 2 with one line naming what and where, before any
worker starts, with nothing written that looks like a checkpoint and every input byte untouched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

TENSORS = {"model.embed_tokens.weight": (16, 8), "model.layers.0.mlp.up_proj.weight": (8, 8),
           "model.norm.weight": (8,), "lm_head.weight": (16, 8)}


def _ckpt(folder, seed, shapes=TENSORS, dtype=torch.bfloat16):
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file({n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()},
              os.path.join(folder, "model.safetensors"))
    return str(folder)


def _raw(path, header: dict, data: bytes):
    _raw_text(path, json.dumps(header).encode(), data)


def _raw_text(path, text: bytes, data: bytes):
    open(path, "wb").write(struct.pack("<Q", len(text)) + text + data)


def _deep(n=100_000) -> bytes:
    return b"[" * n + b"]" * n


def _surrogate_name(trio):
    """Every input with one more tensor, named by a lone surrogate escape: the inputs line up, so
    without the check it is only found when the output header is serialized, after planning."""
    for seed, folder in enumerate(trio.values()):
        path = os.path.join(folder, "model.safetensors")
        g = torch.Generator().manual_seed(seed)
        save_file({**{n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in TENSORS.items()},
                   "XXXXXX": torch.zeros(2)}, path)
        data = open(path, "rb").read()
        open(path, "wb").write(data.replace(b'"XXXXXX"', b'"\\ud800"'))  # the same length: offsets hold


def _write(path, text: bytes):
    open(path, "wb").write(text)


def _replace_cp(trio, writer):
    os.remove(os.path.join(trio["cp"], "model.safetensors"))
    writer(os.path.join(trio["cp"], "model.safetensors"))


def _index(trio, weight_map):
    os.remove(os.path.join(trio["cp"], "model.safetensors"))
    json.dump({"weight_map": weight_map}, open(os.path.join(trio["cp"], "model.safetensors.index.json"), "w"))


def _shapes(**changes):
    s = dict(TENSORS)
    for k, v in changes.items():
        name = {"up": "model.layers.0.mlp.up_proj.weight", "norm": "model.norm.weight"}[k]
        if v is None:
            del s[name]
        else:
            s[name] = v
    return s


# name -> (how to break the inputs, extra CLI args, expected text)
CASES = {
    "missing input": (lambda t, tmp: shutil.rmtree(t["base"]), [], "--base"),
    "empty input folder": (lambda t, tmp: os.remove(os.path.join(t["chat"], "model.safetensors")), [],
                           "holds no .safetensors"),
    "pickled checkpoint": (lambda t, tmp: (os.remove(os.path.join(t["base"], "model.safetensors")),
                                           open(os.path.join(t["base"], "pytorch_model.bin"), "wb").write(b"PK\x03")),
                           [], "never unpickles"),
    "truncated shard": (lambda t, tmp: _truncate(os.path.join(t["cp"], "model.safetensors")), [], "truncated"),
    "absurd header length": (lambda t, tmp: _replace_cp(t, lambda p: open(p, "wb").write(struct.pack("<Q", 2**60) + b"{}")),
                             [], "cap"),
    "offsets outside the file": (lambda t, tmp: _replace_cp(t, lambda p: _raw(
        p, {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, b"\0" * 16)), [], "--cp"),
    "overlapping tensors": (lambda t, tmp: _replace_cp(t, lambda p: _raw(
        p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24)), [], "overlaps"),
    "header not JSON": (lambda t, tmp: _replace_cp(t, lambda p: open(p, "wb").write(struct.pack("<Q", 6) + b"{oops}")),
                        [], "not valid JSON"),
    "index escapes the folder": (lambda t, tmp: _index(t, {"w": "../../etc/passwd"}), [], "refusing"),
    "index names a missing shard": (lambda t, tmp: _index(t, {"w": "model-00001-of-00002.safetensors"}), [],
                                    "not there"),
    "shape mismatch": (lambda t, tmp: _ckpt(t["chat"], 1, _shapes(up=(8, 9))), [],
                       "model.layers.0.mlp.up_proj.weight: shape [8, 8] in --cp but [8, 9] in --chat"),
    "missing tensor": (lambda t, tmp: _ckpt(t["base"], 0, _shapes(norm=None)), [], "missing from --base: model.norm.weight"),
    "integer tensor where float": (lambda t, tmp: save_file(
        {n: torch.zeros(s, dtype=torch.int32) for n, s in TENSORS.items()}, os.path.join(t["chat"], "model.safetensors")),
        [], "I32 in --chat"),
    "output is an input": (None, ["--out", "{cp}"], "inputs are never modified"),
    "output inside an input": (None, ["--out", "{cp}/merged"], "inputs are never modified"),
    "input inside the output": (None, ["--out", "{root}"], "inputs are never modified"),
    "output is an input through a symlink, with --overwrite": (
        lambda t, tmp: os.symlink(t["cp"], os.path.join(tmp, "out_link")),
        ["--out", "{tmp}/out_link", "--overwrite"], "inputs are never modified"),
    "output holds the inputs through a symlinked parent": (
        lambda t, tmp: os.symlink(os.path.dirname(t["cp"]), os.path.join(tmp, "parent_link")),
        ["--out", "{tmp}/parent_link", "--overwrite"], "inputs are never modified"),
    "output holds a checkpoint": (lambda t, tmp: _ckpt(os.path.join(tmp, "out"), 9), [], "already holds a checkpoint"),
    "output is a file": (lambda t, tmp: open(os.path.join(tmp, "outfile"), "w").write("x"),
                         ["--out", "{tmp}/outfile"], "is a file"),
    "scale nan": (None, ["--scale", "nan"], "--scale"),
    "scale inf": (None, ["--scale", "inf"], "--scale"),
    "scale word": (None, ["--scale", "half"], "--scale 'half': not a number"),
    "two scales one chat": (None, ["--scale", "1", "--scale", "2"], "2 --scale values for 1 --chat"),
    "shard size zero": (None, ["--shard-size", "0"], "--shard-size"),
    "shard size negative": (None, ["--shard-size", "-5GB"], "--shard-size"),
    "item size tiny": (None, ["--item-size", "10"], "--item-size"),
    "workers zero": (None, ["--workers", "0"], "--workers"),
    "workers word": (None, ["--workers", "many"], "--workers"),
    "in-flight zero": (None, ["--in-flight", "0"], "--in-flight"),
    "cpus per worker zero": (None, ["--cpus-per-worker", "0"], "--cpus-per-worker"),
    "dtype not float": (None, ["--dtype", "int8"], "--dtype"),
    "storage options not JSON": (None, ["--storage-options", "endpoint=1"], "--storage-options"),
    "storage options not an object": (None, ["--storage-options", "[1, 2]"], "--storage-options"),
    "resume and overwrite": (None, ["--resume", "--overwrite"], "choose one"),
    "special tokens malformed": (None, ["--special-tokens", "12-3"], "CP_ID:CHAT_ID"),
    "special tokens out of range": (None, ["--special-tokens", "99:1"], "rows"),
    "skip regex invalid": (None, ["--skip", "(["], "not a valid regular expression"),
    "vocab mode unknown": (None, ["--vocab", "sometimes"], "--vocab"),
    "unknown protocol": (None, ["--base", "nosuchproto://x/y"], "nosuchproto"),
    "output protocol unsupported": (None, ["--out", "gs://bucket/out"], "not supported"),
    "dtype a list": (lambda t, tmp: _replace_cp(t, lambda p: _raw(
        p, {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)), [], "unknown dtype ['F32']"),
    "header nested deep": (lambda t, tmp: _replace_cp(t, lambda p: _raw_text(p, b'{"w": ' + _deep() + b"}", b"")),
                           [], "model.safetensors: header refused (nested deeper than 64 levels)"),
    "integer of 5000 digits in a shape": (lambda t, tmp: _replace_cp(t, lambda p: _raw_text(
        p, b'{"w": {"dtype": "F32", "shape": [' + b"7" * 5000 + b'], "data_offsets": [0, 4]}}', b"\0" * 4)),
        [], "header refused (an integer of 5000 digits)"),
    "tensor name a lone surrogate": (lambda t, tmp: _surrogate_name(t), [],
                                     "header refused (a string with a lone surrogate"),
    "config.json nested deep": (lambda t, tmp: _write(os.path.join(t["cp"], "config.json"), _deep()), [],
                                "config.json refused (nested deeper than 64 levels); fix or remove it"),
    "index nested deep": (lambda t, tmp: (os.remove(os.path.join(t["cp"], "model.safetensors")), _write(
        os.path.join(t["cp"], "model.safetensors.index.json"), b'{"weight_map": {"w": ' + _deep() + b"}}")), [],
        "model.safetensors.index.json: refused (nested deeper than 64 levels)"),
    "tokenizer_config.json nested deep": (lambda t, tmp: (
        _write(os.path.join(t["cp"], "tokenizer_config.json"), b'{"eos_token": "</s>"}'),
        _write(os.path.join(t["chat"], "tokenizer_config.json"), b'{"chat_template": ' + _deep() + b"}")), [],
        "tokenizer_config.json refused (nested deeper than 64 levels)"),
    "scale overflows float32": (None, ["--scale", "1e39"], "--scale '1e39': overflows float32"),
    "scale rounds to 0 in float32": (None, ["--scale", "1e-50"], "--scale '1e-50': rounds to 0 in float32"),
}


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-7])


def _digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode() + open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(tmp_path, case):
    breaker, extra, expected = CASES[case]
    root = str(tmp_path / "in")
    trio = {role: _ckpt(os.path.join(root, role), seed) for seed, role in enumerate(("base", "chat", "cp"))}
    if breaker:
        breaker(trio, str(tmp_path))
    before = _digest(root)
    args = {"--base": trio["base"], "--chat": trio["chat"], "--cp": trio["cp"], "--out": str(tmp_path / "out")}
    fmt = {"cp": trio["cp"], "root": root, "tmp": str(tmp_path)}
    extra = [e.format(**fmt) for e in extra]
    for flag in list(args):
        if flag in extra:  # the case replaces this flag's value
            i = extra.index(flag)
            args[flag] = extra.pop(i + 1)
            extra.pop(i)
    cmd = [sys.executable, "-m", "raymerge", "merge", *[x for kv in args.items() for x in kv], *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    _assert_refused(r, expected, root, before)
    out = args["--out"]
    inside_inputs = os.path.realpath(out).startswith(os.path.realpath(root))  # the digest checks those
    if os.path.isdir(out) and case != "output holds a checkpoint" and not inside_inputs:
        assert not [n for n in os.listdir(out) if n.endswith((".safetensors", ".json"))]


def _assert_refused(r: subprocess.CompletedProcess, expected: str, root: str, before: str) -> None:
    """Exit 2, one line naming what and where, no traceback, nothing executed, inputs untouched."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("raymerge: error:"), r.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in r.stderr and "execute:" not in r.stderr
    assert _digest(root) == before  # inputs untouched


# `raymerge run FILE.yaml`: recipe values of the wrong type. name -> (recipe keys, expected text)
RECIPE_CASES = {
    "storage_options a list": ({"storage_options": [1]}, "--storage-options [1]: must be a JSON object"),
    "overwrite the string false": ({"overwrite": "false"}, "overwrite: expected true or false, got 'false'"),
    "resume the string true": ({"resume": "true"}, "resume: expected true or false, got 'true'"),
    "allow_nonfinite a number": ({"allow_nonfinite": 1}, "allow_nonfinite: expected true or false, got 1"),
    "workers in other digits": ({"workers": "٤"}, "--workers '٤': not an integer in ASCII digits 0-9"),
    "item_size a list": ({"item_size": [1]}, "--item-size [1]: not a size"),
    "address a number": ({"address": 5}, "--address 5: a Ray address"),
    "worker_resource a number": ({"worker_resource": 1}, "--worker-resource 1: a Ray resource name"),
    "scale a boolean": ({"scale": True}, "--scale True: not a number"),
    "scale overflows float32": ({"scale": 1e39}, "overflows float32"),
    "dtype a number": ({"dtype": 5}, "--dtype 5: not a dtype name"),
    "kind a list": ({"kind": ["merge"]}, "kind ['merge']: must be one of merge, extract, apply"),
    "a key that is a number": ({1: "x"}, "key 1: keys are option names"),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_bad_recipe_file_exits_2_with_one_line(tmp_path, case):
    import yaml

    values, expected = RECIPE_CASES[case]
    root = str(tmp_path / "in")
    trio = {role: _ckpt(os.path.join(root, role), seed) for seed, role in enumerate(("base", "chat", "cp"))}
    before = _digest(root)
    recipe = {"kind": "merge", **trio, "out": str(tmp_path / "out"), **values}
    path = str(tmp_path / "recipe.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    r = subprocess.run([sys.executable, "-m", "raymerge", "run", path], capture_output=True, text=True, timeout=120)
    _assert_refused(r, f"recipe {path}: ", root, before)
    assert expected in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "out")
