"""mergekit's tokenizer sources (`tokenizer_source`, the `tokenizer:` section): the output tokenizer,
and for every input model where each row of its embedding and head comes from in the output's
vocabulary, as mergekit 0.1.5 builds them (`tokenizer/build.py`, `tokenizer/embed.py`).

The driver builds the tokenizer with `transformers` from the inputs' tokenizer files (read into a
temporary folder) and turns mergekit's per-token choices into row runs (`RowRun`); the planner
makes them gathered sources (planning.plan.RowMap) and workers read the rows by byte range, so no
process holds a whole embedding. The choices are made among the models a tensor is merged from
(its group: every model in a whole-model merge; a frankenmerge's first slice's for the embedding,
its last slice's for the head). For each model of a group and output token t (row r):
    the model has t (and t is not forced): the model's own row of t
    else t's default: the mean of the rows of t in every model of the group that has it, added in
        turn in the compute dtype then divided by their count (tokens two or more have, the base
        model not among them), or one model's row (t in one model alone; the base model's where it
        is in the group and has t; a `tokens` entry's `source`), or zeros (t in no model of the
        group; `source: {kind: zero}`)
The output vocabulary: `base` (the base model's tokenizer, else the first model's), `union` (the
base's, plus every other model's tokens it lacks, model by model in the file's order, their added
tokens last), or one model's; plus the `tokens` entries it lacks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any

from raymerge.errors import InputError, ResolveError
from raymerge.planning.chat_templates import NAMED
from raymerge.ops.rules import vocab_size
from raymerge.storage import urls

# The files a tokenizer may need to load; what save_pretrained writes replaces the anchor's.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
ZERO = "zero"


@dataclass(frozen=True)
class TokenSource:
    """One `tokens` entry: where token `token`'s rows come from when a model lacks it (or always,
    with `force`). kind: "model" (that model's row of the token), "model_token" (that model's
    row of `source_token` or of id `token_id`), ZERO, or "" (mergekit's choice)."""

    token: str
    kind: str = ""
    model: str | None = None  # URL
    source_token: str | None = None
    token_id: int | None = None
    force: bool = False

    def to_json(self) -> dict[str, Any]:
        source: Any = None
        if self.kind == ZERO:
            source = {"kind": ZERO}
        elif self.kind == "model":
            source = self.model
        elif self.kind == "model_token":
            source = {"kind": "model_token", "model": self.model,
                      **({"token": self.source_token} if self.source_token is not None else {"token_id": self.token_id})}
        return {"source": source, "force": self.force}


@dataclass(frozen=True)
class TokenizerSpec:
    """Where the output's vocabulary comes from: "base", "union" or a model's URL; `tokens`;
    "" (a chat template alone): the donor's tokenizer as it is, its rows untouched. `chat_template`:
    the output tokenizer's ("auto": the one most inputs have). `pad_to`: mergekit's
    pad_to_multiple_of (the rows past the tokens: each model's mean row)."""

    source: str
    tokens: tuple[TokenSource, ...] = ()
    chat_template: str | None = None
    pad_to: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "tokens": {t.token: t.to_json() for t in self.tokens},
                **({"chat_template": self.chat_template} if self.chat_template is not None else {}),
                **({"pad_to_multiple_of": self.pad_to} if self.pad_to else {})}


def check_template(value: Any, where: str) -> str:
    """A chat template as mergekit takes it: "auto", a name (planning.chat_templates), or Jinja
    (20 characters or more, with a `{`)."""
    names = ", ".join(NAMED)
    if not isinstance(value, str):
        raise InputError(f"{where}: auto, a template's name ({names}) or its Jinja text")
    if value == "auto" or value in NAMED or (len(value) >= 20 and "{" in value):
        return value
    if len(value) < 256 and "\n" not in value and "{" not in value:
        raise InputError(f"{where} {value!r}: no template of that name; name one of {names}, paste the "
                         "template's Jinja text, or write auto (the template most inputs have)")
    raise InputError(f"{where}: not a chat template (Jinja of 20 characters or more, with a {{); write the "
                     f"template's Jinja text, a name ({names}), or auto")


@dataclass(frozen=True)
class RowRun:
    """Output rows [row, row + count) of one model's vocabulary tensor: `parts` () zeros; one part
    (model, in_row): that model's rows in_row.. in order; several (count 1): their mean."""

    row: int
    count: int
    parts: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Vocabulary:
    """The output's tokenizer files and size, and per group of models (indices into `models`, in
    order) each member's row runs (RowRun parts name models by those indices too)."""

    size: int | None  # the rows (config's vocab_size); None: the vocabulary as it is (a chat template alone)
    files: tuple[tuple[str, bytes], ...]
    runs: dict[tuple[int, ...], tuple[tuple[RowRun, ...], ...]]  # over the tokens' rows
    eos_ids: tuple[int, ...] | None = None  # the chat model's EOS tokens' ids in the output (--vocab union)
    tokens: int | None = None  # rows with a token, where fewer than `size` (pad_to): the rest are the mean row


def build(spec: TokenizerSpec, models: list[Any], base: Any | None, storage_options: dict[str, Any],
          template_from: Any | None = None, groups: tuple[tuple[int, ...], ...] | None = None) -> Vocabulary:
    """`models`: the merge's input checkpoints (planning.inputs.Checkpoint), in the file's order,
    the base model among them where it is an input; `base`: the base model (None: the first);
    `groups`: the sets of models (indices into `models`) tensors are merged from (None: all).
    `template_from` (raymerge's merge, --vocab union): the model whose chat template and EOS the
    output tokenizer takes, by token, with generation_config's EOS ids mapped to the new ids."""
    if importlib.util.find_spec("transformers") is None:  # the tokenizer libraries: an extra of raymerge
        raise InputError("tokenizer_source needs the tokenizer libraries: pip install 'raymerge[tokenizers]'")
    base = base if base is not None else models[0]
    if not spec.source:
        return _with_template(spec, base, models, storage_options)
    named = [u for u in (spec.source, *(t.model for t in spec.tokens)) if u and u not in ("base", "union")]
    for url in named:
        if all(c.url != urls.normalize(url) for c in models):
            raise InputError(f"tokenizer: {urls.redact(url)} is not one of the merge's models; name one of them")
    with tempfile.TemporaryDirectory(prefix="raymerge-tok-") as tmp:
        toks: dict[str, Any] = {}
        sizes: dict[str, int] = {}
        folders: dict[str, str] = {}
        for i, c in enumerate([base, *models]):
            if c.url not in toks:
                folders[c.url] = os.path.join(tmp, str(i))
                toks[c.url], sizes[c.url] = _load(c, folders[c.url], storage_options, strip=i == 0)
        out = _output_tokenizer(spec, base, models, toks, sizes, os.path.join(tmp, "union"))
        existing = set(out.get_vocab())
        for t in spec.tokens:
            if t.token not in existing:
                out.add_tokens(t.token)
                existing.add(t.token)
        eos_ids = None
        template = _template(spec, toks.values())
        if template_from is not None:
            chat = toks[template_from.url]
            template = chat.chat_template if isinstance(chat.chat_template, str) else template
            if chat.eos_token:
                out.eos_token = chat.eos_token
            eos_ids = _eos_ids(chat, out, folders[template_from.url])
        vocab = out.get_vocab()
        files = _saved(out, template, os.path.join(tmp, "out"))
    vocabs = {c.url: toks[c.url].get_vocab() for c in models}
    runs = {g: _runs(spec, vocab, models, base, vocabs, sizes, g)
            for g in (groups or (tuple(range(len(models))),))}
    rows = -(-len(vocab) // spec.pad_to) * spec.pad_to if spec.pad_to else len(vocab)
    return Vocabulary(rows, files, runs, eos_ids, len(vocab) if rows > len(vocab) else None)


def _eos_ids(chat: Any, out: Any, folder: str) -> tuple[int, ...] | None:
    """The chat model's generation_config eos_token_id(s), as tokens, in the output's ids (None:
    it has none, or one the output lacks: cp's stay)."""
    path = os.path.join(folder, "generation_config.json")
    try:
        ids = json.load(open(path)).get("eos_token_id") if os.path.exists(path) else None
    except (ValueError, AttributeError):
        return None
    ids = [ids] if isinstance(ids, int) and not isinstance(ids, bool) else ids
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return None
    vocab = out.get_vocab()
    tokens = [chat.convert_ids_to_tokens(i) for i in ids]
    return tuple(vocab[t] for t in tokens) if all(t in vocab for t in tokens) else None


def _with_template(spec: TokenizerSpec, donor: Any, models: list[Any], storage_options: dict[str, Any]) -> Vocabulary:
    """A chat template without a tokenizer source: the donor's tokenizer saved again with it
    (mergekit's), the vocabulary and every row as they are (size None, no runs)."""
    with tempfile.TemporaryDirectory(prefix="raymerge-tok-") as tmp:
        folder = os.path.join(tmp, "donor")
        _fetch(donor, folder, storage_options)
        tok = _tokenizer(folder, f"--{donor.role} {urls.redact(donor.url)}")
        others = []
        if spec.chat_template == "auto":
            for i, c in enumerate(m for m in models if m.url != donor.url):
                if has_tokenizer(c):
                    _fetch(c, os.path.join(tmp, str(i)), storage_options)
                    others.append(_tokenizer(os.path.join(tmp, str(i)), f"--{c.role} {urls.redact(c.url)}"))
        return Vocabulary(None, _saved(tok, _template(spec, [tok, *others]), os.path.join(tmp, "out")), {})


def _template(spec: TokenizerSpec, tokenizers) -> str | None:
    """The chat template to save: the spec's, or for "auto" the one most tokenizers have (the
    first such in the models' order), or None (keep the tokenizer's)."""
    if spec.chat_template != "auto":
        return NAMED.get(spec.chat_template, spec.chat_template)
    found = []
    for tok in tokenizers:
        t = tok.chat_template
        t = t.get("default") if isinstance(t, dict) else t
        if t:
            found.append(t.strip())
    return max(found, key=found.count) if found else None


def _saved(tok: Any, template: str | None, folder: str) -> tuple[tuple[str, bytes], ...]:
    """The files save_pretrained writes for `tok`, with `template` as its chat template if given."""
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(folder)
    return tuple((n, open(os.path.join(folder, n), "rb").read()) for n in sorted(os.listdir(folder)))


def has_tokenizer(ckpt: Any) -> bool:
    return any(posixpath.basename(u) in ("tokenizer.json", "tokenizer.model", "vocab.json") for u in ckpt.aux_files)


def _load(ckpt: Any, folder: str, storage_options: dict[str, Any], strip: bool = False):
    """(the checkpoint's fast tokenizer, its vocabulary size: the config's, else the tokenizer's).
    `strip` (the base model's, as mergekit's): without the tokens whose ids are past that size.
    Another model's such tokens stay in its tokenizer and count as tokens it lacks."""
    shown = f"--{ckpt.role} {urls.redact(ckpt.url)}"
    _fetch(ckpt, folder, storage_options)
    tok = _tokenizer(folder, shown)
    size = vocab_size(ckpt.config) or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if unused and strip:
        _strip(tok, unused, size, shown)
    return tok, size


def _strip(tok: Any, unused: set[str], size: int, shown: str) -> None:
    """Remove `unused` from a BPE fast tokenizer: its vocabulary, its added tokens past `size`, and
    every merge that makes or uses one of them."""
    import tokenizers

    state = json.loads(tok.backend_tokenizer.to_str())
    if state.get("model", {}).get("type") != "BPE":
        raise InputError(f"{shown}: its tokenizer has {len(unused)} tokens past the config's vocab_size {size}, and "
                         f"only a BPE tokenizer can be stripped of them (this one is "
                         f"{state.get('model', {}).get('type')}), as mergekit does; fix its config's vocab_size")
    state["added_tokens"] = [e for e in state.get("added_tokens", []) if e.get("id", size) < size]
    vocab = state["model"]["vocab"]
    for t in unused:
        vocab.pop(t, None)

    prefix = state["model"].get("continuing_subword_prefix") or ""

    def kept(merge: Any) -> bool:
        """A merge neither of whose parts nor whose result is removed (mergekit checks the parts
        alone, and then fails to load a tokenizer whose merge makes a removed token)."""
        parts = merge.split(" ") if isinstance(merge, str) else merge
        made = parts[0] + parts[-1][len(prefix):] if prefix and parts[-1].startswith(prefix) else "".join(parts)
        return not any(p in unused for p in parts) and made not in unused

    state["model"]["merges"] = [m for m in state["model"].get("merges", []) if kept(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(state))


def _tokenizer(folder: str, shown: str) -> Any:
    """The fast tokenizer saved in `folder` (ResolveError, naming `shown`, if the library fails on it)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder, use_fast=True)
    except Exception as e:  # noqa: BLE001  (any library failure: files it cannot read)
        raise ResolveError(f"{shown or 'the output tokenizer'}: the tokenizer does not load ({type(e).__name__}: "
                           f"{e}); fix its tokenizer files") from e


def _fetch(ckpt: Any, folder: str, storage_options: dict[str, Any]) -> None:
    """The checkpoint's tokenizer files and config.json, copied into `folder`."""
    if not has_tokenizer(ckpt):
        raise InputError(f"--{ckpt.role} {urls.redact(ckpt.url)}: no tokenizer files (tokenizer.json, tokenizer.model "
                         "or vocab.json) beside the weights, which a tokenizer source, --vocab union or a chat_template "
                         "needs; add them, or use the recipe without those")
    from raymerge.commit.aux import read_aux  # the commit's reader of these files (commit imports planning)

    os.makedirs(folder)
    for url in ckpt.aux_files:
        if posixpath.basename(url) in TOKENIZER_FILES + ("config.json", "generation_config.json"):
            data = read_aux(url, storage_options)  # a regular file, bounded (one-line errors)
            with open(os.path.join(folder, posixpath.basename(url)), "wb") as f:
                f.write(data)


def _output_tokenizer(spec: TokenizerSpec, base: Any, models: list[Any], toks: dict, sizes: dict, folder: str):
    if spec.source == "base":
        return toks[base.url]  # mergekit's own: tokens added to it are the base model's vocabulary then
    if spec.source != "union":
        return _tokenizer(toks[urls.normalize(spec.source)].name_or_path, "")  # a fresh copy, as mergekit loads
    # union: the base model's tokenizer (a fresh copy), then each model's tokens it lacks, in order
    # of the models (the base first), their added tokens after every plain one.
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for ckpt in [base, *[m for m in models if m.url != base.url]]:
        tok, size = toks[ckpt.url], sizes[ckpt.url]
        decoder = tok.added_tokens_decoder
        added_ids = {info.content for info in decoder.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):  # id order: the library's is a hash's
            if i < size and t not in added_ids:
                plain.setdefault(t)
        for i, info in sorted(decoder.items()):
            if i < size:
                added.setdefault(info.content, info)
    toks[base.url].save_pretrained(folder)
    out = _tokenizer(folder, "")
    have = toks[base.url].get_vocab()
    for t in plain:
        if t not in added and t not in have:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def _runs(spec: TokenizerSpec, vocab: dict[str, int], models: list[Any], base: Any, vocabs: dict,
          sizes: dict, group: tuple[int, ...]) -> tuple[tuple[RowRun, ...], ...]:
    """Per model of `group`, its output rows as runs (see the module's docstring)."""
    index = {models[m].url: m for m in group}
    have = {m: {t: i for t, i in vocabs[models[m].url].items() if i < sizes[models[m].url]} for m in group}
    chosen = {t.token: t for t in spec.tokens}
    defaults: dict[str, tuple[tuple[int, int], ...]] = {}
    for token, row in vocab.items():
        present = [(m, h[token]) for m, h in have.items() if token in h]
        t = chosen.get(token)
        if len(present) == len(group) and not (t and t.force):
            continue
        defaults[token] = _default(token, t, present, index.get(base.url), index, vocabs, models)
    out = []
    for m, h in have.items():
        rows: list[tuple[tuple[int, int], ...]] = [()] * len(vocab)
        for token, row in vocab.items():
            t = chosen.get(token)
            rows[row] = ((m, h[token]),) if token in h and not (t and t.force) else defaults.get(token, ())
        out.append(_as_runs(rows))
    return tuple(out)


def _default(token: str, t: TokenSource | None, present: list[tuple[int, int]], base: int | None,
             index: dict[str, int], vocabs: dict, models: list[Any]) -> tuple[tuple[int, int], ...]:
    """The parts of token's default row: mergekit's choice where the file gives none."""
    if t is None or not t.kind:
        if len(present) == 1:
            return tuple(present)
        if not present:
            return ()
        if base is not None and any(m == base for m, _ in present):
            return tuple(p for p in present if p[0] == base)
        return tuple(present)  # the mean of every model's row
    if t.kind == ZERO:
        return ()
    m = index.get(urls.normalize(t.model or ""))  # build() checked it is one of the models
    if m is None:
        raise InputError(f"tokenizer.tokens.{token!r}: {urls.redact(t.model or '')} is not merged into the embedding "
                         "and head (a frankenmerge takes them from its first and last slices' models); name one of "
                         "those models")
    if t.kind == "model":
        row = vocabs[models[m].url].get(token)
        if row is None:
            raise InputError(f"tokenizer.tokens.{token!r}: {urls.redact(models[m].url)} has no token {token!r}; "
                             "name a model that has it, or give source: {kind: model_token, ...}")
        return ((m, row),)
    row = t.token_id if t.source_token is None else vocabs[models[m].url].get(t.source_token)
    if row is None or not 0 <= row < (vocab_size(models[m].config) or 0):
        raise InputError(f"tokenizer.tokens.{token!r}: the source token is not in {urls.redact(models[m].url)}'s "
                         "vocabulary; name a token or token_id it has")
    return ((m, row),)


def _as_runs(rows: list[tuple[tuple[int, int], ...]]) -> tuple[RowRun, ...]:
    """Consecutive rows copied from consecutive rows of one model merge into one run."""
    runs: list[RowRun] = []
    for r, parts in enumerate(rows):
        last = runs[-1] if runs else None
        if (last and len(parts) == 1 and len(last.parts) == 1 and last.parts[0][0] == parts[0][0]
                and last.parts[0][1] + last.count == parts[0][1] and last.row + last.count == r):
            runs[-1] = RowRun(last.row, last.count + 1, last.parts)
        elif last and not parts and not last.parts and last.row + last.count == r:
            runs[-1] = RowRun(last.row, last.count + 1, ())
        else:
            runs.append(RowRun(r, 1, parts))
    return tuple(runs)


def parse_spec(source: Any, tokens: Any, where: str, reference, pad_to: Any = None) -> TokenizerSpec:
    """A TokenizerSpec from a file's `tokenizer_source` / `tokenizer.source`, `tokenizer.tokens` and
    `tokenizer.pad_to_multiple_of`; `reference`: a model reference as a URL (config.mergekit's)."""
    if pad_to is not None and (not isinstance(pad_to, int) or isinstance(pad_to, bool) or not 0 <= pad_to <= 1 << 20):
        raise InputError(f"{where}.pad_to_multiple_of: a whole number of rows (64, say), got {pad_to!r}")
    if not isinstance(source, str) or not source:
        raise InputError(f"{where}: source: base, union or a model reference, got {source!r}")
    src = source if source in ("base", "union") else reference(source, f"{where}.source")
    if tokens is None:
        tokens = {}
    if not isinstance(tokens, dict):
        raise InputError(f"{where}.tokens: a mapping of token -> {{source: ..., force: true|false}}")
    out = []
    for token, entry in tokens.items():
        at = f"{where}.tokens.{json.dumps(token)}"
        entry = entry or {}
        if not isinstance(token, str) or not isinstance(entry, dict) or set(entry) - {"source", "force"}:
            raise InputError(f"{at}: give {{source: MODEL | {{kind: zero}} | {{kind: model_token, model: MODEL, "
                             "token: T | token_id: N}}, force: true|false}}")
        force, s = entry.get("force", False), entry.get("source")
        if not isinstance(force, bool):
            raise InputError(f"{at}.force: true or false")
        if s is None:
            out.append(TokenSource(token, force=force))
        elif isinstance(s, str):
            out.append(TokenSource(token, "model", reference(s, f"{at}.source"), force=force))
        elif isinstance(s, dict) and s.get("kind") == ZERO and set(s) == {"kind"}:
            out.append(TokenSource(token, ZERO, force=force))
        elif (isinstance(s, dict) and s.get("kind") == "model_token" and set(s) - {"kind", "model", "token", "token_id"}
              == set() and ("token" in s) != ("token_id" in s)
              and (isinstance(s.get("token"), str) or (isinstance(s.get("token_id"), int) and s["token_id"] >= 0))):
            out.append(TokenSource(token, "model_token", reference(s.get("model"), f"{at}.source.model"),
                                   s.get("token"), s.get("token_id"), force))
        else:
            raise InputError(f"{at}.source: a model, {{kind: zero}}, or {{kind: model_token, model: MODEL, token: T}} "
                             "(or token_id: N, one of the two)")
    return TokenizerSpec(src, tuple(out), pad_to=pad_to or None)
