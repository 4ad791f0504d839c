"""mergekit files with tokenizer sources, run by mergekit 0.1.5 and by raymerge, compared: the
tokenizer files, the token ids, and every embedding and head row by token.

    python bench/tokenizer_parity.py --mergekit /tmp/mk/bin/mergekit-yaml [--root /tmp/tokpar]
    python bench/tokenizer_parity.py --mergekit /tmp/mk/bin/mergekit-yaml --templates

Makes three small Llama checkpoints with word-level tokenizers: a base (64 tokens), a chat model
(the base's, a token `both`, two added chat tokens, a chat template, its own EOS) and a cp (the
base's, seven new-language tokens, `both`); then per configuration (linear over all three with
`tokenizer_source` base / union / cp, a `tokens` section, chat templates, pad_to_multiple_of;
bfloat16 and float32) prints: whether the token sets and ids are the same, which tokenizer files
differ in bytes, how many embedding/head elements differ when rows are matched by token, and
whether every other tensor is identical.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

from raymerge.synth import LlamaShape, make_trio, word_tokenizer

SPECIALS = ["<unk>", "<s>", "</s>"]
WORDS = [f"w{i}" for i in range(61)]
NEW = [f"한{i}" for i in range(7)]
CHAT_ADDED = ["<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "config.json")

CONFIGS = {
    "linear, tokenizer_source: base": "tokenizer_source: base\n",
    "linear, tokenizer_source: union": "tokenizer_source: union\n",
    "linear, tokenizer_source: cp": "tokenizer_source: {cp}\n",
    "linear, tokenizer: tokens (forced, zero, model_token)": """tokenizer:
  source: base
  tokens:
    "</s>": {{source: {chat}, force: true}}
    "<pad>": {{source: {{kind: zero}}}}
    "<sep>": {{source: {{kind: model_token, model: {cp}, token: 한3}}}}
""",
    "linear, tokenizer_source: base, chat_template literal": 'tokenizer_source: base\nchat_template: "{{{{ \'x: \' + '
                                                             'messages[0].content }}}}"\n',
    "linear, tokenizer_source: union, chat_template auto": "tokenizer_source: union\nchat_template: auto\n",
    "linear, tokenizer_source: base, chat_template chatml (named)": "tokenizer_source: base\nchat_template: chatml\n",
    "linear, tokenizer: union, pad_to_multiple_of 32": "tokenizer:\n  source: union\n  pad_to_multiple_of: 32\n",
    "linear, tokenizer: base, tokens (forced zero), pad_to_multiple_of 48": """tokenizer:
  source: base
  pad_to_multiple_of: 48
  tokens:
    "</s>": {{source: {{kind: zero}}, force: true}}
""",
}


def make_models(root: str) -> dict[str, str]:
    """base/chat/cp: synth checkpoints of 64, 67 and 72 vocabulary rows with their tokenizers."""
    out = {}
    for role, rows, seed in (("base", 64, 1), ("chat", 67, 2), ("cp", 72, 3)):
        shape = LlamaShape(hidden=64, layers=2, vocab=rows, intermediate=128, heads=4, kv_heads=2)
        out[role] = make_trio(os.path.join(root, role + "-t"), shape, seed=seed)["base"]
    base = SPECIALS + WORDS
    word_tokenizer(out["base"], base, [])
    word_tokenizer(out["chat"], base + ["both"], CHAT_ADDED, TEMPLATE, eos="<|im_end|>")
    word_tokenizer(out["cp"], base + NEW + ["both"], [])
    return out


def _load(folder: str) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}
    for f in glob.glob(os.path.join(folder, "*.safetensors")):
        t.update(load_file(f))
    return t


def compare(mk: str, rm: str) -> str:
    from transformers import AutoTokenizer

    va, vb = AutoTokenizer.from_pretrained(mk).get_vocab(), AutoTokenizer.from_pretrained(rm).get_vocab()
    differ_files = [n for n in FILES if os.path.exists(os.path.join(mk, n)) != os.path.exists(os.path.join(rm, n))
                    or (os.path.exists(os.path.join(mk, n))
                        and open(os.path.join(mk, n), "rb").read() != open(os.path.join(rm, n), "rb").read())]
    ta, tb = _load(mk), _load(rm)
    rows_differ, others = 0, []
    order = sorted(va, key=va.get)
    for name in sorted(ta):
        x, y = ta[name], tb.get(name)
        if name in VOCAB and set(va) == set(vb):
            # rows by token, then the padding rows past the tokens (pad_to_multiple_of) in order
            xs = torch.cat([torch.stack([x[va[t]] for t in order]), x[len(va):]]).float()
            ys = torch.cat([torch.stack([y[vb[t]] for t in order]), y[len(vb):]]).float()
            if xs.shape != ys.shape:
                others.append(f"{name} (rows {x.shape[0]} vs {y.shape[0]})")
                continue
            rows_differ += int(((xs != ys) & ~(xs.isnan() & ys.isnan())).sum())
        elif y is None or x.shape != y.shape or not torch.equal(x, y):
            others.append(name)
    return (f"tokens {'same' if set(va) == set(vb) else 'DIFFER'}, ids {'same' if va == vb else 'differ'}; "
            f"files differing in bytes: {', '.join(differ_files) or 'none'}; embedding/head elements differing "
            f"by token: {rows_differ}; other tensors differing: {', '.join(others) or 'none'}")


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": " be nice "}, {"role": "user", "content": " hi there \n"},
     {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "bye"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": " a "}],
    [{"role": "system", "content": "s1"}, {"role": "system", "content": "s2"}, {"role": "user_context", "content": "c"},
     {"role": "user", "content": "u"}],
    [{"role": "assistant", "content": "first"}, {"role": "user", "content": ""}],
    [{"role": "user", "content": "한국어 텍스트"}, {"role": "assistant", "content": "네"}, {"role": "user", "content": "x"}],
]


def bpe_tokenizer(folder: str, size: int, added: list[str]) -> None:
    """A Llama BPE tokenizer of `size` tokens (<unk>, <s>, </s>, _tok_3...), no merges, with
    `added` tokens after them (not special): the tokenizers of mergekit's own tokenizer tests."""
    import json
    import tempfile

    import tokenizers
    from transformers import LlamaTokenizerFast

    tokens = (["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, size)])[:size]
    state = {"version": "1.0", "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": []},
             "added_tokens": []}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers.Tokenizer.from_str(json.dumps(state)).save(os.path.join(tmp, "tokenizer.json"))
        tok = LlamaTokenizerFast(tokenizer_file=os.path.join(tmp, "tokenizer.json"))
    tok.add_tokens(added)
    tok.save_pretrained(folder)


def suite_models(root: str) -> dict[str, str]:
    """mergekit 0.1.5's tokenizer test models: base (64 rows and tokens), padded (64 rows; four
    unused tokens added past them), chatml (66 rows: two chat tokens added), b (no tokenizer)."""
    out = {}
    for role, rows, added, seed in (("base", 64, None, 1), ("padded", 64, [f"<UNUSED_{i}>" for i in range(4)], 2),
                                    ("chatml", 66, ["<|im_start|>", "<|im_end|>"], 3), ("b", 64, None, 4)):
        shape = LlamaShape(hidden=64, layers=2, vocab=rows, intermediate=128, heads=4, kv_heads=2)
        out[role] = make_trio(os.path.join(root, role + "-t"), shape, seed=seed)["base"]
        if role != "b":
            bpe_tokenizer(out[role], 64, added or [])
    return out


def _listed(models: list[str], method: str = "linear", base: str | None = None, extra: str = "",
            dtype: str = "float32", weight: float = 1.0) -> str:
    text = f"merge_method: {method}\n" + (f"base_model: {base}\n" if base else "") + "models:\n"
    text += "".join(f"  - model: {m}\n    parameters: {{weight: {weight}}}\n" for m in models)
    return text + f"dtype: {dtype}\n" + extra


def suite_configs(m: dict[str, str]) -> dict[str, str]:
    """The configurations of mergekit 0.1.5's tests/test_tokenizer.py and test_chat_template.py."""
    three = [m["base"], m["padded"], m["chatml"]]
    return {
        "legacy (no tokenizer_source)": _listed(three, base=m["base"]),
        "source base": _listed(three, base=m["base"], extra="tokenizer_source: base\n"),
        "source union": _listed(three, base=m["base"], extra="tokenizer_source: union\n"),
        "source model (chatml)": _listed(three, base=m["base"], extra=f"tokenizer_source: {m['chatml']}\n"),
        "slerp union": _listed([m["base"], m["chatml"]], "slerp", m["base"],
                               "tokenizer_source: union\nparameters: {t: 0.5}\n"),
        "force token": _listed([m["base"], m["chatml"]], base=m["base"], extra=(
            f"tokenizer:\n  source: union\n  tokens:\n    _tok_10: {{source: {m['chatml']}, force: true}}\n"
            f"    _tok_11: {{source: {m['base']}, force: true}}\n")),
        "model_token id and token": _listed([m["base"], m["chatml"]], base=m["base"], extra=(
            f"tokenizer:\n  source: base\n  tokens:\n    _tok_20: {{source: {{kind: model_token, model: {m['chatml']}, "
            f"token_id: 64}}, force: true}}\n    _tok_21: {{source: {{kind: model_token, model: {m['base']}, "
            "token: <s>}, force: true}\n")),
        "passthrough slices, union (beyond mergekit's tests)": (
            f"merge_method: passthrough\nslices:\n  - sources: [{{model: {m['chatml']}, layer_range: [0, 1]}}]\n"
            f"  - sources: [{{model: {m['base']}, layer_range: [1, 2]}}]\ndtype: float32\ntokenizer_source: union\n"),
        "slerp slices, union (beyond mergekit's tests)": (
            f"merge_method: slerp\nbase_model: {m['base']}\nslices:\n  - sources:\n"
            f"      - {{model: {m['base']}, layer_range: [0, 2]}}\n      - {{model: {m['chatml']}, layer_range: [0, 2]}}\n"
            "parameters: {t: 0.5}\ndtype: bfloat16\ntokenizer_source: union\n"),
        "pad_to_multiple_of 16": _listed([m["chatml"]], base=m["chatml"],
                                         extra="tokenizer:\n  source: base\n  pad_to_multiple_of: 16\n"),
        "chat_template chatml": _listed([m["base"], m["b"]], base=m["base"], extra="chat_template: chatml\n",
                                        dtype="bfloat16", weight=0.5),
        "chat_template literal": _listed([m["base"], m["b"]], base=m["base"], dtype="bfloat16", weight=0.5,
                                         extra="chat_template: \"{{messages[0]['content']}}\"\n"),
    }


def compare_templates(mergekit: str) -> None:
    """Render mergekit's named template files and raymerge's texts of the names over CONVERSATIONS,
    with and without the generation prompt; print per name how many renders differ."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from raymerge.planning.chat_templates import NAMED

    python = os.path.join(os.path.dirname(mergekit), "python")
    folder = subprocess.run([python, "-c", "import mergekit._data.chat_templates as t; print(t.__path__[0])"],
                            capture_output=True, text=True, check=True).stdout.strip()

    def render(template: str, messages: list, prompt: bool) -> str:
        try:
            return render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=prompt,
                                         bos_token="<s>", eos_token="</s>")[0][0]
        except Exception as e:  # noqa: BLE001  (a template's raise_exception: compared as the error's type)
            return f"error {type(e).__name__}"

    for name, ours in NAMED.items():
        theirs = open(os.path.join(folder, name + ".jinja")).read()
        pairs = [(render(theirs, m, g), render(ours, m, g)) for m in CONVERSATIONS for g in (False, True)]
        print(f"template {name}: {sum(a != b for a, b in pairs)} of {len(pairs)} renders differ")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mergekit", required=True, help="mergekit-yaml of a mergekit 0.1.5 venv")
    p.add_argument("--root", default="/tmp/tokpar")
    p.add_argument("--only", help="run the configurations whose name holds this text")
    p.add_argument("--templates", action="store_true", help="compare the named chat templates' renders only")
    p.add_argument("--suite", action="store_true", help="run the configurations of mergekit's own tokenizer and "
                                                        "chat template tests instead")
    args = p.parse_args()
    if args.templates:
        compare_templates(args.mergekit)
        return
    shutil.rmtree(args.root, ignore_errors=True)
    if args.suite:
        for name, text in suite_configs(suite_models(os.path.join(args.root, "models"))).items():
            if not args.only or args.only in name:
                run_both(args, name, text)
        return
    models = make_models(os.path.join(args.root, "models"))
    for dtype in ("bfloat16", "float32"):
        for name, extra in CONFIGS.items():
            if args.only and args.only not in name:
                continue
            run_both(args, f"{dtype} {name}", f"""merge_method: linear
base_model: {models['base']}
models:
  - model: {models['chat']}
    parameters: {{weight: 0.4}}
  - model: {models['cp']}
    parameters: {{weight: 0.6}}
  - model: {models['base']}
    parameters: {{weight: 0.3}}
dtype: {dtype}
""" + extra.format(**models))


def run_both(args: argparse.Namespace, name: str, text: str) -> None:
    """Run one configuration with mergekit and raymerge; print the comparison (or the failures)."""
    cfg = os.path.join(args.root, "cfg.yml")
    with open(cfg, "w") as f:
        f.write(text)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    mk, rm = os.path.join(args.root, "mk"), os.path.join(args.root, "rm")
    shutil.rmtree(mk, ignore_errors=True)
    shutil.rmtree(rm, ignore_errors=True)
    a = subprocess.run([args.mergekit, cfg, mk], capture_output=True, text=True)
    b = subprocess.run([sys.executable, "-m", "raymerge", "run", cfg, "--out", rm, "-q"], capture_output=True,
                       text=True, env=env)
    if a.returncode or b.returncode:
        print(f"{name}: mergekit rc {a.returncode}, raymerge rc {b.returncode}: "
              f"{[(a.stderr or '').strip().splitlines()[-1:], (b.stderr or '').strip().splitlines()[-1:]]}")
        return
    print(f"{name}: {compare(mk, rm)}", flush=True)


if __name__ == "__main__":
    main()
