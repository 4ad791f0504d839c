"""Make a synthetic Llama-layout base/chat/cp trio (random bf16, raymerge's sharding) for benchmarks.

    python bench/make_synthetic.py /tmp/trio --params 750e6 --shard-size 400MB
"""

from __future__ import annotations

import argparse
import time

from raymerge.config import parse_size
from raymerge.safetensors.dtypes import numel
from raymerge.synth import LlamaShape, make_trio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--params", type=float, default=750e6, help="approximate parameters per checkpoint")
    p.add_argument("--shard-size", default="400MB")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    shape = LlamaShape.of_size(args.params)
    started = time.perf_counter()
    make_trio(args.root, shape, shard_size=parse_size(args.shard_size, "--shard-size"), seed=args.seed)
    params = sum(numel(s) for _, s in shape.tensors())
    print(f"{shape} -> {params / 1e6:.0f}M params, {2 * params / 1e9:.2f} GB per checkpoint, "
          f"made in {time.perf_counter() - started:.0f}s under {args.root}")


if __name__ == "__main__":
    main()
