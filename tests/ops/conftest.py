"""Shared by the tests of the loops raymerge/ops/_native.c compiles."""

from __future__ import annotations

import pytest

from raymerge.ops import native


@pytest.fixture(params=["native", "numpy"])
def both_loops(request, monkeypatch):
    """The test twice: with the compiled loops (raymerge/ops/_native.c) and with numpy's."""
    if request.param == "numpy":
        monkeypatch.setattr(native, "loops", None)
    elif native.loops is None:
        pytest.skip("raymerge.ops._native was not built here (no C compiler at install)")
    return request.param
