"""Shared by the tests of the loops raymerge/ops/_native.c compiles."""

from __future__ import annotations

import pytest

import raymerge.ops.exact as exact
import raymerge.ops.numpy_kernel as numpy_kernel
import raymerge.ops.sparse as sparse


@pytest.fixture(params=["native", "numpy"])
def both_loops(request, monkeypatch):
    """The test twice: with the compiled loops (raymerge/ops/_native.c) and with numpy's."""
    if request.param == "numpy":
        for module in (exact, numpy_kernel, sparse):
            monkeypatch.setattr(module, "_native", None)
    elif exact._native is None:
        pytest.skip("raymerge.ops._native was not built here (no C compiler at install)")
    return request.param
