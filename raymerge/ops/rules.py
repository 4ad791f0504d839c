"""Which tensors are vocabulary tensors, which rows of them a vector may touch, and the user's
patterns of tensor names (--skip, scale rules), compiled with RE2 so that matching is linear.

Vocabulary tensors hold one row per token: the input embedding and the output head. They are
found from the model config (`vocab_size`) and from tensor names used across architectures
(Llama's `embed_tokens`/`lm_head`, GPT-2's `wte`, NeoX's `embed_in`/`embed_out`, T5's `shared`,
Meta's `tok_embeddings`/`output`), never from one architecture's names alone.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import re2

from raymerge.bounds import parse_int
from raymerge.errors import InputError
from raymerge.untrusted import shown

VOCAB_MODES = ("overlap", "skip", "error", "union")
MAX_PATTERNS = 256  # per --skip list or schedule: each is tried on every tensor name
MAX_PATTERN_CHARS = 1000
MAX_TOKEN_ID = 2**31 - 1  # token ids index embedding rows: int32 in every tokenizer

_RE2 = re2.Options()
_RE2.log_errors = False  # RE2 would print every refused pattern to stderr; the ValueError says it

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


def is_vocab_tensor(name: str, shape: tuple[int, ...], config: dict[str, Any] | None,
                    names: tuple[str, ...] = ()) -> bool:
    """A 2-D tensor named like an embedding or head; in a checkpoint with none so named (`names`:
    its tensors' names), one whose rows match the config's vocab size. (Where an embedding is named,
    rows alone would take a layer's weight whose rows happen to equal the vocabulary's.)"""
    if len(shape) != 2:
        return False
    if is_embed_name(name) or is_head_name(name):
        return True
    return shape[0] == vocab_size(config) and not _names_vocab(names)


@functools.lru_cache(maxsize=16)
def _names_vocab(names: tuple[str, ...]) -> bool:
    """Whether any of a checkpoint's tensor names is an embedding's or a head's."""
    return any(is_embed_name(n) or is_head_name(n) for n in names)


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


def check_texts(texts: list[str] | tuple[str, ...], option: str) -> None:
    """Refuse more than MAX_PATTERNS patterns (regexes or substrings) or one longer than
    MAX_PATTERN_CHARS: each is tried on every tensor name of every input."""
    if len(texts) > MAX_PATTERNS:
        raise ValueError(f"{option}: {len(texts)} patterns; at most {MAX_PATTERNS}, as each is tried on every "
                         "tensor name; join regexes (a|b) or write fewer")
    for text in texts:
        if len(text) > MAX_PATTERN_CHARS:
            raise ValueError(f"{option} {shown(text, 40)}: {len(text)} characters; a pattern has at most "
                             f"{MAX_PATTERN_CHARS}, write a shorter one")


def compile_patterns(patterns: list[str] | tuple[str, ...], option: str = "--skip") -> list[re2._Regexp]:
    """User regexes compiled with RE2, whose `search` takes time linear in the name whatever the
    pattern (Python's `re` backtracks: `(a+)+$` on a long name runs for minutes). ValueError says
    which pattern and why: too many or too long (check_texts), invalid, or a feature RE2 leaves out
    (backreferences, lookarounds)."""
    check_texts(patterns, option)
    return [_compile(p, option) for p in patterns]


def _compile(pattern: str, option: str) -> re2._Regexp:
    try:
        return re2.compile(pattern, _RE2)
    except UnicodeEncodeError:  # RE2 reads UTF-8
        raise ValueError(f"{option} {shown(pattern, 40)}: not a valid regular expression (a lone surrogate, "
                         "which is not UTF-8)") from None
    except re2.error as e:
        # RE2's message is "what: where in the pattern"; the pattern itself is shown already.
        reason = (e.args[0].decode(errors="replace") if isinstance(e.args[0], bytes) else str(e)).split(":")[0]
        if not _python_compiles(pattern):
            raise ValueError(f"{option} {shown(pattern, 40)}: not a valid regular expression ({reason})") from None
        raise ValueError(f"{option} {shown(pattern, 40)}: not supported ({reason}); patterns run on RE2, in time "
                         "linear in the name, so backreferences, lookarounds and huge repetitions are left out; "
                         "rewrite it without them") from None


def _python_compiles(pattern: str) -> bool:
    """Whether Python's `re` takes the pattern: if so, RE2 refused a feature, not a typo."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return False
    return True


def parse_special_tokens(text: str) -> list[tuple[int, int]]:
    """'CP_ID:CHAT_ID,...' -> [(cp_id, chat_id), ...]; InputError says what to write instead."""
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        cp, sep, chat = part.partition(":")
        if not sep:
            raise InputError(f"--special-tokens {shown(part, 40)}: write CP_ID:CHAT_ID pairs, e.g. 32000:2,32001:1")
        pairs.append(tuple(parse_int(x.strip(), f"--special-tokens {shown(part, 40)}: token id", 0, MAX_TOKEN_ID)
                           for x in (cp, chat)))
    if not pairs:
        raise InputError("--special-tokens: no CP_ID:CHAT_ID pairs given")
    cp_ids = [c for c, _ in pairs]
    if len(set(cp_ids)) != len(cp_ids):
        raise InputError("--special-tokens: a cp token id appears twice; map each cp row once")
    return pairs
