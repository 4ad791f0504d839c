"""Bit for bit against mergekit: the same mergekit files run by mergekit and by `raymerge run`.

    python bench/mergekit_parity.py --mergekit /tmp/mkvenv/bin/mergekit-yaml [--params 30e6] [--dtype float32]
        [--merge-dtype bfloat16] [--only ties] [--out-dtype bfloat16]

Makes a synthetic Llama trio (base, chat, cp) in `--dtype`, runs every configuration below, with
mergekit's `dtype: --merge-dtype` (the compute dtype: raymerge computes at it as mergekit does), with
both tools (raymerge on its own local Ray), and prints, per configuration, how many elements of
the output differ (the claim: 0). Install mergekit in a venv of its own:
`python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5`.

ties: for each vector and tensor, the k = max(1, int(density * n)) largest |delta| are kept.
Magnitudes equal to the k-th largest (ties at the threshold) are where the tools may disagree:
raymerge keeps the lowest flat indices first, mergekit whatever its torch.argsort puts first.
The columns `tied` (elements tied at the threshold of a tensor whose ties straddle the cut,
summed over vectors) and `@tie` (differing elements at such a position) say whether every
difference is such a tie. With float32 inputs ties are rare; with bf16 inputs they are common.
breadcrumbs, breadcrumbs_ties: the same, at both of their thresholds (the top t + target, and the
top t that go as outliers).
arcee_fusion: where a tensor has more than 1M elements, mergekit's quartiles come from a random
sample of 1M of them (unseeded), raymerge's from all: its differences there are counted `@sample`.
dare_*, della*: mergekit's mask is torch.bernoulli, unseeded, so no bits can match: the table gives the
fraction of elements each tool's output changed from the base (`kept`) instead, and does not
count these rows as failures.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import yaml
from safetensors import safe_open

from raymerge.planning.schedule import NAMED, Scale, layer_of
from raymerge.synth import LlamaShape, make_trio

# name -> the body of a mergekit file (models and parameters), with {base}, {chat}, {cp}
CONFIGS = {
    "task_arithmetic (the chat vector)": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {cp}
    parameters: {{weight: 1.0}}
  - model: {chat}
    parameters: {{weight: 0.5}}
parameters: {{normalize: false}}
""",
    "task_arithmetic normalize, lambda, filter, gradient": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {cp}
    parameters: {{weight: [{{filter: mlp, value: 0.8}}, {{value: [0.2, 1.0]}}]}}
  - model: {chat}
    parameters: {{weight: 0.3}}
parameters: {{normalize: true, lambda: 0.9}}
""",
    "task_arithmetic, a model's filters falling back to the file's weight": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {cp}
    parameters: {{weight: [{{filter: mlp, value: 0.8}}]}}
  - model: {chat}
    parameters: {{weight: 0.3}}
parameters: {{weight: 0.6}}
""",
    "linear (normalized)": """merge_method: linear
models:
  - model: {cp}
    parameters: {{weight: 0.7}}
  - model: {chat}
    parameters: {{weight: 0.3}}
  - model: {base}
    parameters: {{weight: 0.1}}
""",
    "linear normalize false": """merge_method: linear
models:
  - model: {cp}
    parameters: {{weight: 0.6}}
  - model: {chat}
    parameters: {{weight: 0.45}}
parameters: {{normalize: false}}
""",
    # TIES of two vectors over the base: chat - base and cp - base.
    "ties d0.3/0.6 w0.7/0.5 (normalize default: on)": """merge_method: ties
base_model: {base}
models:
  - model: {chat}
    parameters: {{weight: 0.7, density: 0.3}}
  - model: {cp}
    parameters: {{weight: 0.5, density: 0.6}}
""",
    "ties d0.3/0.6 w0.7/0.5 normalize false": """merge_method: ties
base_model: {base}
models:
  - model: {chat}
    parameters: {{weight: 0.7, density: 0.3}}
  - model: {cp}
    parameters: {{weight: 0.5, density: 0.6}}
parameters: {{normalize: false}}
""",
    "ties density gradient, weight gradient, lambda": """merge_method: ties
base_model: {base}
models:
  - model: {chat}
    parameters: {{weight: [0.3, 0.9], density: [0.2, 0.9]}}
  - model: {cp}
    parameters: {{weight: 0.5, density: [0.7, 0.4, 0.1]}}
parameters: {{lambda: 0.8}}
""",
    "ties rescale, base listed as a model": """merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {chat}
    parameters: {{weight: 0.7, density: 0.3}}
  - model: {cp}
    parameters: {{weight: 0.5, density: 0.6}}
parameters: {{rescale: true, normalize: false}}
""",
    # Breadcrumbs: TIES's drop of the smallest, and of each vector's gamma largest (outliers) too.
    "breadcrumbs d0.3/0.6 gamma 0.05/default": """merge_method: breadcrumbs
base_model: {base}
models:
  - model: {chat}
    parameters: {{weight: 0.7, density: 0.3, gamma: 0.05}}
  - model: {cp}
    parameters: {{weight: 0.5, density: 0.6}}
""",
    "breadcrumbs_ties gamma gradient, rescale, normalize": """merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {chat}
    parameters: {{weight: 0.7, density: 0.5, gamma: [0.0, 0.1]}}
  - model: {cp}
    parameters: {{weight: 0.5, density: 0.8, gamma: 0.3}}
parameters: {{rescale: true, normalize: true}}
""",
    # DARE: no bits can match (mergekit's mask is torch.bernoulli); one vector so that `kept` is its mask's.
    "dare_linear d0.3 (one vector; kept fraction only)": """merge_method: dare_linear
base_model: {base}
models:
  - model: {chat}
    parameters: {{weight: 1.0, density: 0.3}}
parameters: {{rescale: false, normalize: false}}
""",
    "dare_ties d0.3 (one vector; kept fraction only)": """merge_method: dare_ties
base_model: {base}
models:
  - model: {chat}
    parameters: {{weight: 1.0, density: 0.3}}
parameters: {{rescale: false}}
""",
    # DELLA: mergekit's draws are unseeded torch.bernoulli too; kept fractions only.
    "della d0.3 epsilon 0.15 (one vector; kept fraction only)": """merge_method: della
base_model: {base}
models:
  - model: {chat}
    parameters: {{weight: 1.0, density: 0.3, epsilon: 0.15}}
parameters: {{rescale: false}}
""",
    "della_linear d0.6 epsilon 0.3 (one vector; kept fraction only)": """merge_method: della_linear
base_model: {base}
models:
  - model: {chat}
    parameters: {{weight: 1.0, density: 0.6, epsilon: 0.3}}
parameters: {{rescale: false}}
""",
    # SLERP between the base and the chat model: its norms and dot product are whole-tensor sums.
    "slerp t 0.35": """merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {chat}
parameters: {{t: 0.35}}
""",
    "slerp t gradients by filter (the community's)": """merge_method: slerp
base_model: {cp}
models:
  - model: {cp}
  - model: {chat}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""",
    "nuslerp with a base (flattened)": """merge_method: nuslerp
base_model: {base}
models:
  - model: {chat}
    parameters: {{weight: 0.7}}
  - model: {cp}
    parameters: {{weight: 0.3}}
""",
    "nuslerp without a base, row by row": """merge_method: nuslerp
models:
  - model: {chat}
    parameters: {{weight: 0.6}}
  - model: {cp}
    parameters: {{weight: 0.4}}
parameters: {{nuslerp_flatten: false}}
""",
    "model_stock": """merge_method: model_stock
base_model: {base}
models:
  - model: {chat}
  - model: {cp}
""",
    "model_stock filter_wise": """merge_method: model_stock
base_model: {base}
models:
  - model: {chat}
  - model: {cp}
parameters: {{filter_wise: true}}
""",
    "multislerp with a base": """merge_method: multislerp
base_model: {base}
models:
  - model: {chat}
    parameters: {{weight: 0.6}}
  - model: {cp}
    parameters: {{weight: 0.4}}
""",
    "multislerp without a base, three models": """merge_method: multislerp
models:
  - model: {chat}
    parameters: {{weight: 0.5}}
  - model: {cp}
    parameters: {{weight: 0.3}}
  - model: {base}
    parameters: {{weight: 0.2}}
""",
    "karcher (mergekit's test: max_iter 5)": """merge_method: karcher
base_model: {base}
models:
  - model: {chat}
    parameters: {{weight: 0.6}}
  - model: {cp}
    parameters: {{weight: 0.4}}
parameters: {{max_iter: 5, tol: 1.0e-5}}
""",
    "karcher without a base, defaults": """merge_method: karcher
models:
  - model: {chat}
  - model: {cp}
  - model: {base}
""",
    "passthrough frankenmerge (slices)": """merge_method: passthrough
slices:
  - sources:
      - model: {chat}
        layer_range: [0, 10]
  - sources:
      - model: {cp}
        layer_range: [6, 16]
  - sources:
      - model: {chat}
        layer_range: [15, 16]
        parameters: {{scale: 0.5}}
""",
    "slerp slices, t gradients per slice": """merge_method: slerp
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 8]
      - model: {chat}
        layer_range: [0, 8]
  - sources:
      - model: {base}
        layer_range: [8, 16]
      - model: {chat}
        layer_range: [4, 12]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""",
    "nearswap t 0.004": """merge_method: nearswap
base_model: {base}
models:
  - model: {base}
  - model: {chat}
parameters: {{t: 0.004}}
""",
    "passthrough scale 0.8": """merge_method: passthrough
models:
  - model: {chat}
    parameters: {{scale: 0.8}}
""",
    "sce (defaults: no selection)": """merge_method: sce
base_model: {base}
models:
  - model: {chat}
  - model: {cp}
""",
    "sce select_topk 0.3": """merge_method: sce
base_model: {base}
models:
  - model: {chat}
  - model: {cp}
parameters: {{select_topk: 0.3}}
""",
    "arcee_fusion": """merge_method: arcee_fusion
base_model: {base}
models:
  - model: {base}
  - model: {chat}
""",
    "ram (defaults)": """merge_method: ram
base_model: {base}
models:
  - model: {chat}
  - model: {cp}
""",
    # an epsilon near the changes' size: elements where none, one or both count
    "ram epsilon 0.004": """merge_method: ram
base_model: {base}
models:
  - model: {chat}
  - model: {cp}
parameters: {{epsilon: 0.004}}
""",
    "ramplus_tl epsilon 0.004, r 0.5, alpha 0.9": """merge_method: ramplus_tl
base_model: {base}
models:
  - model: {chat}
  - model: {cp}
parameters: {{epsilon: 0.004, r: 0.5, alpha: 0.9}}
""",
}
OUT_DTYPES = ("bfloat16", "float32")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mergekit", required=True, help="path to mergekit-yaml")
    p.add_argument("--params", type=float, default=30e6, help="parameters per checkpoint")
    p.add_argument("--dtype", default="float32", help="the inputs' dtype")
    p.add_argument("--merge-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="the files' `dtype:`, mergekit's compute dtype (default float32)")
    p.add_argument("--work", default="/tmp/raymerge-parity")
    p.add_argument("--only", action="append", default=[], help="run only configurations whose name contains this "
                   "(repeatable)")
    p.add_argument("--out-dtype", action="append", choices=OUT_DTYPES, help="out_dtype (repeatable; default both)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    trio = make_trio(os.path.join(args.work, "trio"), LlamaShape.of_size(args.params), dtype=args.dtype)
    configs = {n: b for n, b in CONFIGS.items() if not args.only or any(o in n for o in args.only)}
    print(f"inputs {args.dtype}, dtype {args.merge_dtype}, {args.params:.3g} params per checkpoint")
    print(f"{'configuration':50s} {'out':9s} {'elements':>10s} {'differ':>7s} {'tied':>7s} {'@tie':>6s} {'@sum':>7s} "
          f"{'kept mk/rm':>13s} {'mergekit s':>10s} {'raymerge s':>10s}", flush=True)
    failed = False
    rows = []
    for name, body in configs.items():
        for out_dtype in args.out_dtype or OUT_DTYPES:
            cfg = os.path.join(args.work, "mergekit.yml")
            text = body.format(**trio) + f"dtype: {args.merge_dtype}\nout_dtype: {out_dtype}\n"
            with open(cfg, "w") as f:
                f.write(text)
            theirs, ours = os.path.join(args.work, "mergekit-out"), os.path.join(args.work, "raymerge-out")
            shutil.rmtree(theirs, ignore_errors=True)
            shutil.rmtree(ours, ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run([args.mergekit, cfg, theirs], check=True, capture_output=True)
            t1 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "raymerge", "run", cfg, "--out", ours, "-q"], check=True,
                           stdout=subprocess.DEVNULL)
            t2 = time.perf_counter()
            row = {"config": name, "out_dtype": out_dtype, "mergekit_s": t1 - t0, "raymerge_s": t2 - t1,
                   **analyze(yaml.safe_load(text), trio, ours, theirs)}
            rows.append(row)
            dare = name.startswith(("dare", "della"))
            explained = sum(row.get(k, 0) for k in ("differ_at_tie", "differ_at_sum", "differ_at_sample"))
            failed |= row["differ"] != explained and not dare
            kept = f"{row['kept'][1]:.4f}/{row['kept'][0]:.4f}" if dare else "-"
            tied = " ".join(f"{row.get(key, '-'):>{w}}" for key, w in (("tied", 7), ("differ_at_tie", 6),
                                                                          ("differ_at_sum", 7)))
            sampled = f"  ({row['differ_at_sample']} @sample)" if "differ_at_sample" in row else ""
            print(f"{name:50s} {out_dtype:9s} {row['elements']:10d} {row['differ']:7d} {tied} {kept:>13s} "
                  f"{t1 - t0:10.1f} {t2 - t1:10.1f}{sampled}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "merge_dtype": args.merge_dtype, "params": args.params, "rows": rows}, f, indent=1)
    sys.exit(1 if failed else 0)


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def compare(a: str, b: str) -> tuple[int, int]:
    """(elements, elements whose bits differ) over every tensor of two checkpoint folders."""
    r = analyze(None, None, a, b)
    return r["elements"], r["differ"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def analyze(cfg: dict | None, trio: dict | None, a: str, b: str) -> dict:
    """Elements and differing elements of outputs a (raymerge) and b (mergekit); for ties, the ties
    at each vector's threshold (see the module's docstring); for dare_*, the fraction of elements
    each output changed from the base."""
    ours, theirs = _tensors(a), _tensors(b)
    assert sorted(ours) == sorted(theirs), "the outputs hold different tensors"
    method = (cfg or {}).get("merge_method")
    inputs = {}
    sliced = bool(cfg and "slices" in cfg)
    if sliced and method != "slerp":
        method = None  # a frankenmerge of another method: its elements are compared, their causes not sought
    if method in (*SELECTING, *RANDOM, "slerp", "nuslerp", "model_stock", "multislerp", "karcher",
                  "sce"):
        inputs = {role: _tensors(trio[role]) for role in ("base", "chat", "cp")}
        role_of = {v.rstrip("/"): k for k, v in trio.items()}
        base = role_of[cfg.get("base_model", "").rstrip("/")] if cfg.get("base_model") else None
        vectors = [(role_of[m["model"].rstrip("/")], (m.get("parameters") or cfg.get("parameters") or {}).get(
            "t" if method == "slerp" else "density", 1.0))
                   for m in cfg.get("models", []) if m["model"].rstrip("/") != (cfg.get("base_model") or "").rstrip("/")]
        gammas = {role_of[m["model"].rstrip("/")]: (m.get("parameters") or {}).get("gamma", 0.01)
                  for m in cfg.get("models", [])}
        layers = LlamaShape.of_size(1).config()["num_hidden_layers"]  # of_size: 16 layers whatever the size
    total = differ = tied = at_tie = at_sum = at_sample = 0
    changed = [0, 0]
    for k, t in ours.items():
        assert t.dtype == theirs[k].dtype, k
        d = _bits(t) != _bits(theirs[k])
        differ += int(d.sum())
        total += t.numel()
        if method in SELECTING:
            ties = torch.zeros(t.numel(), dtype=torch.bool)
            summed = False  # whether a rescale factor torch's own sum gives differs from the exact one's
            for role, density in vectors:
                density = _setting(density, k, layers)
                n = t.numel()
                if not 0 < density < 1:
                    continue
                at = getattr(torch, cfg.get("dtype", "float32"))  # mergekit's delta, in its compute dtype
                mag = (inputs[role][k].to(at) - inputs[base][k].to(at)).abs().float().reshape(-1)
                ranks = _selections(method, density, _setting(gammas.get(role, 0.01), k, layers), n)
                for keep in ranks:
                    if keep == 0:
                        continue
                    threshold = torch.topk(mag, keep, sorted=False).values.min()
                    above = int((mag > threshold).sum())
                    eq = mag == threshold
                    if int(eq.sum()) > keep - above:  # the ties straddle the cut: a choice is made among them
                        tied += int(eq.sum())
                        ties |= eq
                if (cfg.get("parameters") or {}).get("rescale"):
                    summed |= _factors_differ((inputs[role][k].to(at) - inputs[base][k].to(at)).reshape(-1), method,
                                              *ranks)
            if summed:
                at_sum += int(d.sum())
            else:
                at_tie += int((d.reshape(-1) & ties).sum())
        elif method == "slerp" and sliced:
            at = getattr(torch, cfg.get("dtype", "float32"))
            sources, i, count = _slice_sources(cfg, k)
            (b, v0), (role, v1) = sorted(((role_of[m.rstrip("/")], n) for m, n in sources), key=lambda x: x[0] != base)
            t = _setting(cfg["parameters"]["t"], k, count, i)
            if _slerp_coefficients_differ(inputs[b][v0].to(at), inputs[role][v1].to(at), t):
                at_sum += int(d.sum())
        elif method == "slerp":
            (role, setting), = vectors
            at = getattr(torch, cfg.get("dtype", "float32"))
            if _slerp_coefficients_differ(inputs[base][k].to(at), inputs[role][k].to(at), _setting(setting, k, layers)):
                at_sum += int(d.sum())
        elif method == "nuslerp":
            at = getattr(torch, cfg.get("dtype", "float32"))
            flatten = (cfg.get("parameters") or {}).get("nuslerp_flatten", True)
            models = [inputs[role][k].to(at) for role, _ in vectors]
            b = inputs[base][k].to(at) if base else None
            if _nuslerp_sums_differ(*[m - b if b is not None else m for m in models], flatten):
                at_sum += int(d.sum())
        elif method == "model_stock":
            at = getattr(torch, cfg.get("dtype", "float32"))
            rows = (cfg.get("parameters") or {}).get("filter_wise", False)
            offsets = [inputs[role][k].to(at) - inputs[base][k].to(at) for role, _ in vectors]
            if _model_stock_sums_differ(offsets, rows):
                at_sum += int(d.sum())
        elif method == "multislerp":
            at = getattr(torch, cfg.get("dtype", "float32"))
            models = [inputs[role][k].to(at) for role, _ in vectors]
            weights = [m["parameters"]["weight"] for m in cfg["models"]
                       if m["model"].rstrip("/") != (cfg.get("base_model") or "").rstrip("/")]
            if _multislerp_sums_differ(models, inputs[base][k].to(at) if base else None, weights):
                at_sum += int(d.sum())
        elif method == "karcher":
            at = getattr(torch, cfg.get("dtype", "float32"))
            group = [role_of[m["model"].rstrip("/")] for m in cfg["models"]]
            group += [base] if base and base not in group else []
            params = cfg.get("parameters") or {}
            if _karcher_sums_differ([inputs[role][k].to(at) for role in group], params.get("max_iter", 10),
                                    params.get("tol", 1e-5)):
                at_sum += int(d.sum())
        elif method == "sce":
            at = getattr(torch, cfg.get("dtype", "float32"))
            changes = torch.stack([inputs[role][k].to(at) - inputs[base][k].to(at) for role, _ in vectors])
            ties, summed = _sce_causes(changes.reshape(len(vectors), -1),
                                       (cfg.get("parameters") or {}).get("select_topk", 1.0))
            if summed:
                at_sum += int(d.sum())
            else:
                tied += int(ties.sum())
                at_tie += int((d.reshape(-1) & ties).sum())
        elif method == "arcee_fusion":
            if t.numel() > 1_000_000:  # mergekit's quartiles come from a random sample of 1M elements
                at_sample += int(d.sum())
        elif method in RANDOM:
            ref = inputs[base][k].to(t.dtype)
            for j, out in enumerate((t, theirs[k])):
                changed[j] += int((_bits(out) != _bits(ref)).sum())
    r = {"elements": total, "differ": differ}
    if method in (*SELECTING, "sce"):
        r.update(tied=tied, differ_at_tie=at_tie, differ_at_sum=at_sum)
    elif method in ("slerp", "nuslerp", "model_stock", "multislerp", "karcher"):
        r.update(differ_at_sum=at_sum)
    elif method == "arcee_fusion":
        r.update(differ_at_sample=at_sample)
    elif method in RANDOM:
        r["kept"] = [c / total for c in changed]
    return r


SELECTING = ("ties", "breadcrumbs", "breadcrumbs_ties")  # methods that keep magnitudes by rank
RANDOM = ("dare_linear", "dare_ties", "della", "della_linear")  # mergekit draws unseeded: compared in meaning


def _selections(method: str, density: float, gamma: float, n: int) -> tuple[int, ...]:
    """How many of the largest magnitudes each selection takes: TIES its top k; breadcrumbs the top
    t + target, less the top t (mergekit's magnitude_outliers)."""
    if method == "ties":
        return (max(1, int(density * n)),)
    target = int(density * n)
    top = min(int(gamma * n), n - target)
    return top + target, top


def _sce_causes(changes: torch.Tensor, topk: float) -> tuple[torch.Tensor, bool]:
    """SCE's causes of difference in one tensor: (the elements a tie can change, whether the weights
    differ by mergekit's float sums). Variances tied with the k-th largest straddle the cut:
    mergekit's topk keeps an unspecified subset of them, raymerge the lowest indices; this changes
    those elements, and where the subsets' squares differ, the weights (means of the kept squares)
    and so the whole tensor. Otherwise a weight can differ because torch sums the squares in float32
    (every element of the tensor then counts as `@sum`)."""
    n = changes.shape[1]
    ties = torch.zeros(n, dtype=torch.bool)
    ours = theirs = changes
    if 0 < topk < 1:
        var = torch.var(changes, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * topk)
        if k:
            flat = var.float()
            kth = torch.topk(flat, k, sorted=False).values.min()
            eq = flat == kth
            if int(eq.sum()) > k - int((flat > kth).sum()):
                ties = eq
        masks = [torch.zeros(n, dtype=changes.dtype) for _ in range(2)]
        masks[0][torch.sort(var.float(), descending=True, stable=True).indices[:k]] = 1  # raymerge's
        masks[1][torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1  # mergekit's own call
        ours, theirs = changes * masks[0], changes * masks[1]

    def exact(x: torch.Tensor) -> torch.Tensor:
        squares = x.square()
        return torch.tensor([float(np.float32(float(s.double().sum())) / np.float32(n)) for s in squares]).to(x.dtype)

    if not torch.equal(theirs.square().mean(dim=1), exact(theirs)):
        return ties, True
    if not torch.equal(exact(ours), exact(theirs)):
        return torch.ones(n, dtype=torch.bool), False  # the tie choice changed a weight
    return ties, False


def _setting(setting, name: str, layers: int, layer: int | None = NAMED) -> float:
    """A mergekit parameter's value for one tensor: a number, a gradient, or {filter, value} conditions
    (at `layer` of `layers`, where given: a slice's)."""
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        setting = next(c["value"] for c in setting if c.get("filter") in (None, "*") or c["filter"] in name)
    return Scale(tuple(map(float, setting)) if isinstance(setting, list) else float(setting)).at(name, layers, layer)


def _slice_sources(cfg: dict, name: str) -> tuple[list[tuple[str, str]], int | None, int]:
    """A frankenmerge's output tensor: its sources (model, input tensor name), its layer in its slice
    (None outside the layers) and the slice's layer count, as mergekit stacks slices."""
    slices = cfg["slices"]
    layer = layer_of(name)
    if layer is None:
        s = slices[0] if "embed" in name else slices[-1]
        return [(src["model"], name) for src in s["sources"]], None, 1
    first = 0
    for s in slices:
        count = s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0]
        if layer < first + count:
            i = layer - first
            rename = lambda at: re.sub(r"\.layers\.\d+\.", f".layers.{at}.", name)  # noqa: E731
            return [(src["model"], rename(src["layer_range"][0] + i)) for src in s["sources"]], i, count
        first += count
    raise ValueError(f"{name}: past the slices' layers")


def _slerp_coefficients_differ(v0: torch.Tensor, v1: torch.Tensor, t: float) -> bool:
    """Whether SLERP's coefficients from mergekit's float reductions (its chunked norms and dot
    product, as mergekit 0.1.5 sums them) differ from those of the exact sums rounded once
    (raymerge's: raymerge.methods.slerp)."""
    from raymerge.methods.slerp import coefficients
    from raymerge.ops.exact import dot_sum

    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    chunk = 1024 * 1024
    na = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, i:i + chunk].float(), dim=1, keepdim=True)
                                               for i in range(0, a.shape[1], chunk)]), dim=0)
    nb = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, i:i + chunk].float(), dim=1, keepdim=True)
                                               for i in range(0, b.shape[1], chunk)]), dim=0)
    na, nb = (torch.where(n > 1e-8, n, 1) for n in (na, nb))
    dot = torch.stack([((a[:, i:i + chunk].float() / na) * (b[:, i:i + chunk].float() / nb)).sum(dim=1, keepdim=True)
                       for i in range(0, a.shape[1], chunk)]).sum(dim=0)
    theirs = coefficients(np.float32(dot.item()), t)
    x, y = a.float().reshape(-1).numpy(), b.float().reshape(-1).numpy()
    ea, eb = (dot_sum(z, z).sqrt_float32() for z in (x, y))
    ea, eb = (n if n > np.float32(1e-8) else np.float32(1) for n in (ea, eb))
    ours = coefficients(dot_sum(x / ea * (y / eb), np.float32(1)).to_float32(), t)
    return theirs != ours


def _nuslerp_sums_differ(v0: torch.Tensor, v1: torch.Tensor, flatten: bool) -> bool:
    """Whether nuslerp's norms or sums of products, as torch reduces them in the compute dtype
    (mergekit's torch.norm and sum), differ from the exact sums rounded once (raymerge's) for any
    vector of the tensor."""
    from raymerge.ops.exact import dot_sum

    if flatten:
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    v0, v1 = v0.reshape(-1, v0.shape[-1]), v1.reshape(-1, v1.shape[-1])

    def exact(rows: torch.Tensor, square: bool) -> torch.Tensor:
        sums = [dot_sum(r, r if square else np.float32(1)) for r in rows.float().numpy()]
        return torch.tensor([float(s.sqrt_float32() if square else s.to_float32()) for s in sums]).to(rows.dtype)

    units = []
    for v in (v0, v1):
        theirs, ours = torch.norm(v, dim=-1), exact(v, True)
        if not torch.equal(theirs, ours):
            return True
        units.append(v / ours.reshape(-1, 1).clamp(min=1e-7))
    product = units[0] * units[1]
    return not torch.equal(product.sum(dim=-1), exact(product, False))


def _model_stock_sums_differ(offsets: list[torch.Tensor], rows: bool) -> bool:
    """Whether model_stock's norms or sums of products, as torch reduces them (mergekit's), differ
    from the exact sums rounded once (raymerge's), for any vector of the tensor."""
    from raymerge.ops.exact import dot_sum

    if not rows or offsets[0].dim() == 1:
        offsets = [o.reshape(1, -1) for o in offsets]
    flat = [o.reshape(-1, o.shape[-1]) for o in offsets]

    def exact(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        sums = [dot_sum(a, a if y is None else np.float32(1)) for a in (x if y is None else x * y).float().numpy()]
        return torch.tensor([float(s.sqrt_float32() if y is None else s.to_float32()) for s in sums]).to(x.dtype)

    for o in flat:
        if not torch.equal(torch.norm(o, dim=-1), exact(o, None)):
            return True
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            if not torch.equal((flat[i] * flat[j]).sum(dim=-1), exact(flat[i], flat[j])):
                return True
    return False


def _multislerp_sums_differ(models: list[torch.Tensor], base: torch.Tensor | None, weights: list[float]) -> bool:
    """Whether multislerp's norms or dot products, as torch reduces them (mergekit's), differ from the
    exact sums rounded once (raymerge's): mergekit's computation, with each reduction compared."""
    from raymerge.ops.exact import dot_sum

    def both(x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if y is None:
            theirs, s = torch.norm(x), dot_sum(x.float().numpy(), x.float().numpy()).sqrt_float32()
        else:
            theirs, s = (x * y).sum(), dot_sum((x * y).float().numpy(), np.float32(1)).to_float32()
        return theirs, torch.tensor(float(s)).to(x.dtype)

    tensors = torch.stack(models)
    if base is not None:
        tensors -= base
    flat = tensors.view(len(models), -1)
    w = torch.tensor(weights, dtype=flat.dtype)
    w = w / w.sum()
    pairs = [both(x) for x in flat]
    if any(a != b for a, b in pairs):
        return True
    units = flat / (torch.stack([b for _, b in pairs]).unsqueeze(-1) + 1e-8)
    mean = (units * w.view(-1, 1)).sum(0)
    a, b = both(mean)
    if a != b:
        return True
    mean = mean / b
    dots = [both(u, mean) for u in units]
    if any(a != b for a, b in dots):
        return True
    tangent = ((units - torch.stack([b for _, b in dots]).unsqueeze(-1) * mean) * w.view(-1, 1)).sum(0)
    a, b = both(tangent)
    return bool(a != b)


def _karcher_sums_differ(tensors: list[torch.Tensor], max_iter: int, tol: float) -> bool:
    """Whether any of karcher's norms or dot products, as torch reduces them (mergekit's
    vector_norm and dot), differs from the exact sum rounded once (raymerge's): mergekit's iteration,
    with each reduction compared."""
    from raymerge.ops.exact import dot_sum

    def norm(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        h = x.float().reshape(-1).numpy()
        theirs = torch.linalg.vector_norm(x.float())
        return theirs, float(theirs) != float(dot_sum(h, h).sqrt_float32())

    def dot(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, bool]:
        theirs = torch.dot(x.reshape(-1), y.reshape(-1))
        ours = torch.tensor(float(dot_sum(x.float().reshape(-1).numpy(), y.float().reshape(-1).numpy()).to_float32()))
        return theirs, float(theirs) != float(ours.to(x.dtype))

    if len(tensors) == 1:
        return False
    got = [norm(t) for t in tensors]
    if any(differ for _, differ in got):
        return True
    valid = [i for i, (n, _) in enumerate(got) if n.item() > tol]
    if not valid:
        return False
    weights = [1 / len(tensors) / sum(1 / len(tensors) for _ in valid)] * len(valid)
    units = [(tensors[i] / got[i][0]).to(tensors[i].dtype) for i in valid]
    mean = torch.zeros_like(units[0])
    for w, u in zip(weights, units):
        mean += w * u
    mn, differ = norm(mean)
    if differ:
        return True
    mean = units[0].clone() if mn.item() < tol else (mean / mn).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, units):
            d, differ = dot(mean, u)
            if differ:
                return True
            d = torch.clamp(d, -1.0, 1.0)
            theta = torch.arccos(d)
            if theta.item() >= tol:
                tangent += w * (theta / torch.sin(theta)) * (u - d * mean)
        tn, differ = norm(tangent)
        if differ:
            return True
        if tn.item() < tol:
            return False
        mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(mean.dtype)
        un, differ = norm(mean)
        if differ:
            return True
        if un.item() > tol:
            mean = (mean / un).to(mean.dtype)
    return False


def _factors_differ(delta: torch.Tensor, method: str, k: int, top: int = 0) -> bool:
    """Whether the L1 rescale factor of what is kept (the top k magnitudes, less the top `top`),
    sum|delta| / sum|kept| in the compute dtype (delta's), is another number when torch sums as
    mergekit does (its float reduction: its order and partial sums depend on the tensor's size, the
    CPU and where the kept elements lie) than when the sums are exact, each rounded once to float32
    and then to the dtype (raymerge's). The kept elements are those mergekit's own sort picks (the
    same call on the same tensor: the same ties), so that torch sums what mergekit sums."""
    n = delta.numel()
    mask = torch.zeros(n, dtype=delta.dtype)
    if method == "ties":
        mask[torch.argsort(delta.abs().float(), descending=True)[:k]] = 1
    else:  # magnitude_outliers: its ascending sort, ranks n - k .. n - top - 1
        mask[torch.sort(delta.abs().float(), descending=False).indices[n - k:n - top]] = 1
    kept = delta * mask
    theirs = delta.abs().sum() / kept.abs().sum()

    def exact(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(x.abs().double().sum()), dtype=torch.float32).to(x.dtype)

    return bool(theirs != exact(delta) / exact(kept))


if __name__ == "__main__":
    main()
