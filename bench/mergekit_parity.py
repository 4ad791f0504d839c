"""Bit for bit against mergekit: the same mergekit files run by mergekit and by `raymerge run`.

    python bench/mergekit_parity.py --mergekit /tmp/mkvenv/bin/mergekit-yaml [--params 30e6] [--dtype float32]
        [--only ties] [--out-dtype bfloat16]

Makes a synthetic Llama trio (base, chat, cp) in `--dtype`, runs every configuration below with
both tools (raymerge on its own local Ray), and prints, per configuration, how many elements of
the output differ (the claim: 0). Install mergekit in a venv of its own:
`python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5`.

ties: for each vector and tensor, the k = max(1, int(density * n)) largest |delta| are kept.
Magnitudes equal to the k-th largest (ties at the threshold) are where the tools may disagree:
raymerge keeps the lowest flat indices first, mergekit whatever its torch.argsort puts first.
The columns `tied` (elements tied at the threshold of a tensor whose ties straddle the cut,
summed over vectors) and `@tie` (differing elements at such a position) say whether every
difference is such a tie. With float32 inputs ties are rare; with bf16 inputs they are common.
dare_*: mergekit's mask is torch.bernoulli, unseeded, so no bits can match: the table gives the
fraction of elements each tool's output changed from the base (`kept`) instead, and does not
count these rows as failures.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import torch
import yaml
from safetensors import safe_open

from raymerge.planning.schedule import Scale
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
}
OUT_DTYPES = ("bfloat16", "float32")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mergekit", required=True, help="path to mergekit-yaml")
    p.add_argument("--params", type=float, default=30e6, help="parameters per checkpoint")
    p.add_argument("--dtype", default="float32", help="the inputs' dtype (and mergekit's dtype: float32 always)")
    p.add_argument("--work", default="/tmp/raymerge-parity")
    p.add_argument("--only", action="append", default=[], help="run only configurations whose name contains this "
                   "(repeatable)")
    p.add_argument("--out-dtype", action="append", choices=OUT_DTYPES, help="out_dtype (repeatable; default both)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    trio = make_trio(os.path.join(args.work, "trio"), LlamaShape.of_size(args.params), dtype=args.dtype)
    configs = {n: b for n, b in CONFIGS.items() if not args.only or any(o in n for o in args.only)}
    print(f"inputs {args.dtype}, {args.params:.3g} params per checkpoint")
    print(f"{'configuration':50s} {'out':9s} {'elements':>10s} {'differ':>7s} {'tied':>7s} {'@tie':>6s} "
          f"{'kept mk/rm':>13s} {'mergekit s':>10s} {'raymerge s':>10s}", flush=True)
    failed = False
    rows = []
    for name, body in configs.items():
        for out_dtype in args.out_dtype or OUT_DTYPES:
            cfg = os.path.join(args.work, "mergekit.yml")
            text = body.format(**trio) + f"dtype: float32\nout_dtype: {out_dtype}\n"
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
            dare = name.startswith("dare")
            failed |= row["differ"] != 0 and not dare
            kept = f"{row['kept'][1]:.4f}/{row['kept'][0]:.4f}" if dare else "-"
            tied = (f"{row['tied']:7d} {row['differ_at_tie']:6d}" if "tied" in row else f"{'-':>7s} {'-':>6s}")
            print(f"{name:50s} {out_dtype:9s} {row['elements']:10d} {row['differ']:7d} {tied} {kept:>13s} "
                  f"{t1 - t0:10.1f} {t2 - t1:10.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "params": args.params, "rows": rows}, f, indent=1)
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
    if method in ("ties", "dare_linear", "dare_ties"):
        inputs = {role: _tensors(trio[role]) for role in ("base", "chat", "cp")}
        role_of = {v.rstrip("/"): k for k, v in trio.items()}
        base = role_of[cfg["base_model"].rstrip("/")]
        vectors = [(role_of[m["model"].rstrip("/")], m.get("parameters", {}).get("density", 1.0))
                   for m in cfg["models"] if m["model"].rstrip("/") != cfg["base_model"].rstrip("/")]
        layers = LlamaShape.of_size(1).config()["num_hidden_layers"]  # of_size: 16 layers whatever the size
    total = differ = tied = at_tie = 0
    changed = [0, 0]
    for k, t in ours.items():
        assert t.dtype == theirs[k].dtype, k
        d = _bits(t) != _bits(theirs[k])
        differ += int(d.sum())
        total += t.numel()
        if method == "ties":
            ties = torch.zeros(t.numel(), dtype=torch.bool)
            for role, density in vectors:
                density = Scale(tuple(map(float, density)) if isinstance(density, list)
                                else float(density)).at(k, layers)
                n = t.numel()
                if not 0 < density < 1:
                    continue
                mag = (inputs[role][k].float() - inputs[base][k].float()).abs().reshape(-1)
                keep = max(1, int(density * n))
                threshold = torch.topk(mag, keep, sorted=False).values.min()
                above = int((mag > threshold).sum())
                eq = mag == threshold
                if int(eq.sum()) > keep - above:  # the ties straddle the cut: a choice is made among them
                    tied += int(eq.sum())
                    ties |= eq
            at_tie += int((d.reshape(-1) & ties).sum())
        elif method in ("dare_linear", "dare_ties"):
            ref = inputs[base][k].to(t.dtype)
            for j, out in enumerate((t, theirs[k])):
                changed[j] += int((_bits(out) != _bits(ref)).sum())
    r = {"elements": total, "differ": differ}
    if method == "ties":
        r.update(tied=tied, differ_at_tie=at_tie)
    elif method in ("dare_linear", "dare_ties"):
        r["kept"] = [c / total for c in changed]
    return r


if __name__ == "__main__":
    main()
