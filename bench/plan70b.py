"""Planning at 70B scale: three Llama-2-70B-layout checkpoints (15 shards each, ~138 GB each on
paper) written as real headers over sparse files, then `raymerge plan` timed on them.
No tensor data exists or moves: the files are holes after their headers.

    python bench/plan70b.py /tmp/llama70b
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import time

from raymerge.planning.layout import split_into_shards
from raymerge.safetensors.dtypes import nbytes
from raymerge.safetensors.index import shard_name

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = 8192, 80, 64, 8, 28672, 32000


def tensors() -> list[tuple[str, list[int]]]:
    kv = HIDDEN // HEADS * KV_HEADS
    out = [("model.embed_tokens.weight", [VOCAB, HIDDEN])]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", [HIDDEN, HIDDEN]), (p + "self_attn.k_proj.weight", [kv, HIDDEN]),
                (p + "self_attn.v_proj.weight", [kv, HIDDEN]), (p + "self_attn.o_proj.weight", [HIDDEN, HIDDEN]),
                (p + "mlp.gate_proj.weight", [INTER, HIDDEN]), (p + "mlp.up_proj.weight", [INTER, HIDDEN]),
                (p + "mlp.down_proj.weight", [HIDDEN, INTER]), (p + "input_layernorm.weight", [HIDDEN]),
                (p + "post_attention_layernorm.weight", [HIDDEN])]
    return out + [("model.norm.weight", [HIDDEN]), ("lm_head.weight", [VOCAB, HIDDEN])]


def write_checkpoint(folder: str, shards: int = 15) -> int:
    os.makedirs(folder, exist_ok=True)
    ts = tensors()
    sizes = [nbytes("BF16", s) for _, s in ts]
    groups = split_into_shards(sizes, sum(sizes) / shards)
    if len(groups) > shards:  # the remainder goes into the last shard: exactly `shards` files
        groups[shards - 1:] = [[i for g in groups[shards - 1:] for i in g]]
    weight_map = {}
    for k, group in enumerate(groups):
        name = shard_name(k, len(groups))
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for i in group:
            header[ts[i][0]] = {"dtype": "BF16", "shape": ts[i][1], "data_offsets": [pos, pos + sizes[i]]}
            weight_map[ts[i][0]] = name
            pos += sizes[i]
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            f.truncate(8 + len(text) + pos)  # a hole: the data is never written
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f)
    return len(groups)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    args = p.parse_args()
    roles = {r: os.path.join(args.root, r) for r in ("base", "chat", "cp")}
    for folder in roles.values():
        n = write_checkpoint(folder)
    import raymerge

    started = time.perf_counter()
    plan = raymerge.plan(roles["base"], roles["chat"], roles["cp"], scale=0.5)
    seconds = time.perf_counter() - started
    disk = sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d in roles.values() for f in os.listdir(d))
    print(f"planned 3 x {n} shards: {len(plan.tensors)} tensors, {len(plan.shards)} output shards, "
          f"{len(plan.items)} items, {plan.output_bytes / 1e9:.1f} GB out, {plan.read_bytes / 1e9:.1f} GB to read, "
          f"in {seconds:.2f}s (inputs use {disk / 1e6:.1f} MB of disk)")


if __name__ == "__main__":
    main()
