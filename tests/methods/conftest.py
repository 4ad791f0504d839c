"""Fixtures the method tests share."""

from __future__ import annotations

import pytest
import torch

from tests.methods.test_sparse_methods import N


@pytest.fixture(scope="module")
def bf16_trio():
    """A bf16 base, anchor and three chat models, each its own noise on the base: independent deltas
    whose signs disagree, with many equal magnitudes (differences of nearby bf16 values)."""
    g = torch.Generator().manual_seed(11)
    base = (0.02 * torch.randn(N, generator=g)).to(torch.bfloat16)
    chats = [(base.float() + 0.01 * torch.randn(N, generator=g)).to(torch.bfloat16) for _ in range(3)]
    anchor = (base.float() + 0.01 * torch.randn(N, generator=g)).to(torch.bfloat16)
    return base.reshape(100, 200), [c.reshape(100, 200) for c in chats], anchor.reshape(100, 200)
