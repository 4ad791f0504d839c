"""Bit for bit against mergekit: the same mergekit files run by mergekit and by `raymerge run`.

    python bench/mergekit_parity.py --mergekit /tmp/mkvenv/bin/mergekit-yaml [--params 30e6] [--dtype float32]

Makes a synthetic Llama trio (base, chat, cp) in `--dtype`, runs every configuration below with
both tools (raymerge on its own local Ray), and prints, per configuration, how many elements of
the output differ (the claim: 0). Install mergekit in a venv of its own:
`python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit==0.1.5`.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

import torch
from safetensors import safe_open

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
}
OUT_DTYPES = ("bfloat16", "float32")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mergekit", required=True, help="path to mergekit-yaml")
    p.add_argument("--params", type=float, default=30e6, help="parameters per checkpoint")
    p.add_argument("--dtype", default="float32", help="the inputs' dtype (and mergekit's dtype: float32 always)")
    p.add_argument("--work", default="/tmp/raymerge-parity")
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    trio = make_trio(os.path.join(args.work, "trio"), LlamaShape.of_size(args.params), dtype=args.dtype)
    print(f"{'configuration':55s} {'out':9s} {'elements':>11s} {'differ':>7s} {'mergekit s':>10s} {'raymerge s':>10s}")
    failed = False
    for name, body in CONFIGS.items():
        for out_dtype in OUT_DTYPES:
            cfg = os.path.join(args.work, "mergekit.yml")
            with open(cfg, "w") as f:
                f.write(body.format(**trio) + f"dtype: float32\nout_dtype: {out_dtype}\n")
            theirs, ours = os.path.join(args.work, "mergekit-out"), os.path.join(args.work, "raymerge-out")
            shutil.rmtree(theirs, ignore_errors=True)
            shutil.rmtree(ours, ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run([args.mergekit, cfg, theirs], check=True, capture_output=True)
            t1 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "raymerge", "run", cfg, "--out", ours, "-q"], check=True,
                           stdout=subprocess.DEVNULL)
            t2 = time.perf_counter()
            total, differ = compare(ours, theirs)
            failed |= differ != 0
            print(f"{name:55s} {out_dtype:9s} {total:11d} {differ:7d} {t1 - t0:10.1f} {t2 - t1:10.1f}")
    sys.exit(1 if failed else 0)


def compare(a: str, b: str) -> tuple[int, int]:
    """(elements, elements whose bits differ) over every tensor of two checkpoint folders."""
    def tensors(folder):
        out = {}
        for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
            with safe_open(f, "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    ours, theirs = tensors(a), tensors(b)
    assert sorted(ours) == sorted(theirs), "the outputs hold different tensors"
    total = differ = 0
    for k, t in ours.items():
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        assert t.dtype == theirs[k].dtype, k
        differ += int((t.view(width) != theirs[k].view(width)).sum())
        total += t.numel()
    return total, differ


if __name__ == "__main__":
    main()
