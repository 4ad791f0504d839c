"""Independent references for tests: load with safetensors, compute with plain torch."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open


def load_folder(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a local checkpoint folder, via the index when there is one."""
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else \
        sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    out = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def chat_vector_reference(base: dict, chat: dict, cp: dict, scale: float) -> dict[str, torch.Tensor]:
    """cp + scale * (chat - base) in float32, rounded once to cp's dtype (mergekit's float32 math)."""
    return {k: (cp[k].float() + scale * (chat[k].float() - base[k].float())).to(cp[k].dtype) for k in cp}


def assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k].contiguous().view(torch.uint8), want[k].contiguous().view(torch.uint8)), \
            f"{k}: not bit-identical"
