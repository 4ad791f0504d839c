"""TIES (or another method) on a 128k-row embedding: the peak resident memory of every process,
driver and workers.

    python bench/ties_memory.py [--root /tmp/ties-mem] [--vocab 128256] [--hidden 2048] [--workers 2]
        [--rescale] [--method ties|slerp|nuslerp-rows|multislerp|model_stock-rows] [--keep]

Makes a trio (base, chat, cp; bf16) whose embedding and head have `--vocab` rows of `--hidden`
(128256 x 2048: 262M elements each, 525 MB in bf16, 1.05 GB in float32) and one small layer,
then runs a mergekit ties file of two vectors over the base (chat: weight 0.7, density 0.3; cp:
weight 0.5, density 0.6; dtype float32, out_dtype bfloat16) with `raymerge run` on its own local
Ray (`--workers`), while sampling every process of the command's tree (the driver, Ray's daemons
and the workers): its RSS every `--interval` seconds and its kernel high-water mark (VmHWM in
/proc/PID/status, which sees peaks between samples). Prints each process's peaks, largest first,
and whether any is above `--limit` (the claim: none above 1 GiB; a whole float32 copy of one
embedding is 1.05 GB). Deletes the trio and the output afterwards unless --keep. `--method`: one
of bench/run.py's method files instead (dtype bfloat16; `-rows`: per-row statistics, 128k rows of
facts for the embedding), or `union`: word-level tokenizers whose last 1000 tokens differ (the
base's, chat-only ones, cp-only ones) and a linear file with `tokenizer_source: union`, so every
model's embedding and head are gathered by token into `--vocab` + 2000 rows; `union-pad`: the same,
padded to a multiple of 64 rows (each model's padding rows its mean row: a worker streams the rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from raymerge.safetensors.dtypes import numel
from raymerge.synth import LlamaShape, make_trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memwatch import watch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/ties-mem")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rescale", action="store_true", help="ties with rescale: true (a third statistics pass)")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between samples")
    p.add_argument("--limit", type=float, default=1.0, help="GiB no process may exceed")
    p.add_argument("--keep", action="store_true", help="keep the trio and the output")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--method", default="ties", help="ties, union, union-pad, or a method file of bench/run.py "
                                                    "(--method there)")
    args = p.parse_args()
    shape = LlamaShape(hidden=args.hidden, layers=1, vocab=args.vocab, intermediate=256, heads=16, kv_heads=8)
    params = sum(numel(s) for _, s in shape.tensors())
    need = 4 * 2 * params  # three bf16 checkpoints and one bf16 output
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.root)) or "/").free
    if free < need * 1.2:
        raise SystemExit(f"{args.root}: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed")
    trio_dir, out = os.path.join(args.root, "trio"), os.path.join(args.root, "out")
    shutil.rmtree(args.root, ignore_errors=True)
    started = time.perf_counter()
    trio = make_trio(trio_dir, shape, shard_size=600_000_000)
    print(f"{shape}: {params / 1e6:.0f}M params, {2 * params / 1e9:.2f} GB per checkpoint, "
          f"embedding {args.vocab} x {args.hidden} = {args.vocab * args.hidden / 1e6:.0f}M elements "
          f"({4 * args.vocab * args.hidden / 2**30:.2f} GiB in float32); made in {time.perf_counter() - started:.0f}s",
          flush=True)
    cfg = os.path.join(args.root, "ties.yml")
    if args.method in ("union", "union-pad"):
        cfg = _union(trio, args.vocab, args.root, pad=args.method == "union-pad")
    elif args.method != "ties":
        from run import method_config

        cfg = method_config(args.method, trio, args.root)
    else:
        with open(cfg, "w") as f:
            f.write(f"""merge_method: ties
base_model: {trio['base']}
models:
  - model: {trio['chat']}
    parameters: {{weight: 0.7, density: 0.3}}
  - model: {trio['cp']}
    parameters: {{weight: 0.5, density: 0.6}}
parameters: {{rescale: {str(args.rescale).lower()}}}
dtype: float32
out_dtype: bfloat16
""")
    report = os.path.join(args.root, "report.json")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray: all processes its tree
    cmd = [sys.executable, "-m", "raymerge", "run", cfg, "--out", out, "--workers", str(args.workers),
           "--report", report]
    try:
        m = watch(cmd, args.interval, env=env)
        r = json.load(open(report)) if os.path.exists(report) else {}
        limit = args.limit * 2**30
        print(f"raymerge run {os.path.basename(cfg)} --workers {args.workers}: rc {m['rc']}, wall {m['wall_s']:.1f}s"
              + (f", execute {r['execute_seconds']:.1f}s" if "execute_seconds" in r else ""))
        print(f"{'peak RSS MiB':>12s} {'VmHWM MiB':>10s} {'peak RSS-shared MiB':>19s}  process")
        for row in m["peak_rss"]:
            print(f"{row['rss_mib']:12.0f} {row['hwm_mib']:10.0f} {row['unshared_mib']:19.0f}  {row['process']}")
        if r.get("peak_rss_per_worker"):
            print("the report's peak RSS per worker MiB: "
                  + ", ".join(f"{w} {v / 2**20:.0f}" for w, v in r["peak_rss_per_worker"].items()))
        top = max(max(row["rss_mib"], row["hwm_mib"]) for row in m["peak_rss"]) * 2**20
        verdict = "no process above" if top <= limit else "A PROCESS ABOVE"
        print(f"largest process: {top / 2**20:.0f} MiB: {verdict} {args.limit:g} GiB")
        # Values a method keeps between passes live in Ray's object store, shared memory that each
        # worker's RSS counts for the pages it touched: the private part apart.
        private = max(row["unshared_mib"] for row in m["peak_rss"])
        print(f"largest private part (RSS less shared pages): {private:.0f} MiB")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"shape": str(shape), "command": cmd, **m, "report": r, "limit_bytes": limit}, f, indent=1)
        sys.exit(0 if m["rc"] == 0 and top <= limit else 1)
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)


def _union(trio: dict[str, str], vocab: int, root: str, pad: bool = False) -> str:
    """Tokenizers for the trio (the base's words; chat and cp each with their own last 1000) and
    a linear file over chat and cp with the union of the three as the output's vocabulary (`pad`:
    padded to a multiple of 64 rows, each model's padding rows its mean row)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    shared = [f"w{i}" for i in range(vocab - 1000)]
    for role, tail in (("base", "w"), ("chat", "c"), ("cp", "k")):
        words = shared + [f"{tail}{i}" for i in range(vocab - 1000, vocab)]
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # synth's: special tokens of its own
            if os.path.exists(os.path.join(trio[role], name)):
                os.remove(os.path.join(trio[role], name))
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(trio[role])
    cfg = os.path.join(root, "union.yml")
    with open(cfg, "w") as f:
        f.write(f"""merge_method: linear
base_model: {trio['base']}
models:
  - model: {trio['chat']}
    parameters: {{weight: 0.5}}
  - model: {trio['cp']}
    parameters: {{weight: 0.5}}
dtype: bfloat16
""" + ("tokenizer: {source: union, pad_to_multiple_of: 64}\n" if pad else "tokenizer_source: union\n"))
    return cfg


if __name__ == "__main__":
    main()
