"""Independent references for tests: load with safetensors, compute with plain torch."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable

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


def mergekit_file(tmp_path, text: str) -> str:
    """A mergekit configuration written to tmp_path/mergekit.yml: its path."""
    path = tmp_path / "mergekit.yml"
    path.write_text(text)
    return str(path)


def assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k].contiguous().view(torch.uint8), want[k].contiguous().view(torch.uint8)), \
            f"{k}: not bit-identical"


def weighted_reference(anchor: dict | None, terms: list[tuple[float, dict, dict | None]], dtype=None,
                       skip=lambda name: False) -> dict[str, torch.Tensor]:
    """The documented accumulation, written plainly: acc = float32(anchor) (or 0); for each term in
    order, acc[:rows] += scale * (a[:rows] - b[:rows]) in float32 over the rows all inputs share;
    one rounding at the end. `skip(name)` tensors keep the anchor's values."""
    names = anchor.keys() if anchor is not None else terms[0][1].keys()
    out = {}
    for k in names:
        acc = anchor[k].float().clone() if anchor is not None else torch.zeros(terms[0][1][k].shape)
        if not skip(k):
            for scale, a, b in terms:
                rows = min(acc.shape[0], a[k].shape[0], b[k].shape[0] if b is not None else a[k].shape[0])
                x = a[k][:rows].float()
                if b is not None:
                    x = x - b[k][:rows].float()
                acc[:rows] = acc[:rows] + scale * x
        out[k] = acc.to(dtype or (anchor[k].dtype if anchor is not None else torch.float32))
    return out


def wait_for(cond: Callable[[], object], timeout: float = 120.0) -> bool:
    """Whether cond() came true within `timeout` seconds (asked every 0.1 s)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def own_processes(title: str) -> list:
    """This test process's descendants whose command line holds `title` (e.g. "ray::MergeWorker"):
    the session's own Ray workers, never those of another test session on the machine."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if title in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # gone meanwhile
            pass
    return found


def race(attempt: Callable[[int], object], n: int, lost: type[BaseException]) -> tuple[list, list[int]]:
    """Run attempt(0) .. attempt(n - 1) in n threads at once: (what the winners returned, the
    indices of those that raised `lost`)."""
    wins, losses = [], []

    def go(i: int) -> None:
        try:
            wins.append(attempt(i))
        except lost:
            losses.append(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wins, losses
