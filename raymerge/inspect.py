"""`raymerge inspect`: the per-tensor change a run recorded, summarized per layer, and plotted.

Users of chat vectors look at the relative change ||out - cp|| / ||cp|| per layer and tensor
type to choose a scale: a vector that rewrites a layer by tens of percent is too strong.
"""

from __future__ import annotations

import io
import os
import re
from collections import defaultdict
from typing import Any

from raymerge.commit.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest
from raymerge.errors import InputError
from raymerge.storage import urls
from raymerge.storage.localfs import write_regular
from raymerge.untrusted import MAX_TEXT

_LAYER = re.compile(r"\.([0-9]{1,9})\.")  # bounded, ASCII: a name from the table is data, not trusted
MAX_STATS_BYTES = 256 * 2**20
MAX_STATS_ROWS = 1_000_000  # ten times the tensors of the largest checkpoints (~100,000)
MAX_STATS_NAMES = 256 * 2**20  # characters of all names: Parquet compresses a repeated long name away
MAX_TENSOR_NAME = MAX_TEXT  # characters, as the manifest allows
_BATCH_ROWS = 1024  # what is decoded at once, and checked, before it becomes Python objects


def _is_text(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_float(t) -> bool:
    import pyarrow as pa

    return pa.types.is_floating(t)


# column -> (type check, may hold nulls, what it should be)
_STATS_COLUMNS = {"tensor": (_is_text, False, "text"), "delta_norm": (_is_float, False, "a float"),
                  "relative": (_is_float, True, "a float")}


def tensor_kind(name: str) -> tuple[int | None, str]:
    """(layer index, tensor type): 'model.layers.3.mlp.up_proj.weight' -> (3, 'mlp.up_proj.weight')."""
    m = _LAYER.search(name)
    if not m:
        return None, name
    return int(m.group(1)), name[m.end():]


def load(url: str, storage_options: dict[str, Any]) -> tuple[Manifest, list[dict]]:
    fs, path = urls.filesystem(url, storage_options)
    shown = f"inspect {urls.redact(url)}"
    try:
        raw = fs.cat_file(f"{path.rstrip('/')}/{MANIFEST_NAME}", start=0, end=MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError as e:
        raise InputError(f"{shown}: no {MANIFEST_NAME}; it is not a finished raymerge checkpoint") from e
    except OSError as e:  # a FIFO or a device there (storage.localfs) is not waited on
        raise InputError(f"{shown}: cannot read {MANIFEST_NAME} ({e.strerror or e}); it is not a finished "
                         "raymerge checkpoint") from e
    manifest = Manifest.from_json(raw, shown)
    try:
        data = fs.cat_file(f"{path.rstrip('/')}/{manifest.stats}", start=0, end=MAX_STATS_BYTES + 1)
    except (FileNotFoundError, OSError) as e:
        raise InputError(f"{shown}: its statistics table is missing or unreadable ({e})") from e
    return manifest, stats_rows(data, f"{shown}: {manifest.stats}")


def stats_rows(data: bytes, where: str) -> list[dict]:
    """The columns inspect uses, read as plain data and type-checked: a damaged or foreign table
    is one InputError, never a traceback (and never anything but numbers and strings)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(data) > MAX_STATS_BYTES:
        raise InputError(f"{where}: larger than {MAX_STATS_BYTES // 2**20} MiB; it is not raymerge's table")
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        schema = parquet.schema_arrow
        for name, (is_type, _, kind) in _STATS_COLUMNS.items():
            at = schema.get_field_index(name)
            if at < 0 or not is_type(schema.field(at).type):
                found = str(schema.field(at).type)[:40] if at >= 0 else "missing"
                raise InputError(f"{where}: column {name!r} should be {kind}, is {found}; the table is damaged")
        if parquet.metadata.num_rows > MAX_STATS_ROWS:
            raise InputError(f"{where}: {parquet.metadata.num_rows} rows, more than any checkpoint has tensors")
        # Names read as a dictionary: one long name repeated in every row is decoded once, and
        # measured before any row becomes Python strings.
        parquet = pq.ParquetFile(pa.BufferReader(data), read_dictionary=["tensor"])
        rows: list[dict] = []
        names = 0
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=list(_STATS_COLUMNS)):
            names += _check_batch(batch, where)
            if names > MAX_STATS_NAMES or len(rows) + batch.num_rows > MAX_STATS_ROWS:
                raise InputError(f"{where}: more than {MAX_STATS_ROWS} rows or {MAX_STATS_NAMES // 2**20} MiB of "
                                 "tensor names, more than any checkpoint's statistics; the table is damaged")
            rows += batch.to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"{where}: not a readable Parquet table ({type(e).__name__}: {str(e)[:200]}); "
                         "the statistics are damaged, run the merge again to remake them") from e
    return rows


def _check_batch(batch, where: str) -> int:
    """Refuse a batch with empty values or too long a name; the characters of its names, as
    Python strings will hold them (a dictionary's value once per row that refers to it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for name, (_, nullable, _) in _STATS_COLUMNS.items():
        if not nullable and batch.column(name).null_count:
            raise InputError(f"{where}: column {name!r} has empty values; the table is damaged")
    names = batch.column("tensor")
    lengths = (pc.take(pc.utf8_length(names.dictionary), names.indices) if pa.types.is_dictionary(names.type)
               else pc.utf8_length(names))
    longest = pc.max(lengths).as_py() or 0
    if longest > MAX_TENSOR_NAME:
        raise InputError(f"{where}: a tensor name of {longest} characters, more than {MAX_TENSOR_NAME}; "
                         "the table is damaged")
    return pc.sum(lengths).as_py() or 0


def summarize(manifest: Manifest, rows: list[dict]) -> str:
    by_layer: dict[Any, list[dict]] = defaultdict(list)
    for row in rows:
        layer, _ = tensor_kind(row["tensor"])
        by_layer[layer].append(row)
    kind = "?" if manifest.kind is None else manifest.kind
    lines = [f"{kind}: {len(rows)} tensors, plan {manifest.plan_hash[:12]}",
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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    try:
        write_regular(path, png.getvalue())  # a FIFO or a device at the path is refused, never waited on
    except OSError as e:
        raise InputError(f"--plot {path}: cannot write it ({e.strerror or e}); give a regular file's path") from e


def _check_plot_path(path: str, url: str, manifest: Manifest) -> None:
    """The plot replaces whatever file has its name: never one of the checkpoint's own files."""
    if urls.protocol(url) != "file":
        return
    folder, name = os.path.split(os.path.realpath(path))
    if folder == os.path.realpath(urls.local_path(url)) and name in (MANIFEST_NAME, *manifest.named):
        raise InputError(f"--plot {path}: is a file of the checkpoint it plots; give another path")


def inspect_checkpoint(url: str, storage_options: dict[str, Any], plot_path: str | None = None) -> str:
    manifest, rows = load(url, storage_options)
    text = summarize(manifest, rows)
    if plot_path:
        _check_plot_path(plot_path, url, manifest)
        kind = "raymerge" if manifest.kind is None else manifest.kind
        plot(rows, plot_path, f"{kind}: change per layer and tensor type")
        text += f"\nplot written to {plot_path}"
    return text
