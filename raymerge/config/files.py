"""Recipe files: raymerge's YAML recipes and mergekit's configurations, read as untrusted."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from raymerge.bounds import MAX_YAML_BYTES, load_yaml, read_regular_file
from raymerge.config import mergekit
from raymerge.config.options import RunOptions
from raymerge.config.recipe import Recipe, build_recipe
from raymerge.errors import InputError
from raymerge.methods import RECIPES


def load_recipe_file(path: str, flags: dict[str, Any] | None = None) -> tuple[Recipe, RunOptions]:
    """A YAML recipe: `kind` plus the same keys as the command's flags (`-` or `_`). `flags`: keys
    given on the command line, which win over the file's. The file is read as untrusted: a regular
    file only (a FIFO would block), bounded in size, nesting and alias expansion (raymerge.bounds)."""
    raw = read_regular_file(path, MAX_YAML_BYTES + 1, "recipe")
    data = load_yaml(raw, f"recipe {path}")
    if not isinstance(data, dict):
        raise InputError(f"recipe {path}: must be a mapping of keys like kind, base, chat, cp, out")
    if mergekit.is_mergekit(data):
        kind, values = mergekit.recipe_values(data, f"recipe {path}")
        recipe, options = build_recipe(kind, {**values, **(flags or {})}, where=f"recipe {path}")
        return replace(recipe, mergekit_text=raw.decode("utf-8", errors="replace")), options
    kind = data.pop("kind", None)
    if kind is None:
        kinds = [f"'kind: {k}'" for k in RECIPES]
        raise InputError(f"recipe {path}: needs {', '.join(kinds[:-1])} or {kinds[-1]}")
    data = {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in data.items()}
    data.update(flags or {})
    return build_recipe(kind, data, where=f"recipe {path}")
