"""The output vocabulary (planning.vocabulary) without Ray: the base model's tokenizer stripped
of the tokens past its config's vocab_size, as mergekit strips it."""

from __future__ import annotations

import json
import os

from raymerge.planning import vocabulary
from raymerge.planning.inputs import resolve
from tests.conftest import make_llama_trio


def _bpe(folder: str) -> None:
    """A BPE tokenizer of 66 tokens over a 64-row model: `ab` and `abc` (ids 64, 65) unused."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    letters = ["<unk>", "a", "b", "c"] + [f"t{i}" for i in range(60)]
    letters[-1] = "t1t2"  # made by the merge t1 t2, which stays
    vocab = {t: i for i, t in enumerate(letters + ["ab", "abc"])}
    tok = Tokenizer(models.BPE(vocab, [("a", "b"), ("ab", "c"), ("t1", "t2")], unk_token="<unk>"))
    os.remove(os.path.join(folder, "tokenizer_config.json"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


def test_base_tokenizer_is_stripped_of_tokens_past_vocab_size(tmp_path):
    base = make_llama_trio(str(tmp_path), roles=("base",), vocab=64, seed=1)["base"]
    _bpe(base)
    ckpt = resolve("base", base)
    built = vocabulary.build(vocabulary.TokenizerSpec("base"), [ckpt], ckpt, {})
    assert built.size == 64
    state = json.loads(dict(built.files)["tokenizer.json"])
    assert "ab" not in state["model"]["vocab"] and "abc" not in state["model"]["vocab"]
    assert state["model"]["merges"] in ([["t1", "t2"]], ["t1 t2"])  # the merges making ab and abc are gone
    assert built.runs == {(0,): ((vocabulary.RowRun(0, 64, ((0, 0),)),),)}  # every row its own
