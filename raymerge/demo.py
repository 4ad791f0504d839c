"""`raymerge demo`: the embedded default end to end, with nothing downloaded.

Makes a tiny Llama-shaped base/chat/cp trio, merges it on a private local Ray, and checks every
output tensor bit for bit against a plain float32 computation done here, in this process.
"""

from __future__ import annotations

import os
import sys
import tempfile

SCALE = 0.5


def run_demo(folder: str | None, workers: int | str | None) -> int:  # a flag's text: merge checks it
    import raymerge
    from raymerge.synth import LlamaShape, make_trio

    root = folder or tempfile.mkdtemp(prefix="raymerge-demo-")
    shape = LlamaShape(hidden=256, layers=4, vocab=1024, intermediate=688)
    print(f"raymerge demo: making a Llama-shaped base/chat/cp trio in {root}")
    trio = make_trio(root, shape, shard_size=2_000_000)
    out = os.path.join(root, "merged")
    result = raymerge.merge(trio["base"], trio["chat"], trio["cp"], out, scale=SCALE, workers=workers,
                            item_size="1MiB", shard_size="2MB", overwrite=True)
    bad = check(trio, out, SCALE)
    if bad:
        print(f"raymerge demo: {len(bad)} tensors differ from the reference: {', '.join(bad[:5])}", file=sys.stderr)
        return 1
    print(f"raymerge demo: merged {result.output_bytes / 1e6:.1f} MB into {len(result.shards)} shards in "
          f"{result.seconds:.1f}s; every tensor is bit-identical to cp + {SCALE} * (chat - base) in float32")
    print(f"raymerge demo: the merged checkpoint is in {out}")
    return 0


def check(trio: dict[str, str], out: str, scale: float) -> list[str]:
    """Names of output tensors that differ from the float32 reference."""
    import torch

    merged = _load(out)
    inputs = {role: _load(path) for role, path in trio.items()}
    bad = []
    for name, got in merged.items():
        cp, chat, base = (inputs[r][name] for r in ("cp", "chat", "base"))
        want = (cp.float() + scale * (chat.float() - base.float())).to(cp.dtype)
        if not torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
            bad.append(name)
    if set(merged) != set(inputs["cp"]):
        bad.append("(tensor names)")
    return bad


def _load(folder: str) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors
