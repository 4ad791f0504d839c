"""Phase 1, resolve: find an input checkpoint's shards and index its tensors from their headers.

Only headers are read: one speculative range read per shard (FIRST_READ bytes, all shards of a
checkpoint at once), and a second only for the rare header longer than that.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from raymerge.errors import ResolveError
from raymerge.safetensors.header import Header, parse_header, read_header_bytes
from raymerge.safetensors.index import INDEX_NAME, SINGLE_NAME, parse_index
from raymerge.storage import urls
from raymerge.storage.hub import HubNotAuthorized, HubRevisionNotFound, pin
from raymerge.storage.localfs import kind
from raymerge.storage.ranges import fetch, s3_version
from raymerge.untrusted import UntrustedJSON, parse_json

# Files copied from the anchor checkpoint at commit, when present.
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json",
             "merges.txt", "chat_template.jinja", "chat_template.json")
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The aux files the commit parses as JSON (planner.PATCHED): checked at resolve, fail early.
PARSED_AUX = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
AUX_JSON_CAP = 64 * 2**20


@dataclass(frozen=True, slots=True)
class TensorRef:
    file: int  # index into Checkpoint.files
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True, slots=True)
class ShardFile:
    url: str  # pinned: hf://org/name@<commit sha>/file on the Hub
    size: int
    fingerprint: str
    version: str = ""  # what reads are pinned to: the commit sha (Hub), the ETag (S3), "" (local)


@dataclass(frozen=True)
class Checkpoint:
    role: str
    url: str  # as given (shown in messages); the URLs of its files and aux files are pinned
    files: tuple[ShardFile, ...]
    tensors: dict[str, TensorRef]  # in file order, then data order
    aux_files: tuple[str, ...]
    config: dict | None = None  # config.json, when the checkpoint has one


def resolve(role: str, url: str, storage_options: dict[str, Any] | None = None) -> Checkpoint:
    """Index the tensors of the checkpoint at `url` (a folder, or one .safetensors file).

    Every file URL is pinned to the version read here (a Hub URL to its commit), so that workers,
    the commit and a resumed run read these bytes or fail, never others."""
    shown = f"--{role} {urls.redact(url)}"
    fs, root = urls.filesystem(url, storage_options)
    root, commit = _pin(fs, root, shown)
    listing = _listing(fs, root, shown)
    single = root in listing  # the URL names one .safetensors file, not a folder
    if single:
        _check_is_safetensors(root, shown)
        folder, names = posixpath.dirname(root), [posixpath.basename(root)]
    else:
        folder = root
    listing = {posixpath.basename(p): info for p, info in listing.items()}
    _check_regular(listing, names if single else [INDEX_NAME, *AUX_FILES], shown)
    if not single:
        names = _shard_names(fs, folder, listing, shown)
        _check_regular(listing, names, shown)
    base_url = urls.normalize(fs.unstrip_protocol(root)) if commit else urls.normalize(url)
    paths = [posixpath.join(folder, n) for n in names]
    versions = {p: commit or _version(url, listing[n]) for p, n in zip(paths, names)}
    headers = _read_headers(fs, paths, [int(listing[n]["size"]) for n in names], shown, versions)
    files, tensors = [], {}
    for i, (name, path, (header, digest)) in enumerate(zip(names, paths, headers)):
        file_url = base_url if single else urls.join(base_url, name)
        version = versions[path]
        files.append(ShardFile(file_url, int(listing[name]["size"]), _fingerprint(listing[name], digest, version),
                               version))
        for e in header.entries:
            if e.name in tensors:
                raise ResolveError(f"{shown}: tensor {e.name!r} is in two shards ({name} and "
                                   f"{names[tensors[e.name].file]}); the checkpoint is inconsistent")
            tensors[e.name] = TensorRef(i, e.dtype, e.shape, header.data_start + e.begin, e.end - e.begin)
    if not tensors:
        raise ResolveError(f"{shown}: the checkpoint holds no tensors")
    aux = () if single else tuple(urls.join(base_url, n) for n in AUX_FILES if n in listing)
    config = None if single or "config.json" not in listing else _config(fs, folder, shown)
    _check_aux_json(fs, folder, aux, shown)
    # The URL as given (shown in messages); its files' URLs are the pinned ones.
    return Checkpoint(role, urls.normalize(url), tuple(files), tensors, aux, config)


def _config(fs, folder: str, shown: str) -> dict:
    return _json_object(fs, folder, "config.json", shown)


def _check_aux_json(fs, folder: str, aux: tuple[str, ...], shown: str) -> None:
    """Parse the JSON files the commit will parse, so that a bad one fails now, not after all the work."""
    names = [n for n in PARSED_AUX if any(posixpath.basename(u) == n for u in aux)]
    if names:
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            list(pool.map(lambda n: _json_object(fs, folder, n, shown), names))


def _json_object(fs, folder: str, name: str, shown: str) -> dict:
    # Read one byte past the cap, not the whole file: parse_json refuses it as too large.
    raw = _cat(fs, posixpath.join(folder, name), shown, 0, AUX_JSON_CAP + 1)
    try:
        obj = parse_json(raw, max_bytes=AUX_JSON_CAP)
    except UntrustedJSON as e:
        raise ResolveError(f"{shown}: {name} refused ({e}); fix or remove it") from e
    if not isinstance(obj, dict):
        raise ResolveError(f"{shown}: {name} is not a JSON object; fix or remove it")
    return obj


def _pin(fs, root: str, shown: str) -> tuple[str, str]:
    """(root, commit): a Hub path pinned to the commit its revision names now; others as they are."""
    if "hf" not in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        return root, ""
    try:
        return pin(fs, root)
    except HubNotAuthorized as e:
        raise ResolveError(f"{shown}: repository not found or not authorized ({e}); if it is private or gated, "
                           "set HF_TOKEN (or pass --storage-options '{\"token\": ...}')") from e
    except HubRevisionNotFound as e:
        raise ResolveError(f"{shown}: {e}; check the branch, tag or commit after '@'") from e
    except Exception as e:  # HfUriError, connection errors: the Hub's own types
        raise ResolveError(f"{shown}: cannot look it up on the Hub ({type(e).__name__}: {e}); check the URL, "
                           "HF_ENDPOINT and your connection") from e


def _version(url: str, info: dict) -> str:
    """What reads of one listed file are pinned to: the S3 ETag (and VersionId); "" elsewhere."""
    return s3_version(info) if urls.protocol(url) == "s3" else ""


def _listing(fs, root: str, shown: str) -> dict[str, dict]:
    try:
        # fsspec keeps one filesystem per process with its listings cached: a long-lived process
        # (the Python API) must see the versions there are now, not those of an earlier run.
        fs.invalidate_cache(root)
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


def _check_regular(listing: dict[str, dict], names: list[str], shown: str) -> None:
    """Refuse a FIFO, socket or device where a file raymerge reads belongs: reading it could block
    forever or never end. A local listing calls them, and every symbolic link, type "other"; a link
    to a regular file (the Hugging Face cache's snapshots) is a file like any other."""
    for name in names:
        info = listing.get(name)
        what = _special(info) if info is not None and info.get("type") not in ("file", "directory") else None
        if what:
            raise ResolveError(f"{shown}: {name} is {what}, not a regular file; replace it with the file or remove "
                               "it from the folder")


def _special(info: dict) -> str | None:
    """What a listed local entry is, when it is not (a link to) a regular file; None when it is."""
    if not info.get("islink"):
        mode = info.get("mode")
        return kind(mode) if isinstance(mode, int) else "a special file"
    try:
        mode = os.stat(info["name"]).st_mode
    except (OSError, KeyError, TypeError):
        return "a symbolic link to nothing readable"
    return None if stat.S_ISREG(mode) else f"a symbolic link to {kind(mode)}"


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
        # one byte past the cap at most: parse_index refuses it as too large
        weight_map = parse_index(_cat(fs, posixpath.join(folder, INDEX_NAME), shown, 0, AUX_JSON_CAP + 1), where)
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
    """Bytes [start, end) of a file, fewer where it ends first; read exactly (no read-ahead)."""
    try:
        if start is None and end is None:
            return fs.cat_file(path)
        size = fs.size(path)  # from the listing just made, on remote backends
        start, end = start or 0, size if end is None else min(end, size)
        return fetch(fs, [(path, start, end)], sizes={path: size})[0] if start < end else b""
    except Exception as e:
        raise ResolveError(f"{shown}: reading {posixpath.basename(path)} failed "
                           f"({type(e).__name__}: {e})") from e


def _read_headers(fs, paths: list[str], sizes: list[int], shown: str,
                  versions: dict[str, str]) -> list[tuple[Header, str]]:
    """Each shard's header and its digest: all first reads at once, then the rare second ones."""
    size_of = dict(zip(paths, sizes))
    wheres = [f"{shown}: {posixpath.basename(path)}" for path in paths]
    raws = read_header_bytes(
        lambda requests: _ranges(fs, [(paths[i], start, end) for i, start, end in requests], size_of, versions, shown),
        sizes, wheres)
    return [(parse_header(raw, where, size), hashlib.sha256(raw).hexdigest())
            for raw, where, size in zip(raws, wheres, sizes)]


def _ranges(fs, requests: list[tuple[str, int, int]], sizes: dict[str, int], versions: dict[str, str],
            shown: str) -> list[bytes]:
    if not requests:
        return []
    try:
        return fetch(fs, requests, versions=versions, sizes=sizes)
    except Exception as e:
        raise ResolveError(f"{shown}: reading shard headers failed ({type(e).__name__}: {e})") from e


def _fingerprint(info: dict, header_digest: str, pinned: str = "") -> str:
    """What identifies one version of a shard: its size, commit, ETag or mtime, and its header."""
    version = (pinned or info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
               or "")
    return f"size={info.get('size')};version={str(version).strip(chr(34))};header={header_digest[:16]}"
