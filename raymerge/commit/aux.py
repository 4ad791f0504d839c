"""Auxiliary files: cp's config and tokenizer, with the chat model's chat template and EOS settings,
and a config.json whose dtype is the output's.

They are read, checked and patched at plan time (`aux_contents`), before any lease is taken or
any item is done, so that a run never fails or hangs after its work is done; the commit writes the
bytes kept in memory. Every local file is opened as a regular file only (storage.localfs): a FIFO
where a tokenizer belongs is refused in one line, never waited on.

The chat template lives in `tokenizer_config.json` (`chat_template`) or in `chat_template.jinja`
(copied whole by the plan); EOS lives in `tokenizer_config.json` (`eos_token`),
`special_tokens_map.json` (`eos_token`) and `generation_config.json` (`eos_token_id`).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from raymerge.errors import ResolveError
from raymerge.planning.plan import AuxFile, Plan
from raymerge.safetensors.dtypes import FLOATS
from raymerge.storage import urls
from raymerge.untrusted import UntrustedJSON, parse_json

AUX_CAP = 64 * 2**20  # bytes: far past any tokenizer or config file
TAKEN = {
    "tokenizer_config.json": ("chat_template", "eos_token"),
    "special_tokens_map.json": ("eos_token",),
    "generation_config.json": ("eos_token_id",),
}
# safetensors dtype -> the name config.json's torch_dtype / dtype give it
TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
               "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
DTYPE_KEYS = ("torch_dtype", "dtype")


def aux_contents(plan: Plan, storage_options: dict[str, Any]) -> dict[str, bytes]:
    """name -> the bytes the commit writes, for every aux file of the plan (ResolveError, exit 2,
    for a file that cannot be read or patched: it names the file and what to do)."""
    cache: dict[str, bytes] = {}

    def read(url: str) -> bytes:
        if url not in cache:
            cache[url] = read_aux(url, storage_options)
        return cache[url]

    out = {}
    for aux in plan.aux_files:
        out[aux.name] = _contents(plan, aux, read)
        if aux.name == "config.json":
            out[aux.name] = with_dtype(out[aux.name], output_dtype(plan), aux.source)
            if plan.layers:
                out[aux.name] = with_layers(out[aux.name], [sources[0][1] for sources in plan.layers], aux.source)
            if plan.vocab_size is not None:
                out[aux.name] = with_vocab_size(out[aux.name], plan.vocab_size, aux.source)
        if aux.name == "generation_config.json" and plan.eos_ids is not None:
            out[aux.name] = with_eos_ids(out[aux.name], plan.eos_ids, aux.source)
    return out


def with_vocab_size(config: bytes, size: int, where: str) -> bytes:
    """config.json of a merge with a tokenizer source: the output vocabulary's size where the config
    declares one (at the top, or in text_config), as mergekit sets it."""
    obj = _config(config, where)
    if not isinstance(obj, dict):
        return config
    for d in (obj, obj.get("text_config")):
        if isinstance(d, dict) and "vocab_size" in d:
            d["vocab_size"] = size
            break
    return _json(obj)


def with_eos_ids(config: bytes, ids: tuple[int, ...], where: str) -> bytes:
    """generation_config.json with `ids` (the chat model's EOS tokens' ids in a new vocabulary)."""
    obj = _config(config, where)
    if not isinstance(obj, dict):
        return config
    obj["eos_token_id"] = ids[0] if len(ids) == 1 else list(ids)
    return _json(obj)


def _json(obj: Any) -> bytes:
    """A JSON file as the aux files are written: indented, text as it is, a final newline."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def _config(config: bytes, where: str) -> Any:
    try:
        return parse_json(config, max_bytes=AUX_CAP)
    except UntrustedJSON as e:
        raise ResolveError(f"resolve: {urls.redact(where)}: config.json refused ({e}); fix or remove it") from e


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # what configs call their layer count


def with_layers(config: bytes, sources: list[int], where: str) -> bytes:
    """config.json of a frankenmerge: the language model's layer count (at the top, or in
    text_config) the output's. Its per-layer list (`layer_types`: which attention each layer has),
    where it has one, must stay as long: the same type everywhere is kept so; else each output
    layer takes the type of the layer it comes from (`sources`, layers of this config's model), and
    a source past the list is refused (ResolveError, at plan time), never written stale."""
    obj = _config(config, where)
    if not isinstance(obj, dict):
        return config
    for d in (obj, obj.get("text_config")):
        key = next((k for k in LAYER_KEYS if isinstance(d, dict) and isinstance(d.get(k), int)
                    and not isinstance(d.get(k), bool)), None)
        if key is None:
            continue
        types = d.get("layer_types")
        if isinstance(types, list) and types:
            if len(set(map(json.dumps, types))) == 1:
                d["layer_types"] = [types[0]] * len(sources)
            elif all(0 <= i < len(types) for i in sources):
                d["layer_types"] = [types[i] for i in sources]
            else:
                raise ResolveError(f"resolve: {urls.redact(where)}: its layer_types name {len(types)} layers, and the "
                                   "frankenmerge takes layers past them; take layers within them, or give the "
                                   "output a config whose layer_types cover the slices' layers")
        d[key] = len(sources)
    return _json(obj)


def _contents(plan: Plan, aux: AuxFile, read) -> bytes:
    data = read(aux.source)
    if aux.patch_from is None:
        return data
    try:
        merged = patched(aux.name, data, read(aux.patch_from))
    except (ValueError, UnicodeDecodeError) as e:
        raise ResolveError(f"resolve: cannot take the chat template / EOS into {aux.name} ({e}); "
                           "fix the file or pass --no-chat-template") from e
    # A chat_template.jinja from the chat model wins: drop cp's inline template so none contradicts it.
    folder = aux.patch_from.rsplit("/", 1)[0]
    if aux.name == "tokenizer_config.json" and any(
            a.name == "chat_template.jinja" and a.source.rsplit("/", 1)[0] == folder for a in plan.aux_files):
        obj = json.loads(merged)
        obj.pop("chat_template", None)
        merged = _json(obj)
    return merged


def read_aux(url: str, storage_options: dict[str, Any]) -> bytes:
    """An auxiliary file's bytes: a regular file, at most AUX_CAP (ResolveError, exit 2, else)."""
    fs, path = urls.filesystem(url, storage_options)
    try:
        data = fs.cat_file(path, start=0, end=AUX_CAP + 1)
    except OSError as e:  # NotRegular (a FIFO, a device) and missing files included
        raise ResolveError(f"resolve: cannot read {urls.redact(url)} ({e.strerror or e}); an auxiliary file "
                           "(config, tokenizer) must be a regular file: replace or remove it") from e
    except Exception as e:  # remote backends raise their own types
        raise ResolveError(f"resolve: reading {urls.redact(url)} failed ({type(e).__name__}: {e}); check the URL "
                           "and credentials") from e
    if len(data) > AUX_CAP:
        raise ResolveError(f"resolve: {urls.redact(url)} is larger than {AUX_CAP // 2**20} MiB, too large for a "
                           "config or tokenizer file; remove it from the checkpoint folder")
    return data


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
    return _json(mine)


def output_dtype(plan: Plan) -> str | None:
    """The float dtype of most of the output's floating-point bytes (None without float tensors)."""
    by_bytes: Counter[str] = Counter()
    for t in plan.tensors:
        if t.dtype in FLOATS:
            by_bytes[t.dtype] += t.nbytes
    return by_bytes.most_common(1)[0][0] if by_bytes else None


def with_dtype(config: bytes, dtype: str | None, where: str) -> bytes:
    """config.json naming `dtype` wherever it names one (`torch_dtype`, `dtype`, at the top and in
    sub-configs such as text_config): loaders read it to choose the dtype they load in. Unchanged,
    byte for byte, when it already says so or names none."""
    name = TORCH_NAMES.get(dtype or "")
    try:
        obj = parse_json(config, max_bytes=AUX_CAP)
    except UntrustedJSON as e:
        raise ResolveError(f"resolve: {urls.redact(where)}: config.json refused ({e}); fix or remove it") from e
    if name is None or not isinstance(obj, dict):
        return config
    changed = False
    for d in (obj, *(v for v in obj.values() if isinstance(v, dict))):
        for key in DTYPE_KEYS:
            if isinstance(d.get(key), str) and d[key] != name:
                d[key] = name
                changed = True
    return _json(obj) if changed else config
