"""Auxiliary files: cp's tokenizer, with the chat model's chat template and EOS settings.

The chat template lives in `tokenizer_config.json` (`chat_template`) or in `chat_template.jinja`
(copied whole by the plan); EOS lives in `tokenizer_config.json` (`eos_token`),
`special_tokens_map.json` (`eos_token`) and `generation_config.json` (`eos_token_id`).
"""

from __future__ import annotations

import json

from raymerge.untrusted import parse_json

TAKEN = {
    "tokenizer_config.json": ("chat_template", "eos_token"),
    "special_tokens_map.json": ("eos_token",),
    "generation_config.json": ("eos_token_id",),
}


def patched(name: str, ours: bytes, theirs: bytes) -> bytes:
    """`ours` with the keys of TAKEN[name] replaced by `theirs`'s values, where theirs has them.

    Raises ValueError (`UntrustedJSON` for hostile bytes) when either file is not a JSON object.
    Resolve already parsed both the same way; this is the check of last resort.
    """
    mine, other = parse_json(ours), parse_json(theirs)
    if not isinstance(mine, dict) or not isinstance(other, dict):
        raise ValueError(f"{name} is not a JSON object")
    changed = False
    for key in TAKEN.get(name, ()):
        if key in other and mine.get(key) != other[key]:
            mine[key] = other[key]
            changed = True
    if not changed:
        return ours  # byte for byte cp's file when the chat model changes nothing in it
    return (json.dumps(mine, indent=2, ensure_ascii=False) + "\n").encode()
