"""mergekit files with tokenizer sources, run by mergekit 0.1.5 and by raymerge, compared: the
tokenizer files, the token ids, and every embedding and head row by token.

    python bench/tokenizer_parity.py --mergekit /tmp/mk/bin/mergekit-yaml [--root /tmp/tokpar]

Makes three small Llama checkpoints with word-level tokenizers: a base (64 tokens), a chat model
(the base's, a token `both`, two added chat tokens, a chat template, its own EOS) and a cp (the
base's, seven new-language tokens, `both`); then per configuration (linear over all three with
`tokenizer_source` base / union / cp, task_arithmetic with a `tokens` section, chat templates;
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
            xs = torch.stack([x[va[t]] for t in order]).float()
            ys = torch.stack([y[vb[t]] for t in order]).float()
            rows_differ += int(((xs != ys) & ~(xs.isnan() & ys.isnan())).sum())
        elif y is None or x.shape != y.shape or not torch.equal(x, y):
            others.append(name)
    return (f"tokens {'same' if set(va) == set(vb) else 'DIFFER'}, ids {'same' if va == vb else 'differ'}; "
            f"files differing in bytes: {', '.join(differ_files) or 'none'}; embedding/head elements differing "
            f"by token: {rows_differ}; other tensors differing: {', '.join(others) or 'none'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mergekit", required=True, help="mergekit-yaml of a mergekit 0.1.5 venv")
    p.add_argument("--root", default="/tmp/tokpar")
    args = p.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    models = make_models(os.path.join(args.root, "models"))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    for dtype in ("bfloat16", "float32"):
        for name, extra in CONFIGS.items():
            cfg = os.path.join(args.root, "cfg.yml")
            with open(cfg, "w") as f:
                f.write(f"""merge_method: linear
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
            mk, rm = os.path.join(args.root, "mk"), os.path.join(args.root, "rm")
            shutil.rmtree(mk, ignore_errors=True)
            shutil.rmtree(rm, ignore_errors=True)
            a = subprocess.run([args.mergekit, cfg, mk], capture_output=True, text=True)
            b = subprocess.run([sys.executable, "-m", "raymerge", "run", cfg, "--out", rm, "-q"], capture_output=True,
                               text=True, env=env)
            if a.returncode or b.returncode:
                print(f"{dtype} {name}: mergekit rc {a.returncode}, raymerge rc {b.returncode}: "
                      f"{(a.stderr or b.stderr).strip().splitlines()[-1:]}")
                continue
            print(f"{dtype} {name}: {compare(mk, rm)}", flush=True)


if __name__ == "__main__":
    main()
