"""Which tensors are vocabulary tensors, and which rows of them a vector may touch. Pure Python.

Vocabulary tensors hold one row per token: the input embedding and the output head. They are
found from the model config (`vocab_size`) and from tensor names used across architectures
(Llama's `embed_tokens`/`lm_head`, GPT-2's `wte`, NeoX's `embed_in`/`embed_out`, T5's `shared`,
Meta's `tok_embeddings`/`output`), never from one architecture's names alone.
"""

from __future__ import annotations

import re
from typing import Any

VOCAB_MODES = ("overlap", "skip", "error")

_EMBED = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings|shared|embeddings?)\.weight$")
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output|head)\.weight$")


def vocab_size(config: dict[str, Any] | None) -> int | None:
    """The vocabulary size a config declares (top level, or a multimodal model's text config)."""
    if not config:
        return None
    for cfg in (config, config.get("text_config") or {}):
        v = cfg.get("vocab_size") if isinstance(cfg, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def is_head_name(name: str) -> bool:
    return bool(_HEAD.search(name))


def is_embed_name(name: str) -> bool:
    return bool(_EMBED.search(name))


def is_vocab_tensor(name: str, shape: tuple[int, ...], config: dict[str, Any] | None) -> bool:
    """A 2-D tensor named like an embedding or head, or whose rows match the config's vocab size."""
    if len(shape) != 2:
        return False
    if is_embed_name(name) or is_head_name(name):
        return True
    return shape[0] == vocab_size(config)


def is_tied(config: dict[str, Any] | None) -> bool:
    return bool(config and config.get("tie_word_embeddings", False))


def tied_embedding(name: str, tensors: dict[str, Any], config: dict[str, Any] | None) -> str | None:
    """For a head tensor missing from a checkpoint with tied embeddings, the embedding it shares."""
    if not is_head_name(name) or name in tensors:
        return None
    embeds = [n for n in tensors if is_embed_name(n)]
    if len(embeds) == 1 and (is_tied(config) or config is None or "tie_word_embeddings" not in config):
        return embeds[0]
    return None


def compile_patterns(patterns: list[str] | tuple[str, ...], option: str = "--skip") -> list[re.Pattern]:
    """Compile user regexes, raising ValueError with the pattern and the reason (a pathological
    pattern can exhaust the compiler's recursion or its size limits: the same error)."""
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except (re.error, RecursionError, OverflowError) as e:
            raise ValueError(f"{option} {p[:40]!r}{'...' if len(p) > 40 else ''}: not a valid regular "
                             f"expression ({e})") from e
    return compiled


def parse_special_tokens(text: str) -> list[tuple[int, int]]:
    """'CP_ID:CHAT_ID,...' -> [(cp_id, chat_id), ...]; ValueError says what to write instead."""
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)\s*:\s*(\d+)", part)
        if not m:
            raise ValueError(f"--special-tokens {part!r}: write CP_ID:CHAT_ID pairs, e.g. 32000:2,32001:1")
        pairs.append((int(m.group(1)), int(m.group(2))))
    if not pairs:
        raise ValueError("--special-tokens: no CP_ID:CHAT_ID pairs given")
    cp_ids = [c for c, _ in pairs]
    if len(set(cp_ids)) != len(cp_ids):
        raise ValueError("--special-tokens: a cp token id appears twice; map each cp row once")
    return pairs
