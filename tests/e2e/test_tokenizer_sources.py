"""mergekit's tokenizer sources end to end: a base model, a chat model with chat tokens added and a
cp model with new-language tokens; the output tokenizer and every embedding and head row checked
against a reference built in the test from the token strings (mergekit 0.1.5's rules)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from raymerge.synth import word_tokenizer
from tests.conftest import make_llama_trio
from tests.helpers import assert_bit_identical, load_folder, mergekit_file

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
SPECIALS = ["<unk>", "<s>", "</s>"]
WORDS = [f"w{i}" for i in range(61)]
NEW = [f"한{i}" for i in range(7)]  # cp's new-language tokens
CHAT_ADDED = ["<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base: 64 tokens; chat: base's, `both`, two chat tokens (67 rows); cp: base's, seven new
    tokens, `both` (72 rows)."""
    root = str(tmp_path_factory.mktemp("toksrc"))
    out = make_llama_trio(root, roles=("base",), vocab=64, seed=9)
    for role, extra in (("chat", 3), ("cp", 8)):
        made = make_llama_trio(os.path.join(root, role + "-x"), roles=("cp",), vocab=64, seed=9, cp_extra_rows=extra)
        out[role] = os.path.join(root, role)
        shutil.move(made["cp"], out[role])
    base_vocab = SPECIALS + WORDS
    word_tokenizer(out["base"], base_vocab, [])
    word_tokenizer(out["chat"], base_vocab + ["both"], CHAT_ADDED, TEMPLATE, eos="<|im_end|>")
    word_tokenizer(out["cp"], base_vocab + NEW + ["both"], [])
    return out


def _vocab(folder: str) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def _rows(tensors: dict, name: str, vocab_out: dict[str, int], models: dict[str, dict], vocabs: dict,
          base: str | None, forced: dict[str, tuple[str, str]] = {}) -> dict[str, torch.Tensor]:
    """Each model's tensor in the output's vocabulary, by token (mergekit's PermutedVocabulary)."""
    out = {}
    tensors = {role: {name: t[name].float()} for role, t in tensors.items()}  # the file's dtype: float32
    for role in models:
        rows = torch.zeros(len(vocab_out), tensors[role][name].shape[1], dtype=torch.float32)
        for token, r in vocab_out.items():
            if token in vocabs[role] and token not in forced:
                rows[r] = tensors[role][name][vocabs[role][token]]
                continue
            if token in forced:
                kind, src = forced[token]
                if kind == "zero":
                    continue
                rows[r] = tensors[src][name][vocabs[src][token]]
                continue
            having = [m for m in models if token in vocabs[m]]
            if len(having) == 1 or (base in having):
                donor = having[0] if len(having) == 1 else base
                rows[r] = tensors[donor][name][vocabs[donor][token]]
            elif having:
                acc = torch.zeros_like(rows[r])
                for m in having:
                    acc = acc + tensors[m][name][vocabs[m][token]]
                acc /= len(having)
                rows[r] = acc
        out[role] = rows
    return out


@pytest.fixture
def run(cli_main, capsys):
    """`raymerge run FILE --out OUT ...` in this process, on the session's Ray."""
    def go(path: str, out: str, *flags: str) -> None:
        assert cli_main(["run", path, "--out", out, *flags]) == 0, capsys.readouterr().err
    return go


def test_union_maps_every_row_by_token(ray_local, models, tmp_path, run):
    """linear over chat and cp with the base's tokenizer made the union of all three: cp's new
    tokens and `both` (in chat and cp: their mean) and chat's tokens each get rows in every model."""
    path = mergekit_file(tmp_path, f"""merge_method: linear
base_model: {models['base']}
models:
  - model: {models['chat']}
    parameters: {{weight: 0.4}}
  - model: {models['cp']}
    parameters: {{weight: 0.6}}
dtype: float32
tokenizer_source: union
""")
    out = str(tmp_path / "out")
    run(path, out)
    vocab_out = _vocab(out)
    base_vocab = SPECIALS + WORDS
    assert [t for t, _ in sorted(vocab_out.items(), key=lambda kv: kv[1])] == \
        base_vocab + ["both"] + NEW + CHAT_ADDED
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == len(vocab_out) == 74
    tensors = {role: load_folder(folder) for role, folder in models.items()}
    vocabs = {role: _vocab(folder) for role, folder in models.items()}
    got = load_folder(out)
    for name in VOCAB:
        rows = _rows(tensors, name, vocab_out, {"chat": 1, "cp": 1}, vocabs, None)
        weight = torch.tensor([[0.4, 0.6]], dtype=torch.float32)  # mergekit's linear: a batch of one
        want = torch.zeros_like(rows["chat"])
        for t, c in zip((rows["chat"], rows["cp"]), weight.unbind(1)):
            want.addcmul_(t, c.reshape(()))
        want.div_(weight.sum(dim=1).reshape(()))
        assert_bit_identical({name: got[name]}, {name: want})
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(out)
    text = "w3 한2 both <|im_start|>"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    _, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_pad_to_multiple_of_rows_are_each_models_mean_row(ray_local, models, tmp_path, run):
    """tokenizer.pad_to_multiple_of 32: the union's 74 tokens padded to 96 rows (config.json too);
    each model's rows 74.. are torch.mean of its 74 mapped rows, then merged like any row. The
    same bytes with 4 KiB items on two workers (the mean rows' worker streams every earlier row)."""
    path = mergekit_file(tmp_path, f"""merge_method: linear
base_model: {models['base']}
models:
  - model: {models['chat']}
    parameters: {{weight: 0.4}}
  - model: {models['cp']}
    parameters: {{weight: 0.6}}
dtype: float32
tokenizer:
  source: union
  pad_to_multiple_of: 32
""")
    out, cut = str(tmp_path / "out"), str(tmp_path / "cut")
    run(path, out)
    run(path, cut, "--item-size", "4KiB", "--workers", "2")
    vocab_out = _vocab(out)
    assert len(vocab_out) == 74 and json.load(open(os.path.join(out, "config.json")))["vocab_size"] == 96
    tensors = {role: load_folder(folder) for role, folder in models.items()}
    vocabs = {role: _vocab(folder) for role, folder in models.items()}
    got, got_cut = load_folder(out), load_folder(cut)
    for name in VOCAB:
        rows = _rows(tensors, name, vocab_out, {"chat": 1, "cp": 1}, vocabs, None)
        padded = {role: torch.cat([r, torch.mean(r, dim=0).expand(96 - 74, -1)]) for role, r in rows.items()}
        want = torch.zeros_like(padded["chat"])  # mergekit's linear, as in the union test above
        for t, c in ((padded["chat"], 0.4), (padded["cp"], 0.6)):
            want.addcmul_(t, torch.tensor(c, dtype=torch.float32))
        want.div_(torch.tensor(0.4, dtype=torch.float32) + torch.tensor(0.6, dtype=torch.float32))
        assert_bit_identical({name: got[name]}, {name: want})
        assert torch.equal(got_cut[name].view(torch.int32), got[name].view(torch.int32))
    assert json.load(open(os.path.join(out, "raymerge_manifest.json")))["recipe"]["tokenizer"][
        "pad_to_multiple_of"] == 32


def test_frankenmerge_union_maps_rows_among_the_first_and_last_slices_models(ray_local, models, tmp_path, run):
    """passthrough slices (chat's layer 0, then cp's layer 1) with tokenizer_source union: the
    embedding is the chat model's rows by token and the head cp's, each model choosing among its
    own slice's models alone as mergekit does: tokens chat lacks get zeros in the embedding
    (cp's new tokens), tokens cp lacks zeros in the head (the chat tokens)."""
    path = mergekit_file(tmp_path, f"""merge_method: passthrough
slices:
  - sources: [{{model: {models['chat']}, layer_range: [0, 1]}}]
  - sources: [{{model: {models['cp']}, layer_range: [1, 2]}}]
dtype: float32
tokenizer_source: union
""")
    out = str(tmp_path / "out")
    run(path, out)
    vocab_out = _vocab(out)
    assert len(vocab_out) == 74
    tensors = {role: load_folder(folder) for role, folder in models.items()}
    vocabs = {role: _vocab(folder) for role, folder in models.items()}
    got = load_folder(out)
    embed = _rows(tensors, VOCAB[0], vocab_out, {"chat": 1}, vocabs, None)["chat"]
    head = _rows(tensors, VOCAB[1], vocab_out, {"cp": 1}, vocabs, None)["cp"]
    assert_bit_identical({n: got[n] for n in VOCAB}, {VOCAB[0]: embed, VOCAB[1]: head})
    assert not embed[vocab_out["한3"]].any() and not head[vocab_out["<|im_end|>"]].any()
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], tensors["cp"]["model.layers.1.mlp.up_proj.weight"])


def test_base_tokenizer_with_forced_and_zero_tokens(ray_local, models, tmp_path, run):
    """task_arithmetic with the base's vocabulary and a `tokens` section: `</s>` forced from the
    chat model in every model, and a new token `<pad>`, zeros; cp's and chat's own tokens are
    not in the output."""
    path = mergekit_file(tmp_path, f"""merge_method: task_arithmetic
base_model: {models['base']}
models:
  - model: {models['chat']}
    parameters: {{weight: 0.5}}
  - model: {models['cp']}
    parameters: {{weight: 1.0}}
parameters: {{normalize: false}}
dtype: float32
tokenizer:
  source: base
  tokens:
    "</s>": {{source: {models['chat']}, force: true}}
    "<pad>": {{source: {{kind: zero}}}}
""")
    out = str(tmp_path / "out")
    run(path, out)
    vocab_out = _vocab(out)
    assert len(vocab_out) == 65 and vocab_out["<pad>"] == 64
    tensors = {role: load_folder(folder) for role, folder in models.items()}
    vocabs = {role: _vocab(folder) for role, folder in models.items()}
    got = load_folder(out)
    forced = {"</s>": ("model", "chat"), "<pad>": ("zero", "")}
    for name in VOCAB:
        rows = _rows(tensors, name, vocab_out, {"chat": 1, "cp": 1, "base": 1}, vocabs, "base", forced)
        b = rows["base"]
        deltas = torch.stack([rows["chat"] - b, rows["cp"] - b])
        deltas.mul_(torch.tensor([0.5, 1.0], dtype=torch.float32).reshape(2, 1, 1))
        want = b + deltas.sum(dim=0)
        assert_bit_identical({name: got[name]}, {name: want})


def test_vocab_union_chat_vector_keeps_cps_ids(ray_local, models, tmp_path):
    """raymerge's own merge with --vocab union: cp's tokenizer plus the chat model's tokens, cp's
    ids kept; every row mapped by token (a token cp alone has keeps cp's row, the chat tokens get
    the chat model's), then cp + 0.5 * (chat - base) in float32, rounded once to cp's bfloat16;
    the paper's --special-tokens still puts the chat model's row over cp's (cp's ids are the output's)."""
    import raymerge

    out = str(tmp_path / "out")
    raymerge.merge(models["base"], models["chat"], models["cp"], out, scale=0.5, vocab="union", special_tokens="2:2")
    vocab_out = _vocab(out)
    vocabs = {role: _vocab(folder) for role, folder in models.items()}
    assert {t: vocab_out[t] for t in vocabs["cp"]} == vocabs["cp"] and len(vocab_out) == 74
    tensors = {role: load_folder(folder) for role, folder in models.items()}
    got = load_folder(out)
    for name in VOCAB:
        rows = _rows(tensors, name, vocab_out, {"chat": 1, "cp": 1, "base": 1}, vocabs, "cp")
        want = (rows["cp"] + 0.5 * (rows["chat"] - rows["base"])).to(torch.bfloat16)
        want[2] = tensors["chat"][name][2].to(torch.bfloat16)  # --special-tokens 2:2: </s> is the chat model's row
        assert_bit_identical({name: got[name]}, {name: want})
    assert torch.equal(got[VOCAB[0]][vocab_out["한3"]], tensors["cp"][VOCAB[0]][vocabs["cp"]["한3"]])
    assert torch.equal(got[VOCAB[0]][vocab_out["<|im_end|>"]], tensors["chat"][VOCAB[0]][vocabs["chat"]["<|im_end|>"]])
    manifest = json.load(open(os.path.join(out, "raymerge_manifest.json")))
    assert manifest["recipe"]["vocab"] == "union"
    # The chat model's template and EOS, by token: its <|im_end|> (id 66 there) is 73 here.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == TEMPLATE and tok.eos_token == "<|im_end|>"
    assert vocabs["chat"]["<|im_end|>"] == 66 and vocab_out["<|im_end|>"] == 73
    assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == 73


def test_tokenizer_source_refusals_are_one_line(models, tmp_path):
    def plan(text: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "raymerge", "plan", "--recipe", mergekit_file(tmp_path, text)],
                              capture_output=True, text=True, timeout=120)

    head = f"merge_method: linear\nmodels:\n  - model: {models['chat']}\n    parameters: {{weight: 1}}\n"
    r = plan(head + f"tokenizer_source: {models['base']}\n")
    assert r.returncode == 2 and "is not one of the merge's models" in r.stderr, r.stderr
    bare = make_llama_trio(str(tmp_path / "bare"), roles=("base",), vocab=64, seed=9)["base"]
    r = plan(head + f"  - model: {bare}\n    parameters: {{weight: 1}}\ntokenizer_source: union\n")
    assert r.returncode == 2 and "no tokenizer files" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    franken = (f"merge_method: passthrough\nslices:\n  - sources: [{{model: {models['chat']}, layer_range: [0, 2]}}]\n"
               f"  - sources: [{{model: {models['cp']}, layer_range: [0, 1]}}]\ntokenizer:\n  source: union\n"
               f"  tokens:\n    한3: {{source: {models['cp']}}}\n")
    r = plan(franken)
    assert r.returncode == 2 and "is not merged into the embedding and head" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("source,template", [("tokenizer_source: base\n", "{{ 'literal: ' + messages[0].content }}"),
                                             ("", "auto")])
def test_chat_template_literal_or_the_one_most_inputs_have(ray_local, models, tmp_path, run, source, template):
    """A literal template on the base's tokenizer; `auto` alone: the donor's (the base model's)
    tokenizer with the template most inputs have (the chat model's alone has one), rows untouched."""
    from transformers import AutoTokenizer

    path = mergekit_file(tmp_path, f"""merge_method: task_arithmetic
base_model: {models['base']}
models:
  - model: {models['chat']}
    parameters: {{weight: 0.5}}
  - model: {models['cp']}
    parameters: {{weight: 0.5}}
dtype: float32
{source}chat_template: {json.dumps(template)}
""")
    out = str(tmp_path / "out")
    run(path, out, "--vocab", "overlap")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == (TEMPLATE if template == "auto" else template)
    assert tok.get_vocab() == _vocab(models["base"])
    assert load_folder(out)[VOCAB[0]].shape[0] == 64


def test_named_chat_template_is_set_and_an_unknown_name_refused(ray_local, models, tmp_path, run):
    """mergekit's test file: linear in bfloat16 with `chat_template: chatml` (raymerge's own text
    of the name): the output renders ChatML; a name raymerge has no template for is refused."""
    from transformers import AutoTokenizer

    text = (f"merge_method: linear\nbase_model: {models['base']}\nmodels:\n  - model: {models['base']}\n    "
            f"parameters: {{weight: 0.5}}\n  - model: {models['chat']}\n    parameters: {{weight: 0.5}}\n"
            "dtype: bfloat16\nchat_template: NAME\n")
    out = str(tmp_path / "out")
    run(mergekit_file(tmp_path, text.replace("NAME", "chatml")), out, "--vocab", "overlap")
    tok = AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False) == \
        "<|im_start|>user\nw1 w2<|im_end|>\n<|im_start|>assistant\nw3<|im_end|>\n"
    r = subprocess.run([sys.executable, "-m", "raymerge", "plan", "--recipe",
                        mergekit_file(tmp_path, text.replace("NAME", "vicuna"))], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "'vicuna': no template of that name; name one of alpaca, chatml" in r.stderr, r.stderr


def test_union_from_s3_gives_the_local_bytes(ray_local, s3_server, models, tmp_path):
    """The tokenizer files are read through S3 (moto) like the weights; the output is the local
    run's, byte for byte."""
    import boto3

    import raymerge
    from tests.e2e.test_sparse_merges import shard_bytes

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="toks")
    for role, folder in models.items():
        for name in os.listdir(folder):
            s3.upload_file(os.path.join(folder, name), "toks", f"{role}/{name}")
    local, remote = str(tmp_path / "local"), str(tmp_path / "remote")
    raymerge.merge(models["base"], models["chat"], models["cp"], local, scale=0.5, vocab="union")
    raymerge.merge("s3://toks/base", "s3://toks/chat", "s3://toks/cp", remote, scale=0.5, vocab="union")
    assert shard_bytes(remote) == shard_bytes(local)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert open(os.path.join(remote, name), "rb").read() == open(os.path.join(local, name), "rb").read()


def test_a_models_tokenizer_as_the_source_is_not_changed_by_added_tokens(ray_local, models, tmp_path, run):
    """tokenizer source cp with a token cp lacks: the output is cp's tokenizer plus `<pad>`, whose
    rows are zeros in every model (none has it), cp's own rows by their ids; cp's tokenizer itself
    does not take the token (it would claim a row id past its tensors)."""
    path = mergekit_file(tmp_path, f"""merge_method: linear
base_model: {models['base']}
models:
  - model: {models['cp']}
    parameters: {{weight: 0.5}}
  - model: {models['base']}
    parameters: {{weight: 0.5}}
dtype: float32
tokenizer:
  source: {models['cp']}
  tokens:
    "<pad>": {{source: {{kind: zero}}}}
""")
    out = str(tmp_path / "out")
    run(path, out)
    vocab_out, cp_vocab = _vocab(out), _vocab(models["cp"])
    assert {t: vocab_out[t] for t in cp_vocab} == cp_vocab and vocab_out["<pad>"] == 72 and len(vocab_out) == 73
    got = load_folder(out)
    assert not got[VOCAB[0]][72].any() and not got[VOCAB[1]][72].any()


def test_token_ids_past_a_models_rows_are_refused_at_plan_time(models, tmp_path):
    """A chat model whose config says 80 rows and whose tokenizer has ids up to 69, with only 67
    rows in its tensors: its rows for ids 67-69 do not exist; refused in one line naming it."""
    chat = str(tmp_path / "chat")
    shutil.copytree(models["chat"], chat)
    config = json.load(open(os.path.join(chat, "config.json")))
    json.dump({**config, "vocab_size": 80}, open(os.path.join(chat, "config.json"), "w"))
    word_tokenizer(chat, SPECIALS + WORDS + ["both", "x1", "x2", "x3"], CHAT_ADDED, TEMPLATE, eos="<|im_end|>")
    text = (f"merge_method: linear\nbase_model: {models['base']}\nmodels:\n  - model: {chat}\n    parameters: "
            f"{{weight: 0.5}}\n  - model: {models['base']}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
            "tokenizer_source: union\n")
    r = subprocess.run([sys.executable, "-m", "raymerge", "plan", "--recipe", mergekit_file(tmp_path, text)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "tokenizer has ids up to" in r.stderr and "past the tensor's 67 rows" in r.stderr, \
        r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_apply_with_vocab_union_is_refused(models, tmp_path):
    """A stored vector holds differences: no model's row can stand in for its missing rows."""
    recipe = tmp_path / "apply.yaml"
    recipe.write_text(f"kind: apply\ncp: {models['cp']}\nvector: [{models['chat']}]\nvocab: union\n")
    r = subprocess.run([sys.executable, "-m", "raymerge", "plan", "--recipe", str(recipe)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "a stored --vector holds differences" in r.stderr, r.stderr


def test_skip_of_the_embedding_with_a_new_vocabulary_is_refused(models):
    """--skip would keep cp's 72 rows under the union's vocab_size of 74: refused in one line."""
    r = subprocess.run([sys.executable, "-m", "raymerge", "plan", "--base", models["base"], "--chat", models["chat"],
                        "--cp", models["cp"], "--vocab", "union", "--skip", "embed_tokens"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "leave the embedding and head out of --skip" in r.stderr
