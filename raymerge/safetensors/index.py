"""The Hugging Face `model.safetensors.index.json`: read and check it, and write it."""

from __future__ import annotations

import json
import posixpath

from raymerge.errors import ResolveError
from raymerge.untrusted import UntrustedJSON, parse_json, shown

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def shard_name(i: int, n: int) -> str:
    """HF's name for shard i (0-based) of n; a single shard is `model.safetensors`."""
    return SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def parse_index(raw: bytes, where: str) -> dict[str, str]:
    """The weight map (tensor -> shard file name) of an index file, with its file names checked."""
    try:
        obj = parse_json(raw)
    except UntrustedJSON as e:
        raise ResolveError(f"{where}: refused ({e}); re-download the index file") from e
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ResolveError(f"{where}: has no 'weight_map' object; re-download the index file")
    if not isinstance(obj.get("metadata", {}), dict):
        raise ResolveError(f"{where}: 'metadata' is not an object; re-download the index file")
    for tensor, file in weight_map.items():
        if not tensor:
            raise ResolveError(f"{where}: maps a tensor with an empty name; re-download the index file")
        if not isinstance(file, str) or not is_safe_name(file):
            raise ResolveError(f"{where}: tensor {shown(tensor)} maps to {shown(file)}, which is not a "
                               "plain file name inside the checkpoint; refusing to follow it")
    return weight_map


def is_safe_name(name: str) -> bool:
    """A relative path that stays inside its folder (no '..', not absolute, no backslashes)."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return False
    norm = posixpath.normpath(name)
    return not (norm.startswith("..") or norm.startswith("/") or norm == ".")


def index_bytes(total_size: int, weight_map: dict[str, str]) -> bytes:
    obj = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    return (json.dumps(obj, indent=2) + "\n").encode()
