"""The model card and the recipe copy every output gets (unless --no-card): `README.md`, with the
Hub's YAML front matter, and the recipe that made the checkpoint, `mergekit_config.yml` (a mergekit
file, as given) or `raymerge_recipe.yaml` (what `raymerge run` reads again).

Made at plan time from the recipe and the plan alone, as the other small files are (commit.aux),
so a run never fails after its work is done. Inputs appear by their repo ids (Hub) or their URLs
with any user:password@ and ?query hidden; the card names each Hub input's pinned commit, never
an endpoint or a token.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import TYPE_CHECKING, Any

import yaml

from raymerge.storage import urls

if TYPE_CHECKING:  # the commit reads a recipe's fields; config imports commit, never the other way
    from raymerge.config import Recipe
    from raymerge.planning.plan import Plan

CARD = "README.md"
MERGEKIT_COPY = "mergekit_config.yml"
RECIPE_COPY = "raymerge_recipe.yaml"
_HUB = re.compile(r"^hf://(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^/]+))?(?:/.*)?$")
_QUERY = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s?#'\"]*)[?#][^\s'\"]*", re.IGNORECASE)


def card_names(recipe: Recipe) -> tuple[str, ...]:
    """The files the card adds to the checkpoint."""
    return (CARD, MERGEKIT_COPY if recipe.mergekit_text is not None else RECIPE_COPY)


def card_files(recipe: Recipe, plan: Plan, roles: dict[str, str]) -> dict[str, bytes]:
    """name -> bytes of the card and the recipe copy. `roles`: each input URL as given -> its role."""
    if recipe.mergekit_text is not None:
        copy_name, copy = MERGEKIT_COPY, clean(recipe.mergekit_text)
    else:
        copy_name = RECIPE_COPY
        copy = yaml.safe_dump(_cleaned(recipe.to_mapping()), sort_keys=False, allow_unicode=True)
    inputs = _inputs(plan, roles)
    front = {"base_model": [model for _, model, _, hub in inputs if hub], "base_model_relation": "merge",
             "library_name": "transformers",
             "tags": ["merge", "raymerge", *(["mergekit"] if recipe.mergekit_text is not None else [])]}
    if not front["base_model"]:
        del front["base_model"], front["base_model_relation"]  # the Hub knows no input of it
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---",
             f"# {_title(recipe.out)}", "",
             "Made with raymerge, by arithmetic on the inputs' weights (no training).", "", "## Method", "", *_method(recipe), "", "## Inputs", "",
             "| role | model | revision |", "| --- | --- | --- |",
             *(f"| {role} | {_cell(model)} | {_cell(rev) or '-'} |" for role, model, rev, _ in inputs),
             "", "## Parameters", "", *_parameters(recipe), "", "## Recipe", "",
             f"The recipe that made this checkpoint (`{copy_name}` beside this card"
             + (", a mergekit configuration, as given" if recipe.mergekit_text is not None else
                f"; `raymerge run {copy_name}` runs it again") + "):", "", *_fenced(copy)]
    return {CARD: ("\n".join(lines) + "\n").encode(), copy_name: copy.encode()}


def clean(text: str) -> str:
    """`text` with user:password@ and the ?query (a presigned signature, a token) of every URL hidden."""
    return _QUERY.sub(r"\1", urls.redact(text))


def _cleaned(value: Any) -> Any:
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, list):
        return [_cleaned(v) for v in value]
    if isinstance(value, dict):
        return {k: _cleaned(v) for k, v in value.items()}
    return value


def _inputs(plan: Plan, roles: dict[str, str]) -> list[tuple[str, str, str, bool]]:
    """(role, model, pinned revision or "", on the Hub) per input, in the recipe's order: a Hub
    input by its repo id and commit, any other by its URL (cleaned)."""
    out = []
    for url, role in roles.items():
        pinned = next((f.url for f in plan.files if f.role == role), url)
        m = _HUB.match(pinned) or _HUB.match(url)
        out.append((role, m.group("repo"), m.group("rev") or "", True) if m else (role, clean(url), "", False))
    return out


def _title(out: str | None) -> str:
    return posixpath.basename(clean(out or "").rstrip("/")) or "merged model"


def _method(recipe: Recipe) -> list[str]:
    how = recipe.how
    if recipe.mergekit_text is not None:
        compute = recipe.compute_dtype
        how_computed = ("in float32, rounded once to the output dtype" if compute == "F32" else
                        "at each tensor's input dtype, each operation rounded as mergekit 0.1.5 rounds it"
                        if compute == "inputs" else
                        f"in {compute.lower()}, each operation rounded as mergekit 0.1.5 rounds it")
        return [f"mergekit's `{recipe.method_name}` merge method, computed {how_computed}."]
    if recipe.method and recipe.method != how.method:
        return [f"`raymerge {recipe.kind}` with `method: {recipe.method}`: the vectors combine by mergekit's "
                f"{recipe.method} (its parameters below), then are added to {how.anchor}."]
    return [f"`raymerge {recipe.kind}`: {how.summary}."]


def _parameters(recipe: Recipe) -> list[str]:
    """Every setting of the recipe but its inputs and output, one bullet each."""
    inputs = {"kind", "base", "cp", "out", recipe.how.vectors}
    out = [f"- `{k}`: {_cell(json.dumps(_cleaned(v), ensure_ascii=False))}"
           for k, v in recipe.to_mapping().items() if k not in inputs and v not in (None, [], "")]
    return out or ["- none: the defaults"]


def _cell(text: str) -> str:
    """Text for one line of markdown (a table cell or a bullet): escaped, no line break, no bar."""
    return " ".join(text.split()).replace("|", "\\|")


def _fenced(text: str) -> list[str]:
    """A code block that no run of backticks in `text` can close."""
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return [fence + "yaml", text.rstrip("\n"), fence]
