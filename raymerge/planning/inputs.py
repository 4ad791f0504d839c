"""Phase 1, resolve: find an input checkpoint's shards and index its tensors from their headers.

Only headers are read: one speculative range read per shard (FIRST_READ bytes, all shards of a
checkpoint at once), and a second only for the rare header longer than that.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Any

from raymerge.errors import ResolveError
from raymerge.safetensors.header import FIRST_READ, Header, header_length, parse_header
from raymerge.safetensors.index import INDEX_NAME, SINGLE_NAME, parse_index
from raymerge.storage import urls

# Files copied from the anchor checkpoint at commit, when present.
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json",
             "merges.txt", "chat_template.jinja", "chat_template.json")
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True, slots=True)
class TensorRef:
    file: int  # index into Checkpoint.files
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True, slots=True)
class ShardFile:
    url: str
    size: int
    fingerprint: str


@dataclass(frozen=True)
class Checkpoint:
    role: str
    url: str
    files: tuple[ShardFile, ...]
    tensors: dict[str, TensorRef]  # in file order, then data order
    aux_files: tuple[str, ...]
    config: dict | None = None  # config.json, when the checkpoint has one


def resolve(role: str, url: str, storage_options: dict[str, Any] | None = None) -> Checkpoint:
    """Index the tensors of the checkpoint at `url` (a folder, or one .safetensors file)."""
    shown = f"--{role} {urls.redact(url)}"
    fs, root = urls.filesystem(url, storage_options)
    listing = _listing(fs, root, shown)
    single = root in listing  # the URL names one .safetensors file, not a folder
    if single:
        _check_is_safetensors(root, shown)
        folder, names = posixpath.dirname(root), [posixpath.basename(root)]
    else:
        folder = root
    listing = {posixpath.basename(p): info for p, info in listing.items()}
    if not single:
        names = _shard_names(fs, folder, listing, shown)
    base_url = urls.normalize(url)
    paths = [posixpath.join(folder, n) for n in names]
    headers = _read_headers(fs, paths, [int(listing[n]["size"]) for n in names], shown)
    files, tensors = [], {}
    for i, (name, (header, digest)) in enumerate(zip(names, headers)):
        file_url = base_url if single else urls.join(base_url, name)
        files.append(ShardFile(file_url, int(listing[name]["size"]), _fingerprint(listing[name], digest)))
        for e in header.entries:
            if e.name in tensors:
                raise ResolveError(f"{shown}: tensor {e.name!r} is in two shards ({name} and "
                                   f"{names[tensors[e.name].file]}); the checkpoint is inconsistent")
            tensors[e.name] = TensorRef(i, e.dtype, e.shape, header.data_start + e.begin, e.end - e.begin)
    if not tensors:
        raise ResolveError(f"{shown}: the checkpoint holds no tensors")
    aux = () if single else tuple(urls.join(base_url, n) for n in AUX_FILES if n in listing)
    config = None if single or "config.json" not in listing else _config(fs, folder, shown)
    return Checkpoint(role, base_url, tuple(files), tensors, aux, config)


def _config(fs, folder: str, shown: str) -> dict:
    raw = _cat(fs, posixpath.join(folder, "config.json"), shown)
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResolveError(f"{shown}: config.json is not valid JSON ({e}); fix or remove it") from e
    if not isinstance(config, dict):
        raise ResolveError(f"{shown}: config.json is not a JSON object; fix or remove it")
    return config


def _listing(fs, root: str, shown: str) -> dict[str, dict]:
    try:
        if fs.isfile(root):
            return {root: fs.info(root)}
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        entries = None
    except PermissionError as e:
        raise ResolveError(f"{shown}: permission denied ({e}); check credentials") from e
    except Exception as e:  # remote backends raise their own types
        raise ResolveError(f"{shown}: cannot list it ({type(e).__name__}: {e}); check the URL, "
                           "credentials and --storage-options") from e
    if entries is None:
        raise ResolveError(f"{shown}: no such checkpoint (nothing found there); check the URL")
    return {e["name"].rstrip("/"): e for e in entries if e.get("type") != "directory"}


def _check_is_safetensors(path: str, shown: str) -> None:
    if path.endswith(PICKLED):
        raise ResolveError(f"{shown}: is a pickled checkpoint, which raymerge never unpickles; "
                           "convert it to safetensors first")
    if not path.endswith(".safetensors"):
        raise ResolveError(f"{shown}: is a file but not a .safetensors file; give the checkpoint "
                           "folder or its .safetensors file")


def _shard_names(fs, folder: str, listing: dict[str, dict], shown: str) -> list[str]:
    """Shard file names from the index file, a single model.safetensors, or all *.safetensors."""
    if INDEX_NAME in listing:
        where = f"{shown}: {INDEX_NAME}"
        weight_map = parse_index(_cat(fs, posixpath.join(folder, INDEX_NAME), shown), where)
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if n not in listing]
        if missing:
            raise ResolveError(f"{where}: names shard files that are not there: {', '.join(missing)}; "
                               "the checkpoint is incomplete, re-download it")
        return names
    if SINGLE_NAME in listing:
        return [SINGLE_NAME]
    names = sorted(n for n in listing if n.endswith(".safetensors"))
    if names:
        return names
    pickled = sorted(n for n in listing if n.endswith(PICKLED))
    if pickled:
        raise ResolveError(f"{shown}: holds only pickled weights ({', '.join(pickled[:3])}), which raymerge "
                           "never unpickles; convert the checkpoint to safetensors first")
    raise ResolveError(f"{shown}: holds no .safetensors files and no {INDEX_NAME}; "
                       "point it at a Hugging Face style checkpoint folder")


def _cat(fs, path: str, shown: str, start: int | None = None, end: int | None = None) -> bytes:
    try:
        return fs.cat_file(path, start=start, end=end)
    except Exception as e:
        raise ResolveError(f"{shown}: reading {posixpath.basename(path)} failed "
                           f"({type(e).__name__}: {e})") from e


def _read_headers(fs, paths: list[str], sizes: list[int], shown: str) -> list[tuple[Header, str]]:
    ends = [min(size, FIRST_READ) for size in sizes]
    try:
        firsts = fs.cat_ranges(paths, [0] * len(paths), ends, on_error="raise")
    except Exception as e:
        raise ResolveError(f"{shown}: reading shard headers failed ({type(e).__name__}: {e})") from e
    out = []
    for path, size, raw in zip(paths, sizes, firsts):
        where = f"{shown}: {posixpath.basename(path)}"
        n = header_length(raw, where, size)
        if 8 + n > len(raw):
            raw = raw + _cat(fs, path, shown, len(raw), 8 + n)
        raw = raw[:8 + n]
        out.append((parse_header(raw, where, size), hashlib.sha256(raw).hexdigest()))
    return out


def _fingerprint(info: dict, header_digest: str) -> str:
    """What identifies one version of a shard: its size, ETag or mtime, and its header."""
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"size={info.get('size')};version={str(version).strip(chr(34))};header={header_digest[:16]}"
