"""`raymerge inspect`: the per-tensor change a run recorded, summarized per layer, and plotted.

Users of chat vectors look at the relative change ||out - cp|| / ||cp|| per layer and tensor
type to choose a scale: a vector that rewrites a layer by tens of percent is too strong.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any

from raymerge.commit.manifest import MANIFEST_NAME
from raymerge.commit.stats import read_stats
from raymerge.errors import InputError
from raymerge.storage import urls

_LAYER = re.compile(r"\.(\d+)\.")


def tensor_kind(name: str) -> tuple[int | None, str]:
    """(layer index, tensor type): 'model.layers.3.mlp.up_proj.weight' -> (3, 'mlp.up_proj.weight')."""
    m = _LAYER.search(name)
    if not m:
        return None, name
    return int(m.group(1)), name[m.end():]


def load(url: str, storage_options: dict[str, Any]) -> tuple[dict, list[dict]]:
    fs, path = urls.filesystem(url, storage_options)
    try:
        manifest = json.loads(fs.cat_file(f"{path.rstrip('/')}/{MANIFEST_NAME}"))
    except FileNotFoundError as e:
        raise InputError(f"inspect {urls.redact(url)}: no {MANIFEST_NAME}; it is not a finished raymerge "
                         "checkpoint") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"inspect {urls.redact(url)}: {MANIFEST_NAME} is not valid JSON") from e
    try:
        table = read_stats(fs.cat_file(f"{path.rstrip('/')}/{manifest.get('stats', '')}"))
    except (FileNotFoundError, OSError) as e:
        raise InputError(f"inspect {urls.redact(url)}: its statistics table is missing or unreadable ({e})") from e
    return manifest, table.to_pylist()


def summarize(manifest: dict, rows: list[dict]) -> str:
    by_layer: dict[Any, list[dict]] = defaultdict(list)
    for row in rows:
        layer, _ = tensor_kind(row["tensor"])
        by_layer[layer].append(row)
    lines = [f"{manifest.get('kind', '?')}: {len(rows)} tensors, plan {manifest.get('plan_hash', '')[:12]}",
             f"{'layer':>6}  {'tensors':>7}  {'mean rel':>9}  {'max rel':>9}  largest change in"]
    for layer in sorted(by_layer, key=lambda x: (x is None, x if x is not None else 0)):
        group = by_layer[layer]
        rel = [(r["relative"], r["tensor"]) for r in group if r["relative"] is not None]
        norms = [(r["delta_norm"], r["tensor"]) for r in group]
        name = "other" if layer is None else str(layer)
        if rel:
            top = max(rel)
            lines.append(f"{name:>6}  {len(group):>7}  {sum(v for v, _ in rel) / len(rel):>9.4%}  {top[0]:>9.4%}  "
                         f"{tensor_kind(top[1])[1]}")
        else:  # an extracted vector: no anchor to compare with, show the size of the change
            top = max(norms)
            lines.append(f"{name:>6}  {len(group):>7}  {'-':>9}  {'-':>9}  {tensor_kind(top[1])[1]} "
                         f"(||delta|| {top[0]:.4g})")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InputError("--plot needs matplotlib: pip install 'raymerge[plot]'") from e
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    use_relative = any(r["relative"] is not None for r in rows)
    for row in rows:
        layer, kind = tensor_kind(row["tensor"])
        value = row["relative"] if use_relative else row["delta_norm"]
        if layer is not None and value is not None:
            series[kind].append((layer, value))
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for kind, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=kind)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("||out - cp|| / ||cp||" if use_relative else "||vector||")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def inspect_checkpoint(url: str, storage_options: dict[str, Any], plot_path: str | None = None) -> str:
    manifest, rows = load(url, storage_options)
    text = summarize(manifest, rows)
    if plot_path:
        plot(rows, plot_path, f"{manifest.get('kind', 'raymerge')}: change per layer and tensor type")
        text += f"\nplot written to {plot_path}"
    return text
