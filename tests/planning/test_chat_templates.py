"""The chat templates a mergekit file may name, rendered through transformers: each conversation's
text written out here from the format (as mergekit 0.1.5's files render it, whitespace included)."""

from __future__ import annotations

import pytest

from raymerge.planning.chat_templates import NAMED

pytest.importorskip("transformers")

CHAT = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": " Hi \n"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
USER = [{"role": "user", "content": "Hi"}]


def _render(name: str, messages: list[dict], prompt: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=NAMED[name],
                                        add_generation_prompt=prompt, bos_token="<s>", eos_token="</s>")
    return rendered[0]


@pytest.mark.parametrize("name,messages,prompt,want", [
    ("chatml", CHAT, True, "<|im_start|>system\n Be brief. <|im_end|>\n<|im_start|>user\n Hi \n<|im_end|>\n"
                           "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                           "<|im_start|>assistant\n"),
    ("chatml", USER, False, "<|im_start|>user\nHi<|im_end|>\n"),
    ("llama3", CHAT, True, "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n"
                           "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\n"
                           "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\n"
                           "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\n"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("mistral", CHAT, True, "<s> [INST]  Be brief. \n\n Hi \n [/INST] Hello!</s> [INST] Bye [/INST]"),
    ("mistral", USER, False, "<s> [INST] Hi [/INST]"),
    ("alpaca", CHAT, True, "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n### Instruction:\nBye"
                           "### Response:\n"),
    ("alpaca", [*USER, {"role": "user_context", "content": "ctx"}], False, "\n\n### Instruction:\nHi\n\n### Input:\nctx"),
    ("exaone", USER, True, "        [|system|][|endofturn|]\n\n    [|user|]Hi\n        \n\n    [|assistant|]\n"),
    ("exaone", CHAT[:3], False, "    [|system|] Be brief. \n        [|endofturn|]\n\n    [|user|] Hi \n\n        \n\n"
                                "    [|assistant|]Hello!\n        [|endofturn|]\n\n"),
])
def test_named_template_renders_the_format(name, messages, prompt, want):
    assert _render(name, messages, prompt) == want


def test_mistral_refuses_roles_that_do_not_alternate():
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="must alternate"):
        _render("mistral", [*USER, *USER], False)
