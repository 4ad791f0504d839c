"""The chat templates a mergekit file may name (`chat_template: chatml`), raymerge's own Jinja.

mergekit 0.1.5 ships these five as files of its own. raymerge's texts are written for it and
differ in bytes, but render every conversation as mergekit's do through `transformers`
(trim_blocks and lstrip_blocks on), whitespace included: a llama3 turn ends in `<|eot_id|>` and a
newline, an alpaca generation prompt follows the last turn without a blank line, exaone's turns
keep the indentation of mergekit's file. `bench/tokenizer_parity.py --templates` renders both over
a set of conversations; tests/planning/test_chat_templates.py checks the strings themselves.
"""

from __future__ import annotations

CHATML = (r"{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA3 = (r"{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
          r"{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (m['content'] | trim) + '<|eot_id|>\n' }}"
          r"{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          r"{% endif %}")

# A leading system message goes into the first user turn; then user and assistant alternate.
MISTRAL = (r"{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
           r"{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}"
           r"{% for m in turns %}"
           r"{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           r"{{ raise_exception('After the optional system message, conversation roles must alternate "
           r"user/assistant/user/assistant/...') }}{% endif %}"
           r"{% if m['role'] == 'user' %}{{ ' [INST] ' }}"
           r"{% if loop.first and system is defined %}{{ system + '\n\n' }}{% endif %}{{ m['content'] + ' [/INST]' }}"
           r"{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
           r"{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an "
           r"initial optional system message!') }}{% endif %}{% endfor %}")

# The last system message (trimmed) heads the prompt; turns are separated by a blank line.
ALPACA = (r"{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
          r"{{ (system | last).content | trim if system else '' }}{{ '\n\n' }}"
          r"{% set heads = {'user': '### Instruction:\n', 'assistant': '### Response:\n', 'user_context': '### Input:\n'} %}"
          r"{% for m in messages %}{% if m['role'] in heads %}{{ heads[m['role']] + (m['content'] | trim) }}"
          r"{% if not loop.last %}{{ '\n\n' }}{% endif %}{% endif %}{% endfor %}"
          r"{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\n' }}{% endif %}")

EXAONE = (r"{% for m in messages %}"
          r"{% if loop.first and m['role'] != 'system' %}{{ '        [|system|][|endofturn|]\n\n' }}{% endif %}"
          r"{{ '    [|' + m['role'] + '|]' + m['content'] + '\n' }}"
          r"{{ '        \n\n' if m['role'] == 'user' else '        [|endofturn|]\n\n' }}"
          r"{% endfor %}{% if add_generation_prompt %}{{ '    [|assistant|]\n' }}{% endif %}")

NAMED = {"alpaca": ALPACA, "chatml": CHATML, "exaone": EXAONE, "llama3": LLAMA3, "mistral": MISTRAL}
